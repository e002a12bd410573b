"""Automatic quality control of a teacher's replies: each filter a pure function that returns the reason
to drop a reply (a short name recorded in the manifest) or None to keep it.

Per reply: `empty`, `too_short` / `too_long` (in words, per task), `refusal` ("I can't see the image"),
`repetition` (a generation loop: one phrase making up most of a long reply), `non_text` (mostly symbols,
control characters or undecodable bytes), `low_similarity` (with `--scorer`: the image-text similarity a
dual encoder gives the reply is below the threshold; `scorer.py` computes it). Per group of replies to the same image and prompt:
`disagrees` / `no_agreement` (self-consistency of sampled QA answers: the majority answer is kept, the
others dropped; with no majority all are dropped), and `duplicate` (the same text again for the same
image, by content hash, and prompt). `judge` applies them all and lists every reason that holds.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field

from vlmkit.errors import VlmkitError

REASONS = ("empty", "too_short", "too_long", "refusal", "repetition", "non_text", "low_similarity", "disagrees", "no_agreement", "duplicate",
           "no_questions")  # the last: the teacher proposed no question about the image

# Phrases a model uses to decline or to claim it cannot see the image; matched case-insensitively.
REFUSALS = (
    r"\bI (?:can(?:no|')t|am unable to|'m unable to|am not able to|'m not able to) (?:see|view|access|open|tell|determine|help|assist|describe|answer|identify|read)",
    r"\b(?:there is|there's) no image\b",
    r"\bno image (?:was |is )?(?:provided|attached|uploaded|shown)\b",
    r"\bAs an AI\b",
    r"\bI(?:'m| am) sorry\b",
    r"\bI apologi[sz]e\b",
    r"\bunable to (?:see|view|process) (?:the|this|an) image\b",
)
_REFUSAL = re.compile("|".join(REFUSALS), re.IGNORECASE)
_WORD = re.compile(r"\w+", re.UNICODE)
_ARTICLES = {"a", "an", "the"}


@dataclass(frozen=True)
class Filters:
    """Thresholds of the automatic filters; `min_words` / `max_words` per task (a task not listed uses
    the "default" entry)."""

    min_words: dict = field(default_factory=lambda: {"caption": 3, "default": 1})
    max_words: dict = field(default_factory=lambda: {"ocr": 1000, "default": 300})
    min_agreement: float = 0.5  # self-consistency: the majority answer's share must be above this
    repetition_share: float = 0.5  # a repeated n-gram covering more than this share of a long reply
    min_text_share: float = 0.6  # letters, digits, spaces and common punctuation, at least this share

    @classmethod
    def of(cls, min_words: int | None = None, max_words: int | None = None, min_agreement: float = 0.5) -> "Filters":
        """The defaults, with one word limit for every task where given (the command line's flags)."""
        if not 0 <= min_agreement < 1:
            raise VlmkitError(f"--min-agreement {min_agreement}: give a share from 0 to below 1")
        base = cls()
        return cls(min_words={"default": min_words} if min_words is not None else base.min_words,
                   max_words={"default": max_words} if max_words is not None else base.max_words,
                   min_agreement=min_agreement)

    def bounds(self, task: str) -> tuple[int, int]:
        return (self.min_words.get(task, self.min_words.get("default", 1)),
                self.max_words.get(task, self.max_words.get("default", 300)))

    def as_dict(self) -> dict:
        return {"min_words": dict(self.min_words), "max_words": dict(self.max_words), "min_agreement": self.min_agreement,
                "repetition_share": self.repetition_share, "min_text_share": self.min_text_share}


# -- one reply ---------------------------------------------------------------------------------------
def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def empty(text: str) -> str | None:
    return "empty" if not text.strip() else None


def length(text: str, min_words: int, max_words: int) -> str | None:
    n = len(words(text))
    if not text.strip():
        return None  # `empty` says it
    if n < min_words:
        return "too_short"
    if n > max_words:
        return "too_long"
    return None


def refusal(text: str) -> str | None:
    return "refusal" if _REFUSAL.search(text) else None


def repetition(text: str, share: float = 0.5, min_words: int = 8) -> str | None:
    """A loop: some n-gram (n = 1..8) repeated at least 4 times covers more than `share` of the words, or
    a character sequence repeats back to back to the end of a reply with few words (a loop of symbols)."""
    tokens = words(text)
    if len(tokens) >= min_words:
        for n in range(1, 9):
            grams = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
            if not grams:
                break
            count = grams.most_common(1)[0][1]
            if count >= 4 and count * n / len(tokens) > share:
                return "repetition"
    if re.search(r"(.{2,20}?)\1{5,}\s*$", text.strip(), re.DOTALL):
        return "repetition"
    return None


def non_text(text: str, min_share: float = 0.6) -> str | None:
    """Mostly not text: undecodable bytes (U+FFFD), control characters, or under `min_share` of letters,
    digits, spaces and punctuation."""
    stripped = text.strip()
    if not stripped:
        return None
    if "\ufffd" in stripped or any(unicodedata.category(c) == "Cc" and c not in "\n\t\r" for c in stripped):
        return "non_text"
    texty = sum(1 for c in stripped if c.isalnum() or c.isspace() or c in ".,;:!?'\"-()%/&")
    return "non_text" if texty / len(stripped) < min_share else None


def low_similarity(similarity: float | None, min_similarity: float | None) -> str | None:
    """"low_similarity" if the reply's image-text similarity is below `min_similarity` (None: not scored)."""
    if similarity is None or min_similarity is None:
        return None
    return "low_similarity" if similarity < min_similarity else None


def reply_reasons(text: str, task: str, filters: Filters) -> list[str]:
    """Every per-reply reason to drop `text`, in the order of `REASONS`."""
    lo, hi = filters.bounds(task)
    found = [empty(text), length(text, lo, hi), refusal(text), repetition(text, filters.repetition_share),
             non_text(text, filters.min_text_share)]
    return [r for r in found if r]


# -- a group of replies -------------------------------------------------------------------------------
def answer_key(text: str) -> str:
    """An answer as self-consistency compares it: lower case, words only, without articles."""
    return " ".join(w for w in words(text) if w not in _ARTICLES)


def consistency(answers: list[str], min_agreement: float = 0.5) -> list[str | None]:
    """Self-consistency of sampled answers to one question: None for each answer equal to the majority
    answer, "disagrees" for the others; if the majority's share is not above `min_agreement`, every
    answer is "no_agreement". One answer has nothing to agree with and is kept."""
    if len(answers) < 2:
        return [None] * len(answers)
    keys = [answer_key(a) for a in answers]
    top, count = Counter(keys).most_common(1)[0]
    if count / len(keys) <= min_agreement:
        return ["no_agreement"] * len(keys)
    return [None if k == top else "disagrees" for k in keys]


def duplicate_key(sha256: str, prompt: str, text: str) -> tuple[str, str, str]:
    """What makes two replies duplicates: the same image content, the same prompt, the same words."""
    return sha256, prompt, " ".join(text.lower().split())


def duplicate(key: tuple, seen: set) -> str | None:
    """"duplicate" if `key` was seen before; adds it to `seen`."""
    if key in seen:
        return "duplicate"
    seen.add(key)
    return None


def judge(replies: list[str], task: str, sha256: str, prompt: str, self_consistent: bool, filters: Filters,
          seen: set, similarities: list[float | None] | None = None, min_similarity: float | None = None) -> list[list[str]]:
    """The reasons to drop each of the replies to one (image, prompt): per reply (with their image-text
    `similarities`, when scored), then self-consistency (when asked), then duplicates against `seen` (updated)."""
    reasons = [reply_reasons(r, task, filters) for r in replies]
    for found, similarity in zip(reasons, similarities or []):
        low = low_similarity(similarity, min_similarity)
        if low:
            found.append(low)
    if self_consistent:
        for found, verdict in zip(reasons, consistency(replies, filters.min_agreement)):
            if verdict:
                found.append(verdict)
    for found, reply in zip(reasons, replies):
        dup = duplicate(duplicate_key(sha256, prompt, reply), seen)
        if dup:
            found.append(dup)
    return reasons
