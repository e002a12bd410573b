"""The files of a distilled dataset and how they stay whole: the manifest, the reviews, and the two
datasets made from them.

    OUT/manifest.jsonl     one record per generated pair (appended, image by image, fsynced)
    OUT/reviews.jsonl      one line per review action (appended, fsynced; the last word on a pair wins)
    OUT/data.jsonl         vlmkit's chat format: the kept pairs, minus rejected ones, edits applied
    OUT/preferences.jsonl  TRL preference rows from pairwise choices, for `method=dpo`

A manifest record:

    {"id": "3f1c0d2b9a7e4c11", "image": "/abs/img.png", "sha256": "...", "task": "qa",
     "prompt": "What colour is it?", "sample": 0, "of": 6, "teacher": {"id": "runs/t", "temperature": 0.7, ...},
     "reply": "red", "status": "kept", "reasons": []}

With `--scorer`, a record also holds its image-text `similarity` (`scorer.py`). `of` is how many records the image has: all of them are written in one append, and an image with fewer
(a run killed mid-write) is removed on the next start and done again. A torn last line (killed mid-line)
is cut off first. The two datasets are rewritten whole (temporary file, rename) from the manifest and the
reviews, so they are never half written and can always be made again.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from vlmkit.errors import VlmkitError
from vlmkit.io import atomic_write, cut_torn_line

MANIFEST, REVIEWS, DATA, PREFERENCES = "manifest.jsonl", "reviews.jsonl", "data.jsonl", "preferences.jsonl"
ACTIONS = ("accept", "edit", "reject")


def pair_id(image: str, task: str, prompt: str, sample: int) -> str:
    return hashlib.sha256(json.dumps([image, task, prompt, sample]).encode()).hexdigest()[:16]


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_lines(path: Path, what: str) -> list[dict]:
    """The JSON lines of `path` (none if it does not exist); a torn last line is cut off the file first."""
    if not path.exists():
        return []
    raw = cut_torn_line(path)
    rows = []
    for line_no, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict):
            raise VlmkitError(f"{path}:{line_no}: not a {what} line (a JSON object); give another --output or fix the file")
        rows.append(row)
    return rows


def append_lines(path: Path, rows: list[dict]) -> None:
    """Append rows in one write and sync them to disk: a kill loses at most this write."""
    if not rows:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        f.flush()
        os.fsync(f.fileno())


def load_manifest(out: Path) -> list[dict]:
    """The manifest's records; an image whose records are not all there is removed from the file."""
    path = out / MANIFEST
    records = read_lines(path, "manifest")
    for k, r in enumerate(records, 1):
        missing = [key for key in ("id", "image", "of", "reply", "status") if key not in r]
        if missing:
            raise VlmkitError(f"{path}:{k}: record without {', '.join(missing)}; give another --output or fix the file")
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(r["image"], []).append(r)
    partial = {image for image, group in groups.items() if any(r["of"] != len(group) for r in group)}
    if partial:
        print(f"{path}: {len(partial)} image(s) interrupted mid-write; they are done again", file=sys.stderr)
        records = [r for r in records if r["image"] not in partial]
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return records


def load_reviews(out: Path) -> list[dict]:
    return read_lines(out / REVIEWS, "review")


def save_review(out: Path, action: dict) -> None:
    append_lines(out / REVIEWS, [action])


def decisions(reviews: list[dict]) -> dict[str, dict]:
    """The last accept / edit / reject of each pair, by id."""
    return {r["id"]: r for r in reviews if r.get("action") in ACTIONS}


def choices(reviews: list[dict]) -> dict[tuple[str, str], dict]:
    """The last pairwise choice (or skip) of each two replies, by their ids in sorted order."""
    return {tuple(sorted(r["pair"])): r for r in reviews if r.get("action") in ("prefer", "skip")}


def user_prompt(prompt: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]


def chat_row(record: dict, reply: str) -> dict:
    return {"messages": user_prompt(record["prompt"]) + [{"role": "assistant", "content": [{"type": "text", "text": reply}]}],
            "images": [record["image"]]}


def dataset_rows(records: list[dict], reviews: list[dict]) -> list[dict]:
    """data.jsonl: every pair the filters kept or a reviewer accepted, unless a reviewer rejected it; an
    edit replaces the reply (and keeps the pair)."""
    decided = decisions(reviews)
    rows = []
    for r in records:
        review = decided.get(r["id"])
        action = review["action"] if review else None
        if action == "reject" or (action is None and r["status"] != "kept"):
            continue
        rows.append(chat_row(r, review["text"] if action == "edit" else r["reply"]))
    return rows


def preference_rows(records: list[dict], reviews: list[dict]) -> list[dict]:
    """preferences.jsonl: one TRL row per pairwise choice, the chosen reply (as edited, if it was) first."""
    by_id = {r["id"]: r for r in records}
    decided = decisions(reviews)
    rows = []
    for choice in choices(reviews).values():
        if choice["action"] != "prefer" or choice["chosen"] not in by_id or choice["rejected"] not in by_id:
            continue
        chosen, rejected = by_id[choice["chosen"]], by_id[choice["rejected"]]
        text = lambda r: decided[r["id"]]["text"] if decided.get(r["id"], {}).get("action") == "edit" else r["reply"]  # noqa: E731
        rows.append({"prompt": user_prompt(chosen["prompt"]), "chosen": [{"role": "assistant", "content": text(chosen)}],
                     "rejected": [{"role": "assistant", "content": text(rejected)}], "images": [chosen["image"]]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def export(out: Path, records: list[dict] | None = None) -> tuple[int, int]:
    """Rewrite data.jsonl (and preferences.jsonl, when there are choices) from the manifest and the
    reviews; returns (dataset rows, preference rows)."""
    records = load_manifest(out) if records is None else records
    reviews = load_reviews(out)
    data = dataset_rows(records, reviews)
    write_jsonl(out / DATA, data)
    prefs = preference_rows(records, reviews)
    if prefs or (out / PREFERENCES).exists():
        write_jsonl(out / PREFERENCES, prefs)
    return len(data), len(prefs)
