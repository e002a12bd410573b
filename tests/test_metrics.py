"""Tests for vlmkit.eval.metrics: corpus scores equal pycocoevalcap's, tokenizer and VQA rules hold.

pycocoevalcap is imported only here, as the reference implementation; the tests that need it skip
when it is missing. Expected tokenizations were produced by pycocoevalcap's PTBTokenizer (CoreNLP
3.4.1, Java); one test re-runs it live when Java is available.
"""

import random
import shutil

import pytest

from vlmkit.errors import VlmkitError
from vlmkit.eval.metrics import (
    bleu4,
    cider_d,
    exact_match,
    normalize_answer,
    rouge_l,
    score,
    tokenize,
    vqa_accuracy,
)

# ----------------------------------------------------------------------------- corpora

# Hand-made captions covering the awkward cases: several refs of different lengths, a prediction
# sharing no word with its refs, repeated n-grams, a one-word and an empty prediction, punctuation.
CAPTIONS = [
    ("A man riding a wave on top of a surfboard.",
     ["A man riding a wave on a surfboard.", "A surfer rides a large wave in the ocean.",
      "Man on a surfboard riding a wave"]),
    ("a dog a dog a dog a dog",
     ["A dog is running on the grass.", "A brown dog runs across a grassy field with a dog."]),
    ("purple elephants compute integrals",
     ["Two cats sleeping on a red couch.", "A pair of cats napping on a sofa."]),
    ("A kitchen with a stove.",
     ["A kitchen with stainless steel appliances and a wooden table.", "A small kitchen with a stove",
      "A kitchen that has a stove, an oven and a sink in it.", "An empty kitchen.", "Kitchen."]),
    ("pizza", ["A pizza with pepperoni and cheese on a plate.", "A pizza."]),
    ("", ["A train coming down the tracks.", "A red train at the station."]),
    ("The cat's paw is on the laptop's keyboard (again)!",
     ["A cat's paw on a laptop keyboard.", "A cat lying on top of a laptop computer."]),
    ("Two giraffes standing next to each other in a field.",
     ["Two giraffes standing next to each other in a field.", "Two giraffes in a grassy field."]),
    ("a bus a bus on the street on the street",
     ["A double-decker bus drives down a city street.", "A red bus on the street.",
      "A bus parked on the side of the street next to a bus stop."]),
    ("A plate with a sandwich, fries, and a pickle.",
     ["A sandwich and fries on a white plate.", "A plate of food with a sandwich and french fries."]),
]  # fmt: skip


def random_corpus(seed: int) -> tuple[list[str], list[list[str]]]:
    """A seeded corpus over a small vocabulary, so 1- to 4-grams collide often enough to matter."""
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(rng.choice([4, 8, 20]))]
    n = rng.randint(20, 50)

    def sentence(lo: int) -> str:
        return " ".join(rng.choices(vocab, k=rng.randint(lo, 14)))

    preds = [sentence(0) for _ in range(n)]  # may be empty
    refs = [[sentence(1) for _ in range(rng.randint(1, 5))] for _ in range(n)]
    return preds, refs


def caption_corpus() -> tuple[list[str], list[list[str]]]:
    return [tokenize(p) for p, _ in CAPTIONS], [[tokenize(r) for r in rs] for _, rs in CAPTIONS]


