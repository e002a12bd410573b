"""Image-caption pairs for contrastive training and retrieval, read from vlmkit's JSONL data files.

A row gives one image and its caption(s), in any of these forms:

    {"messages": [{"role": "user", "content": [{"type": "image"}, ...]},
                  {"role": "assistant", "content": "a red circle."}], "images": ["a.png"]}   (the last reply)
    {"image": "a.png", "caption": "a red circle."}
    {"image": "a.png", "captions": ["a red circle.", "one red round shape."]}

A chat (or LLaVA) row's caption is the text of its last assistant turn. An image may appear in several
rows: its captions add up. Every problem is reported with its file, line and field (an empty caption, a
row with no image or two, a missing image file), all at once, as the chat format does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from vlmkit.data.rows import Reporter, check_data_file, kind_of, parse_rows, raise_problems
from vlmkit.data.schema import _parse_row, _resolve_all


@dataclass(frozen=True)
class Pair:
    """One (image, caption) pair; `where` is FILE:LINE."""

    image: str
    caption: str
    where: str


def caption_key(caption: str) -> str:
    """Captions that differ only in case, spacing or a final period are the same caption."""
    return " ".join(caption.lower().split()).rstrip(".").strip()


def read_pairs(path: str | os.PathLike, check_images: bool = False) -> list[Pair]:
    """Every (image, caption) pair of a data file, in file order; raises `VlmkitError` listing the problems."""
    path = Path(path)
    base_dir, problem = check_data_file(path, None, "data file", "use .jsonl (one image and caption a line) or .json")
    if problem:
        raise_problems([problem])
    rows, problems, n_rows = parse_rows(path, base_dir, _parse, check_images)
    if n_rows == 0 and not problems:
        problems.append(f"{path}: no samples (the file is empty); add one image and caption per line")
    raise_problems(problems, list_all=True)
    return [Pair(str(images[0]), caption, f"{path}:{line}") for line, captions, images in rows for caption in captions]


def _parse(obj, base_dir: Path, report: Reporter):
    """(captions, [(field, image path)]) for one row, or None with the problems reported."""
    if isinstance(obj, dict) and ("caption" in obj or "captions" in obj):
        return _parse_plain(obj, base_dir, report)
    parsed = _parse_row(obj, base_dir, report, require_assistant=True)
    if parsed is None:
        return None
    messages, images = parsed
    if len(images) != 1:
        report("images", f"{len(images)} images; a caption row holds exactly one image")
        return None
    replies = [(i, m) for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not replies:
        return None  # reported by _parse_row
    i, last = replies[-1]
    caption = "".join(p["text"] for p in last["content"] if p["type"] == "text").strip()
    if not caption:
        report(f"messages[{i}].content", "the caption (the last assistant reply) is empty; write the caption")
        return None
    return [caption], images


def _parse_plain(obj: dict, base_dir: Path, report: Reporter):
    if "caption" in obj and "captions" in obj:
        report("caption", "both `caption` and `captions` are given; keep one")
        return None
    field = "caption" if "caption" in obj else "captions"
    raw = obj[field]
    listed = [raw] if field == "caption" else raw
    if not isinstance(listed, list) or not listed:
        report(field, f"expected a non-empty list of strings, got {kind_of(raw)}; give [\"a caption\", ...]")
        return None
    captions = []
    for k, text in enumerate(listed):
        name = field if field == "caption" else f"captions[{k}]"
        if not isinstance(text, str) or not text.strip():
            got = "is empty" if isinstance(text, str) else f"expected a string, got {kind_of(text)}"
            report(name, f"{got}; write the caption")
            return None
        captions.append(text.strip())
    image = obj.get("image", obj.get("images"))
    if isinstance(image, list) and len(image) == 1:
        image = image[0]
    if not isinstance(image, str):
        report("image", f"expected one image path, got {kind_of(image)}; give \"image\": \"path.png\"")
        return None
    resolved = _resolve_all([("image", image)], base_dir, report)
    return None if resolved is None else (captions, resolved)
