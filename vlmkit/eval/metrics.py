"""Captioning and VQA metrics as pure functions: (predictions, references) -> numbers.

Every metric takes one prediction per sample and a non-empty list of reference strings per sample.

- `tokenize`: a pure-Python stand-in for the COCO caption PTBTokenizer (Stanford CoreNLP 3.4.1 run with
  -lowerCase, then the tokens in pycocoevalcap's PUNCTUATIONS list dropped). Lowercases, splits
  punctuation and clitics ("dog's" -> "dog 's", "don't" -> "do n't") and drops . , ; : ! ? - -- ...
  quotes and backticks. Brackets come out as "-lrb-"/"-rrb-" etc. and are KEPT, as in the real
  pipeline: CoreNLP lowercases after escaping, so "-LRB-" in PUNCTUATIONS never matches. It covers
  ordinary caption text; rare constructs (smileys, abbreviations outside a short list) may differ.
- `bleu4`, `rouge_l`, `cider_d`: corpus scores equal to pycocoevalcap's Bleu(4) (option 'closest',
  4-gram entry), Rouge() (ROUGE-L, beta=1.2, mean over samples) and Cider() (the CIDEr-D variant:
  tf-idf n-gram vectors, n=1..4, IDF from the references of the evaluated corpus, clipped
  similarity, Gaussian length penalty with sigma=6, x10, mean over samples). Inputs must already be
  tokenized (space-separated tokens); `score` does that for you.
- `normalize_answer`, `vqa_accuracy`: the answer normalisation of the official VQAv2 evaluation
  script (punctuation, periods, number words -> digits, articles, contractions), and the accuracy
  min(1, #matching references / 3); with a single reference it is plain normalised equality.
  Simplified from the official script, which averages that formula over the 10 leave-one-out
  subsets of its 10 answers and normalises only when the answers disagree; we always normalise.
- `exact_match`: 1.0 if the prediction equals any reference after stripping, lowercasing,
  collapsing whitespace and dropping trailing periods.
- `score`: all of the above over a dataset, as one dict.
"""

from __future__ import annotations

import math
import re
from collections import Counter

from vlmkit.errors import VlmkitError

__all__ = [
    "tokenize",
    "bleu4",
    "rouge_l",
    "cider_d",
    "normalize_answer",
    "exact_match",
    "vqa_accuracy",
    "score",
]

# ----------------------------------------------------------------------------- tokenization

