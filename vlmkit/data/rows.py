"""Reading a data file row by row, with every problem reported: the machinery both data formats share.

`check_data_file` checks the file before any row is read; `parse_rows` runs a format's row parser on each
JSONL line (or JSON list item), checks each image it names once, and collects problems, one line each
with FILE:LINE and the field (`Reporter`). `raise_problems` turns them into the one `VlmkitError` a
loader raises. The chat format (`schema.py`) and the preference format (`preferences.py`) build on this.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from vlmkit.data.images import check_image
from vlmkit.errors import VlmkitError

MISSING = object()
MAX_LISTED = 20  # problems spelled out in one error when there is no check command to list them



def check_data_file(
    path: Path, image_root: str | os.PathLike | None, what: str, formats: str
) -> tuple[Path, str | None]:
    """Check that `path` is a readable .jsonl/.json file before any row is read.

    Returns (the folder relative image paths resolve against, None) or (_, one problem line naming the
    file, what is wrong and what to do). `what` names the file in messages ("data file"); `formats` is
    the advice for a wrong extension.
    """
    src = str(path)
    base_dir = Path(os.path.abspath(Path(image_root).expanduser() if image_root else path.parent))
    if not path.exists():
        return base_dir, f"{src}: {what} not found; check the path"
    if path.is_dir():
        return base_dir, f"{src}: is a folder; give the .jsonl or .json {what} inside it"
    if path.suffix.lower() not in (".jsonl", ".json"):
        return base_dir, f"{src}: unsupported extension {path.suffix.lower() or '(none)'!r}; {formats}"
    if image_root is not None and not base_dir.is_dir():
        return base_dir, f"{src}: image root {base_dir} is not a folder; check the image root path"
    return base_dir, None


def parse_rows(path: Path, base_dir: Path, parse, check_images: bool):
    """Run `parse(obj, base_dir, report)` on every row of a data file and check the images it names.

    `parse` returns (value, [(field, image path)]) or None after reporting problems. Each image is
    checked once however many rows share it. Returns ([(line, value, image paths)], problems, rows read).
    """
    src = str(path)
    out, problems, n_rows = [], [], 0
    seen: dict[Path, str | None] = {}  # image path -> problem
    for line, obj, problem in _rows(path):
        if problem is not None:
            problems.append(problem)
            continue
        n_rows += 1
        report = Reporter(f"{src}:{line}")
        parsed = parse(obj, base_dir, report)
        if parsed is not None:
            for field, image in parsed[1]:
                if image not in seen:
                    seen[image] = image_problem(image, base_dir, check_images)
                if seen[image] is not None:
                    report(field, seen[image])
        if report.problems:
            problems.extend(report.problems)
        elif parsed is not None:
            out.append((line, parsed[0], tuple(p for _, p in parsed[1])))
    return out, problems, n_rows


def _rows(path: Path):
    """Yield (line, object, None) per row, or (line, None, problem) for a row that is not JSON."""
    src = str(path)
    raw = path.read_bytes().removeprefix(b"\xef\xbb\xbf")  # a BOM that an editor added
    if not raw.strip():
        return
    is_json = path.suffix.lower() == ".json"
    if is_json or raw.lstrip().startswith(b"["):
        # A .json file, or a .jsonl that is really one pretty-printed list (a common mix-up).
        try:
            data = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            yield 1, None, f"{src}: not UTF-8 text ({e.reason} at byte {e.start}); save the file as UTF-8"
            return
        except json.JSONDecodeError as e:
            if is_json:
                yield e.lineno, None, f"{src}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno}); fix the syntax"
                return
            data = None  # a .jsonl after all: read it line by line and report each bad line
        if isinstance(data, list):
            yield from ((i, obj, None) for i, obj in enumerate(data, start=1))
            return
        if is_json:
            if isinstance(data, dict) and ("messages" in data or "conversations" in data):
                yield 1, data, None  # one conversation on its own
            else:
                yield 1, None, (
                    f"{src}:1: expected a JSON list of samples, got {kind_of(data)}; "
                    "wrap the samples in [...] or use .jsonl with one sample a line"
                )
            return
    for n, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line.decode("utf-8")), None
        except UnicodeDecodeError as e:
            yield n, None, f"{src}:{n}: not UTF-8 text ({e.reason} at byte {e.start}); save the file as UTF-8"
        except json.JSONDecodeError as e:
            yield n, None, (
                f"{src}:{n}: invalid JSON ({e.msg} at column {e.colno}); "
                "fix the line so it holds exactly one JSON object"
            )


class Reporter:
    """Collects one-line problems for one row, each prefixed with FILE:LINE and the field."""

    def __init__(self, where: str):
        self.where = where
        self.problems: list[str] = []

    def __call__(self, field: str | None, message: str) -> None:
        if field:
            self.problems.append(f"{self.where}: field `{field}`: {message}")
        else:
            self.problems.append(f"{self.where}: {message}")


def image_problem(image: Path, base_dir: Path, check: bool) -> str | None:
    if not image.is_file():
        what = "is a folder, not an image file" if image.is_dir() else "not found"
        return f"image {image} {what}; check the path (relative paths resolve against {base_dir})"
    if check:
        return check_image(image)
    return None


def raise_problems(problems: list[str], check_command: str | None = None, list_all: bool = False) -> None:
    """One `VlmkitError` for a data file's problems (nothing when there are none): the first and how many
    more (pointing at `check_command`, which lists them all), or with `list_all` every problem, a line
    each (the first MAX_LISTED, then a count)."""
    if not problems:
        return
    if list_all:
        shown = problems[:MAX_LISTED]
        more = len(problems) - len(shown)
        raise VlmkitError("\n".join(shown) + (f"\n(and {more} more problem{'s' if more > 1 else ''})" if more else ""))
    rest = len(problems) - 1
    tail = f"; run `{check_command}` to see them all" if check_command else ""
    raise VlmkitError(problems[0] + (f" (and {rest} more problem{'s' if rest > 1 else ''}{tail})" if rest else ""))


def kind_of(value: Any) -> str:
    """The JSON name of a value's type, as the user wrote it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number"}.get(
        type(value), type(value).__name__
    )


def show(value: Any, limit: int = 40) -> str:
    """A short one-line repr of a user's value, so a problem line stays one line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
