"""What a distillation produced, at a glance: `OUT/summary.json` (pairs kept and dropped, per reason, and
the unreadable images) and `OUT/sheet.html`, a contact sheet of a random sample of pairs, each image
beside the teacher's text and its verdict, in one self-contained file (thumbnails inlined).
"""

from __future__ import annotations

import base64
import html
import io
import json
import random
from collections import Counter
from pathlib import Path

from vlmkit.data.images import load_image
from vlmkit.distill.filters import REASONS
from vlmkit.errors import VlmkitError
from vlmkit.io import atomic_write_text

SUMMARY, SHEET = "summary.json", "sheet.html"


def summarise(out: Path, records: list[dict], unreadable: list[tuple[str, str]]) -> dict:
    """Counts over the whole manifest (earlier runs included); the unreadable images are this run's."""
    dropped = Counter(reason for r in records for reason in r["reasons"])
    summary = {
        "images": len({r["image"] for r in records}),
        "pairs": len(records),
        "kept": sum(r["status"] == "kept" for r in records),
        "dropped": sum(r["status"] != "kept" for r in records),
        "dropped_by_reason": {reason: dropped[reason] for reason in REASONS if dropped[reason]},
        "by_task": {task: {"kept": sum(r["status"] == "kept" for r in records if r["task"] == task),
                           "pairs": sum(r["task"] == task for r in records)}
                    for task in sorted({r["task"] for r in records})},
        "unreadable": [{"image": image, "why": why} for image, why in unreadable],
    }
    atomic_write_text(out / SUMMARY, json.dumps(summary, indent=2) + "\n")
    return summary


def summary_text(summary: dict, out: Path) -> str:
    lines = [f"{summary['images']} images, {summary['pairs']} pairs: {summary['kept']} kept, {summary['dropped']} dropped"]
    lines += [f"  dropped {reason}: {n}" for reason, n in summary["dropped_by_reason"].items()]
    lines += [f"  unreadable, skipped: {u['why']}" for u in summary["unreadable"]]
    lines.append(f"data: {out / 'data.jsonl'}  manifest: {out / 'manifest.jsonl'}  contact sheet: {out / SHEET}")
    return "\n".join(lines)


def thumbnail(path: str, size: int = 192) -> str:
    """An image as a small inline PNG (a `data:` URL); a placeholder if it no longer loads."""
    try:
        image = load_image(path)
    except VlmkitError:
        return ""
    image.thumbnail((size, size))
    if max(image.size) < size // 2:  # tiny images (icons, test scenes) shown larger, pixels kept sharp
        scale = (size // 2) // max(image.size)
        image = image.resize((image.width * scale, image.height * scale), resample=0)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def write_sheet(out: Path, records: list[dict], size: int = 48, seed: int = 0) -> Path:
    """A random sample of `size` pairs (kept and dropped), each as a card: image, prompt, reply, verdict."""
    pairs = [r for r in records if r["task"] != "none"]
    sample = random.Random(seed).sample(pairs, min(size, len(pairs)))
    thumbs: dict[str, str] = {}
    cards = []
    for r in sample:
        if r["image"] not in thumbs:
            thumbs[r["image"]] = thumbnail(r["image"])
        verdict = "kept" if r["status"] == "kept" else "dropped: " + ", ".join(r["reasons"])
        if r.get("similarity") is not None:
            verdict += f" (similarity {r['similarity']:.3f})"
        cards.append(
            f'<div class="card {html.escape(r["status"])}"><img src="{thumbs[r["image"]]}" alt="">'
            f'<div class="name">{html.escape(Path(r["image"]).name)}</div>'
            f'<div class="prompt">{html.escape(r["prompt"])}</div>'
            f'<div class="reply">{html.escape(r["reply"]) or "<i>(empty)</i>"}</div>'
            f'<div class="verdict">{html.escape(verdict)}</div></div>'
        )
    kept = sum(r["status"] == "kept" for r in records)
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>vlmkit distill: {html.escape(out.name)}</title>
<style>
body {{font-family: sans-serif; margin: 1em}} .grid {{display: flex; flex-wrap: wrap; gap: 10px}}
.card {{width: 220px; border: 2px solid #8c8; border-radius: 6px; padding: 6px; font-size: 13px}}
.card.dropped {{border-color: #d88; background: #fff4f4}} .card img {{max-width: 208px; image-rendering: pixelated}}
.name {{color: #666; font-size: 11px}} .prompt {{font-weight: bold; margin: 4px 0}} .reply {{white-space: pre-wrap}}
.verdict {{margin-top: 4px; color: #555; font-style: italic}}
</style></head><body>
<h3>{len(sample)} random pairs of {len(records)} ({kept} kept)</h3>
<div class="grid">
{chr(10).join(cards)}
</div></body></html>
"""
    atomic_write_text(out / SHEET, page)
    return out / SHEET