def coco_scores(preds: list[str], refs: list[list[str]]) -> tuple[float, float, float]:
    """(BLEU-4, ROUGE-L, CIDEr-D) from pycocoevalcap on already tokenized text."""
    Bleu = pytest.importorskip("pycocoevalcap.bleu.bleu").Bleu
    Rouge = pytest.importorskip("pycocoevalcap.rouge.rouge").Rouge
    Cider = pytest.importorskip("pycocoevalcap.cider.cider").Cider
    gts = {i: list(rs) for i, rs in enumerate(refs)}
    res = {i: [p] for i, p in enumerate(preds)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    return bleu[3], float(rouge), float(cider)


# ----------------------------------------------------------------------------- corpus metrics


@pytest.mark.parametrize("corpus", ["captions", 0, 1, 2, 3, 4, 5])
def test_corpus_metrics_equal_pycocoevalcap(corpus):
    preds, refs = caption_corpus() if corpus == "captions" else random_corpus(corpus)
    want = coco_scores(preds, refs)
    got = (bleu4(preds, refs), rouge_l(preds, refs), cider_d(preds, refs))
    # BLEU can be ~1e-9 on random text (pycocoevalcap's smoothing), so compare relatively.
    assert got == pytest.approx(want, rel=1e-6, abs=1e-12)
    if corpus == "captions":
        assert min(want) > 0.1  # real 4-gram overlap, not just the smoothing floor


def test_corpus_metrics_are_not_constant():
    preds, refs = caption_corpus()
    perfect = [rs[0] for rs in refs]
    assert bleu4(perfect, refs) == pytest.approx(1.0)
    assert rouge_l(perfect, refs) == pytest.approx(1.0)
    assert cider_d(perfect, refs) > cider_d(preds, refs) > 0
    assert bleu4(perfect, refs) > bleu4(preds, refs)


def test_cider_single_sample_has_zero_idf():
    # With one sample every reference n-gram has idf log(1/1) = 0, as in pycocoevalcap.
    assert cider_d(["a dog runs"], [["a dog runs"]]) == 0.0


def test_empty_text_does_not_crash():
    assert bleu4([""], [["a dog"]]) == 0.0
    assert rouge_l([""], [["a dog"]]) == 0.0
    # pycocoevalcap's Cider raises on max() of an empty document-frequency table here.
    assert cider_d(["", ""], [[""], [""]]) == 0.0
    out = score(["", "."], [["A dog."], ["Two cats."]])
    assert out["n"] == 2 and out["cider"] == 0.0 and out["exact_match"] == 0.0


# ----------------------------------------------------------------------------- tokenizer

PTB_CASES = [
    ("A man riding a wave on top of a surfboard.", "a man riding a wave on top of a surfboard"),
    ("Two dogs' toys, don't \"play\" -- with them!", "two dogs toys do n't play with them"),
    ("The cat's paw is on the laptop's keyboard.", "the cat 's paw is on the laptop 's keyboard"),
    ("A black-and-white photo; 1,000 people at 3.5 km...", "a black-and-white photo 1,000 people at 3.5 km"),
    ("A man (in a hat) rides a bike.", "a man -lrb- in a hat -rrb- rides a bike"),
    ("Is this a giraffe? Yes, it is: a tall one.", "is this a giraffe yes it is a tall one"),
    ("We'll go, I'm here, you'd stay.", "we 'll go i 'm here you 'd stay"),
    ("She can't believe it won't stop", "she ca n't believe it wo n't stop"),
    ("Mr. Jones at the U.S. Open at 12:00pm", "mr. jones at the u.s. open at 12:00 pm"),
    ("a baby elephant?! wow!!", "a baby elephant ?! wow !!"),
    ("A sign reads: 'No Parking'.", "a sign reads no parking"),
    ("50% off $5.00 co/op", "50 % off $ 5.00 co/op"),
    ("  An  old-fashioned\tclock ", "an old-fashioned clock"),
    ("", ""),
]


@pytest.mark.parametrize("text,want", PTB_CASES)
def test_tokenize_matches_ptb(text, want):
    assert tokenize(text) == want


def test_tokenize_lowercases_and_drops_punctuation():
    out = tokenize("Hello, World! Is it OK? Yes: fine; great... -- `quote' \"done\".")
    assert out == "hello world is it ok yes fine great quote done"
    assert tokenize(out) == out  # idempotent on tokenized text


@pytest.mark.skipif(shutil.which("java") is None, reason="needs Java for the real PTBTokenizer")
def test_tokenize_matches_live_ptbtokenizer():
    ptb = pytest.importorskip("pycocoevalcap.tokenizer.ptbtokenizer")
    texts = [t for t, _ in PTB_CASES if t.strip()] + [p for p, _ in CAPTIONS if p]
    texts += [r for _, rs in CAPTIONS for r in rs]
    want = ptb.PTBTokenizer().tokenize({i: [{"caption": t}] for i, t in enumerate(texts)})
    assert [tokenize(t) for t in texts] == [want[i][0] for i in range(len(texts))]


# ----------------------------------------------------------------------------- VQA


@pytest.mark.parametrize(
    "raw,want",
    [
        ("Two", "2"),
        ("none", "0"),
        ("ten.", "10"),
        ("a dog.", "dog"),
        ("The Dog's", "dog's"),
        ("dont", "don't"),
        ("1,000", "1000"),  # a digit,digit comma makes all punctuation vanish rather than become spaces
        ("yes/no", "yes no"),  # punctuation not touching a space becomes a space
        ("yes / no", "yes no"),
        ("3.5", "3.5"),  # a period before a digit is kept
        ("Yes!", "yes"),
        (" red\tand\nblue ", "red and blue"),
    ],
)
def test_normalize_answer_official_rules(raw, want):
    assert normalize_answer(raw) == want


def test_vqa_accuracy_by_number_of_refs():
    assert vqa_accuracy("Two", ["2"]) == 1.0
    assert vqa_accuracy("3", ["2"]) == 0.0
    assert vqa_accuracy("two", ["2", "2"]) == pytest.approx(2 / 3)
    assert vqa_accuracy("two", ["2", "3"]) == pytest.approx(1 / 3)
    assert vqa_accuracy("a dog", ["dog", "Dog.", "the dog"]) == 1.0
    ten = ["yes"] * 4 + ["no"] * 2 + ["maybe"] * 4
    assert vqa_accuracy("Yes", ten) == 1.0
    assert vqa_accuracy("no", ten) == pytest.approx(2 / 3)
    assert vqa_accuracy("purple", ten) == 0.0


def test_exact_match():
    assert exact_match("A  Dog.", ["a dog"]) == 1.0
    assert exact_match(" dog ", ["cat", "DOG..."]) == 1.0
    assert exact_match("dogs", ["dog"]) == 0.0
    assert exact_match("two", ["2"]) == 0.0  # no number-word mapping: that is vqa_accuracy's job


# ----------------------------------------------------------------------------- score()


def test_score_keys_and_values():
    preds = ["Two", "A red bus on the street.", "cat"]
    refs = [["2", "two"], ["A red bus on the street", "A bus."], ["dog"]]
    out = score(preds, refs)
    assert set(out) == {"n", "exact_match", "vqa_accuracy", "bleu4", "rougeL", "cider"}
    assert out["n"] == 3
    assert out["exact_match"] == pytest.approx(2 / 3)  # "Two" == "two", the bus caption
    assert out["vqa_accuracy"] == pytest.approx((2 / 3 + 1 / 3 + 0) / 3)
    tp, tr = [tokenize(p) for p in preds], [[tokenize(r) for r in rs] for rs in refs]
    assert out["bleu4"] == bleu4(tp, tr)
    assert out["rougeL"] == rouge_l(tp, tr)
    assert out["cider"] == cider_d(tp, tr)


@pytest.mark.parametrize(
    "preds,refs,match",
    [
        (["a"], [["a"], ["b"]], "1 predictions but 2"),
        ([], [], "no predictions"),
        (["a"], ["a"], r"references\[0\]"),
        (["a"], [[]], r"references\[0\]"),
        ([None], [["a"]], "prediction 0"),
    ],
)
def test_score_rejects_bad_input(preds, refs, match):
    with pytest.raises(VlmkitError, match=match) as err:
        score(preds, refs)
    assert "\n" not in str(err.value)
