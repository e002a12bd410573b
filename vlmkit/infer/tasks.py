"""Task presets over many images: caption, ask, OCR a folder in batches, resumable.

`run_images` appends one JSON line per image to the output as each batch finishes (flushed and
synced), so a run killed at any moment loses at most the batch in flight; re-running with the same
output skips every image already there. A torn last line (the process died mid-write) is cut off
before resuming. Unreadable images are reported in the summary and skipped, never fatal; they are not
written to the output, so a later run tries them again.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from vlmkit.data.images import load_image
from vlmkit.data.messages import user_turn
from vlmkit.errors import VlmkitError
from vlmkit.io import cut_torn_line

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


@dataclass
class RunSummary:
    done: int = 0  # images answered in this run
    skipped: int = 0  # already in the output from an earlier run
    failed: list[tuple[str, str]] = field(default_factory=list)  # (image, why)

    def text(self, output: str | None) -> str:
        lines = [f"{self.done} images done, {self.skipped} already in {output or 'the output'}, {len(self.failed)} failed"]
        lines += [f"  failed: {why}" for _, why in self.failed]
        return "\n".join(lines)


def collect_images(inputs: list[str]) -> list[Path]:
    """Image files named directly, plus every image under each folder (recursively, sorted)."""
    found: list[Path] = []
    for name in inputs:
        path = Path(name).expanduser()
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not inside:
                raise VlmkitError(f"{path}: no image files in this folder ({', '.join(sorted(IMAGE_EXTENSIONS))})")
            found.extend(inside)
        elif path.exists():
            found.append(path)
        else:
            raise VlmkitError(f"{path}: no such file or folder")
    return list(dict.fromkeys(found))


def read_done(output: Path) -> set[str]:
    """Images already answered in `output`; a torn last line is removed first."""
    if not output.exists():
        return set()
    raw = cut_torn_line(output)  # killed mid-line: the fragment goes, so the file stays valid JSONL
    done = set()
    for line_no, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            done.add(json.loads(line)["image"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise VlmkitError(
                f'{output}:{line_no}: not a result line (JSON with an "image" field); '
                "give another --output or fix the file"
            ) from None
    return done


def run_images(
    vlm,
    images: list[Path],
    prompt: str,
    key: str,
    output: str | None = None,
    batch_size: int = 8,
    extra: dict | None = None,
    **gen,
) -> RunSummary:
    """Ask `prompt` about each image; one `{"image", key, **extra}` JSON line per image to `output`
    (appended, resumable) or to stdout."""
    out = Path(output) if output else None
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
    done = read_done(out) if out is not None else set()
    summary = RunSummary()
    todo = []
    for path in images:
        if str(path) in done:
            summary.skipped += 1
        else:
            todo.append(path)
    sink = open(out, "a", encoding="utf-8") if out is not None else sys.stdout
    try:
        bar = tqdm(total=len(todo), desc=key, unit="image", file=sys.stderr, disable=len(todo) < 2)
        for i in range(0, len(todo), batch_size):
            chunk = todo[i : i + batch_size]
            loaded = []
            for path in chunk:
                try:
                    loaded.append((path, load_image(path)))
                except VlmkitError as e:
                    summary.failed.append((str(path), str(e)))
            if loaded:
                conversations = [user_turn(prompt)] * len(loaded)
                replies = vlm.engine.generate(conversations, [[im] for _, im in loaded], batch_size=len(loaded), **gen)
                lines = [json.dumps({"image": str(p), key: r, **(extra or {})}, ensure_ascii=False) for (p, _), r in zip(loaded, replies)]
                sink.write("".join(line + "\n" for line in lines))
                sink.flush()
                if out is not None:
                    os.fsync(sink.fileno())
                summary.done += len(loaded)
            bar.update(len(chunk))
        bar.close()
    finally:
        if out is not None:
            sink.close()
    return summary
