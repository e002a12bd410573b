"""`vlmkit review`'s logic, without Gradio: a person goes through the kept pairs of a distilled folder
(accept, edit or reject each) and through pairs of different replies to the same image and prompt (pick
the better one), and every action is saved the moment it is made.

An action is one line appended to `OUT/reviews.jsonl` and synced to disk; then `OUT/data.jsonl` and
`OUT/preferences.jsonl` are rewritten from the manifest and all the reviews (`manifest.export`). A
review killed at any moment loses nothing: opening the folder again rewrites both files and starts at
the first pair not yet reviewed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

from vlmkit.distill import manifest as mf
from vlmkit.errors import VlmkitError

PAIRS_PER_PROMPT = 3  # pairwise questions asked about one (image, prompt) at most


@dataclass(frozen=True)
class Item:
    """One pair to review, as the page shows it."""

    index: int
    record: dict
    decision: dict | None  # the last accept / edit / reject, if any

    @property
    def text(self) -> str:
        return self.decision["text"] if self.decision and self.decision["action"] == "edit" else self.record["reply"]

    @property
    def verdict(self) -> str:
        if not self.decision:
            return "not reviewed yet"
        return {"accept": "accepted", "edit": "edited and kept", "reject": "rejected"}[self.decision["action"]]


def pairwise_candidates(records: list[dict]) -> list[tuple[dict, dict]]:
    """Two different non-empty replies to the same image and prompt (the first record of each distinct
    text), at most `PAIRS_PER_PROMPT` pairs per prompt, in manifest order."""
    groups: dict[tuple, dict[str, dict]] = {}
    for r in records:
        text = " ".join(r["reply"].lower().split())
        if text and r["task"] != "none":
            groups.setdefault((r["image"], r["task"], r["prompt"]), {}).setdefault(text, r)
    pairs = []
    for distinct in groups.values():
        pairs += list(combinations(distinct.values(), 2))[:PAIRS_PER_PROMPT]
    return pairs


class Review:
    """The review of one distilled folder."""

    def __init__(self, folder: str | Path):
        self.out = Path(folder)
        if not (self.out / mf.MANIFEST).is_file():
            raise VlmkitError(f"{folder}: no {mf.MANIFEST} here; give the --output folder of `vlmkit distill`")
        self.records = mf.load_manifest(self.out)
        self.reviews = mf.load_reviews(self.out)
        self.items = [r for r in self.records if r["status"] == "kept"]
        self.pairs = pairwise_candidates(self.records)
        mf.export(self.out, self.records)  # an action saved just before a kill is in the datasets too

    # -- accept / edit / reject ----------------------------------------------------------------------
    def item(self, index: int) -> Item | None:
        if not 0 <= index < len(self.items):
            return None
        record = self.items[index]
        return Item(index, record, mf.decisions(self.reviews).get(record["id"]))

    def first_open(self) -> int:
        """The first pair without a decision (len(items) when all have one)."""
        decided = mf.decisions(self.reviews)
        return next((k for k, r in enumerate(self.items) if r["id"] not in decided), len(self.items))

    def act(self, index: int, action: str, text: str | None = None) -> int:
        """Save an accept / edit / reject of pair `index`; an edit that changes nothing is an accept.
        Returns the index to show next."""
        item = self.item(index)
        if item is None or action not in mf.ACTIONS:
            return index
        row = {"id": item.record["id"], "action": action, "time": round(time.time(), 3)}
        if action == "edit":
            text = (text or "").strip()
            if not text:
                raise VlmkitError("the edited text is empty; write the reply, or reject the pair")
            if text == item.record["reply"]:
                row["action"] = "accept"
            else:
                row["text"] = text
        self._save(row)
        return min(index + 1, len(self.items))

    def progress(self) -> str:
        decided = mf.decisions(self.reviews)
        mine = [decided[r["id"]]["action"] for r in self.items if r["id"] in decided]
        counts = ", ".join(f"{mine.count(a)} {w}" for a, w in (("accept", "accepted"), ("edit", "edited"), ("reject", "rejected")))
        return f"{len(mine)} of {len(self.items)} reviewed ({counts})"

    # -- pairwise ------------------------------------------------------------------------------------
    def pair(self, index: int) -> tuple[dict, dict] | None:
        return self.pairs[index] if 0 <= index < len(self.pairs) else None

    def text(self, record: dict) -> str:
        """A reply as it stands: the reviewer's edit if there is one."""
        decision = mf.decisions(self.reviews).get(record["id"])
        return decision["text"] if decision and decision["action"] == "edit" else record["reply"]

    def first_open_pair(self) -> int:
        chosen = mf.choices(self.reviews)
        return next((k for k, (a, b) in enumerate(self.pairs) if tuple(sorted((a["id"], b["id"]))) not in chosen), len(self.pairs))

    def choose(self, index: int, better: str) -> int:
        """Save the choice of pair `index`: "a" or "b" is better, or "skip" (neither); returns the next index."""
        pair = self.pair(index)
        if pair is None or better not in ("a", "b", "skip"):
            return index
        a, b = pair
        row = {"pair": [a["id"], b["id"]], "action": "skip" if better == "skip" else "prefer", "time": round(time.time(), 3)}
        if better != "skip":
            chosen, rejected = (a, b) if better == "a" else (b, a)
            row.update(chosen=chosen["id"], rejected=rejected["id"])
        self._save(row)
        return min(index + 1, len(self.pairs))

    def pair_progress(self) -> str:
        chosen = mf.choices(self.reviews)
        done = [chosen[k] for k in (tuple(sorted((a["id"], b["id"]))) for a, b in self.pairs) if k in chosen]
        prefer = sum(c["action"] == "prefer" for c in done)
        return f"{len(done)} of {len(self.pairs)} pairs judged ({prefer} preferences, {len(done) - prefer} skipped)"

    def _save(self, row: dict) -> None:
        mf.save_review(self.out, row)  # first, synced: this is what survives a kill
        self.reviews.append(row)
        mf.export(self.out, self.records)