# Tokens pycocoevalcap removes after PTB tokenization (its PUNCTUATIONS list, lowercased as CoreNLP
# emits them; the bracket escapes are left out on purpose, see the module docstring). A plain '"'
# is here because PTB turns it into `` or '', which are dropped.
_DROPPED = frozenset(["''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";", '"'])
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
# Abbreviations CoreNLP keeps their period on ("mr. smith"); otherwise a word-final period is split.
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr st ave blvd jr sr vs etc inc co ltd corp mt ft "
    "jan feb mar apr aug sep sept oct nov dec".split()
)
# Whole words PTB splits in two.
_SPLIT_WORDS = {
    "cannot": ["can", "not"],
    "gonna": ["gon", "na"],
    "wanna": ["wan", "na"],
    "gotta": ["got", "ta"],
    "gimme": ["gim", "me"],
    "lemme": ["lem", "me"],
    "y'all": ["y'", "all"],
}
_CLITIC = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")
_ACRONYM = re.compile(r"^[^\W\d_](?:\.[^\W\d_])+$")  # u.s, p.m (before the final period)

_TOKEN = re.compile(
    r"""
      (?P<url>(?:https?://|www\.)\S*[\w/])
    | (?P<email>[\w.+-]+@\w[\w-]*(?:\.[\w-]+)+)
    | (?P<num>\d+(?:[.,:]\d+)+|\.\d+)               # 3.5  1,000  4:45  .5 (one token; "4:45pm" splits)
    | (?P<clitic>'(?:s|re|ve|ll|d|m)(?!\w))          # already split: "dog 's"
    | (?P<word>(?:[#@](?=[^\W\d_]))?\w(?:\w|[-./'](?=\w))*)   # inner - . / ' kept: x-ray, co/op, o'clock
    | (?P<bang>[!?]{2,})                            # "?!" and "!!" survive; a lone ! or ? is dropped
    | (?P<dots>\.+)
    | (?P<dashes>-+)
    | (?P<other>\S)
    """,
    re.VERBOSE,
)


def _word_tokens(word: str) -> list[str]:
    """Split one word-like match into PTB tokens (clitics, 'cannot', ...)."""
    if word in _SPLIT_WORDS:
        return list(_SPLIT_WORDS[word])
    m = _CLITIC.match(word)
    if m:
        return [m.group(1), m.group(2)]
    return [word]


def tokenize(text: str) -> str:
    """PTB-style tokens of `text`, lowercased, punctuation dropped, joined by single spaces."""
    text = text.lower()
    out: list[str] = []
    for m in _TOKEN.finditer(text):
        kind, tok = m.lastgroup, m.group()
        if kind == "word":
            # A following period stays on abbreviations and acronyms ("mr.", "u.s."), as in PTB.
            nxt = text[m.end() : m.end() + 1]
            if nxt == "." and (tok in _ABBREVIATIONS or _ACRONYM.match(tok)):
                out.append(tok + ".")  # the "." match that follows is dropped below
            else:
                out.extend(_word_tokens(tok))
        elif kind in ("url", "email", "num", "clitic", "bang"):
            out.append(tok)
        elif kind == "other":
            out.append(_BRACKETS.get(tok, tok))
        # dots and dashes are always dropped (".." / "---" are normalised to "..." / "--" by PTB)
    return " ".join(t for t in out if t not in _DROPPED)


# ----------------------------------------------------------------------------- corpus metrics


def _check(preds: list[str], refs: list[list[str]]) -> None:
    """Raise a one-line VlmkitError unless preds/refs are equal-length, non-empty lists of strings."""
    if not isinstance(preds, (list, tuple)) or not isinstance(refs, (list, tuple)):
        raise VlmkitError("metrics: predictions and references must be lists")
    if len(preds) != len(refs):
        raise VlmkitError(
            f"metrics: got {len(preds)} predictions but {len(refs)} reference lists; "
            "pass one list of references per prediction"
        )
    if not preds:
        raise VlmkitError("metrics: no predictions to score; pass at least one sample")
    for i, (p, rs) in enumerate(zip(preds, refs)):
        if not isinstance(p, str):
            raise VlmkitError(f"metrics: prediction {i} is {type(p).__name__}, expected str")
        if not isinstance(rs, (list, tuple)) or not rs or not all(isinstance(r, str) for r in rs):
            got = "an empty list" if isinstance(rs, (list, tuple)) and not rs else repr(rs)[:60]
            raise VlmkitError(f"metrics: references[{i}] must be a non-empty list of strings, got {got}")


def _ngrams(words: list[str], n: int) -> Counter:
    """Counts of all 1..n-grams of `words`, keyed by tuple."""
    return Counter(tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def bleu4(preds: list[str], refs: list[list[str]]) -> float:
    """Corpus BLEU-4 as pycocoevalcap's Bleu(4): clipped n-gram counts and lengths summed over the
    corpus, brevity penalty against the 'closest' reference length (ties -> the shorter)."""
    _check(preds, refs)
    # pycocoevalcap adds these to numerator / denominator so a zero count gives ~0, not an error;
    # kept so that scores match it to the last digit.
    tiny, small = 1e-15, 1e-9
    correct, guess = [0] * 4, [0] * 4
    test_len = ref_len = 0
    for pred, rs in zip(preds, refs):
        words = pred.split()
        counts = _ngrams(words, 4)
        ref_words = [r.split() for r in rs]
        max_ref: Counter = Counter()
        for rw in ref_words:
            max_ref |= _ngrams(rw, 4)  # | keeps the max count per n-gram
        for ngram, c in counts.items():
            correct[len(ngram) - 1] += min(c, max_ref[ngram])
        for k in range(4):
            guess[k] += max(0, len(words) - k)
        test_len += len(words)
        ref_len += min((abs(len(rw) - len(words)), len(rw)) for rw in ref_words)[1]
    log_p = sum(math.log((correct[k] + tiny) / (guess[k] + small)) for k in range(4))
    bleu = math.exp(log_p / 4)
    ratio = (test_len + tiny) / (ref_len + small)
    if ratio < 1:
        bleu *= math.exp(1 - 1 / ratio)
    return bleu


def _lcs(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two token lists (O(len(a) * len(b)))."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(preds: list[str], refs: list[list[str]]) -> float:
    """Mean over samples of ROUGE-L F (beta=1.2) from the best precision and best recall over refs."""
    _check(preds, refs)
    beta2 = 1.2**2
    total = 0.0
    for pred, rs in zip(preds, refs):
        # split(" "), not split(): pycocoevalcap does this, so "" is one empty token (no div by zero).
        cand = pred.split(" ")
        prec = rec = 0.0
        for ref in (r.split(" ") for r in rs):
            lcs = _lcs(ref, cand)
            # best precision and best recall may come from different references, as in pycocoevalcap
            prec, rec = max(prec, lcs / len(cand)), max(rec, lcs / len(ref))
        if prec > 0 and rec > 0:
            total += (1 + beta2) * prec * rec / (rec + beta2 * prec)
    return total / len(preds)


def cider_d(preds: list[str], refs: list[list[str]]) -> float:
    """Corpus CIDEr-D as pycocoevalcap's Cider(): per n (1..4), the cosine of tf-idf vectors with the
    prediction's weights clipped at the reference's, times exp(-delta^2 / 2 sigma^2); averaged over
    n and references, x10, then averaged over samples."""
    _check(preds, refs)
    n_max, sigma = 4, 6.0
    ref_counts = [[_ngrams(r.split(), n_max) for r in rs] for rs in refs]
    # Document frequency: in how many samples' reference sets an n-gram occurs.
    df: Counter = Counter()
    for counts in ref_counts:
        df.update(set().union(*counts))
    log_n = math.log(len(refs))

    def vectorize(counts: Counter) -> tuple[list[dict], list[float], int]:
        vec: list[dict] = [{} for _ in range(n_max)]
        for ngram, tf in counts.items():
            # n-grams absent from every reference get df 1, i.e. the largest idf
            vec[len(ngram) - 1][ngram] = tf * (log_n - math.log(max(1, df[ngram])))
        norms = [math.sqrt(sum(w * w for w in v.values())) for v in vec]
        # Length in words. pycocoevalcap counts bigrams (len - 1): the same difference whenever both
        # sides are non-empty, and an empty side has a zero vector, so it scores 0 either way.
        length = sum(counts[g] for g in vec[0])
        return vec, norms, length

    total = 0.0
    for pred, counts in zip(preds, ref_counts):
        vec_h, norm_h, len_h = vectorize(_ngrams(pred.split(), n_max))
        sims = 0.0
        for rc in counts:
            vec_r, norm_r, len_r = vectorize(rc)
            penalty = math.exp(-((len_h - len_r) ** 2) / (2 * sigma**2))
            for n in range(n_max):
                dot = sum(min(w, vec_r[n].get(g, 0.0)) * vec_r[n].get(g, 0.0) for g, w in vec_h[n].items())
                if norm_h[n] != 0 and norm_r[n] != 0:
                    dot /= norm_h[n] * norm_r[n]
                sims += dot * penalty
        total += 10.0 * sims / n_max / len(counts)
    return total / len(preds)


# ----------------------------------------------------------------------------- VQA answers

# Tables and regexes below reproduce the official VQAv2 evaluation script (vqaEval.py).
_VQA_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip
_VQA_NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_VQA_ARTICLES = frozenset(["a", "an", "the"])
_VQA_PUNCT = [
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
]  # fmt: skip
_VQA_COMMA_DIGITS = re.compile(r"(\d)(,)(\d)")
# The official pattern is "(?!<=\d)(\.)(?!\d)": its "(?!<=" is a typo for a lookbehind and never
# fires, so in effect every period not followed by a digit is removed ("3.5" keeps its period).
_VQA_PERIOD = re.compile(r"\.(?!\d)")


def normalize_answer(s: str) -> str:
    """Official VQAv2 answer normalisation: "Two dogs." -> "2 dogs", "a dog" -> "dog", "dont" -> "don't"."""
    s = s.replace("\n", " ").replace("\t", " ").strip()
    # Punctuation: removed outright when it touches a space (or the text has a digit,digit comma,
    # so "1,000" -> "1000"), otherwise replaced by a space ("yes/no" -> "yes no").
    has_digit_comma = _VQA_COMMA_DIGITS.search(s) is not None
    out = s
    for p in _VQA_PUNCT:
        if p + " " in s or " " + p in s or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # count=32: the script passes re.UNICODE (== 32) positionally to sub(), where it is the count.
    out = _VQA_PERIOD.sub("", out, count=32)
    words = [_VQA_NUMBERS.get(w, w) for w in out.lower().split()]
    words = [_VQA_CONTRACTIONS.get(w, w) for w in words if w not in _VQA_ARTICLES]
    return " ".join(words)


def _light(s: str) -> str:
    """Lowercase, collapse whitespace, drop trailing periods."""
    return " ".join(s.lower().split()).rstrip(".").strip()


def exact_match(pred: str, refs: list[str]) -> float:
    """1.0 if `pred` equals any reference after light normalisation (case, spaces, final '.'), else 0.0."""
    p = _light(pred)
    return float(any(p == _light(r) for r in refs))


def vqa_accuracy(pred: str, refs: list[str]) -> float:
    """VQA accuracy min(1, matches / 3) over normalised answers; a single reference needs one match."""
    if not refs:
        raise VlmkitError("vqa_accuracy: no reference answers; pass at least one")
    p = normalize_answer(pred)
    matches = sum(p == normalize_answer(r) for r in refs)
    if len(refs) == 1:
        return float(matches)
    return min(1.0, matches / 3)


# ----------------------------------------------------------------------------- all at once


def score(predictions: list[str], references: list[list[str]]) -> dict:
    """All metrics over a dataset: per-sample means of exact_match / vqa_accuracy, and corpus
    BLEU-4 / ROUGE-L / CIDEr-D on tokenize()'d text."""
    _check(predictions, references)
    n = len(predictions)
    tok_preds = [tokenize(p) for p in predictions]
    tok_refs = [[tokenize(r) for r in rs] for rs in references]
    return {
        "n": n,
        "exact_match": sum(exact_match(p, rs) for p, rs in zip(predictions, references)) / n,
        "vqa_accuracy": sum(vqa_accuracy(p, rs) for p, rs in zip(predictions, references)) / n,
        "bleu4": bleu4(tok_preds, tok_refs),
        "rougeL": rouge_l(tok_preds, tok_refs),
        "cider": cider_d(tok_preds, tok_refs),
    }
