"""The dataset format: chat conversations with images, read from JSONL or LLaVA-style JSON.

One conversation a line:

    {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
                  {"role": "assistant", "content": "A cat."}],
     "images": ["imgs/cat.png"]}

An image part may carry its own path (`{"type": "image", "image": "cat.png"}`), `content` may be a
plain string, and HF-style rows may give one `"image"` instead of `"images"`. LLaVA files (a JSON list,
or JSONL rows, of `{"image", "conversations": [{"from": "human", "value": "<image>\\n..."}]}`) load
too. Every row is checked and every problem reported, one line each with file, line and field, so a
bad dataset is fixed in one pass instead of one crash at a time.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmkit.data.images import check_image
from vlmkit.errors import VlmkitError

ROLES = ("system", "user", "assistant")
LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
IMAGE_MARKER = "<image>"
MISSING = object()


@dataclass(frozen=True)
class Sample:
    """One validated conversation: normalised messages and the absolute paths of its images.

    `messages[i]["content"]` is always a list of `{"type": "text", "text": str}` and `{"type": "image"}`
    parts; `images[k]` belongs to the k-th image part in reading order.
    """

    messages: list[dict]
    images: tuple[Path, ...]
    source: str
    line: int  # 1-based line of a JSONL file, or 1-based index into a JSON list

    @property
    def n_images(self) -> int:
        return len(self.images)

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


def read_samples(
    path: str | os.PathLike,
    *,
    image_root: str | os.PathLike | None = None,
    check_images: bool = False,
    require_assistant: bool = True,
) -> tuple[list[Sample], list[str]]:
    """Parse every row of a `.jsonl` or `.json` file; return the good samples and ALL problems found.

    Each problem is one line, "FILE:LINE: field `...`: what is wrong; what to do". Relative image
    paths resolve against `image_root`, else the data file's folder. Image files must exist; with
    `check_images` each is also decoded once (slow on big datasets, but finds corrupt files).
    `require_assistant=False` accepts prompts without a reply (for generation).
    """
    path = Path(path)
    src = str(path)
    base_dir, problem = check_data_file(
        path, image_root, "data file", "use .jsonl (one conversation a line) or .json (a LLaVA-style list)"
    )
    if problem:
        return [], [problem]

    def parse(obj, base, report):
        return _parse_row(obj, base, report, require_assistant=require_assistant)

    rows, problems, n_rows = parse_rows(path, base_dir, parse, check_images)
    samples = [Sample(messages, images, src, line) for line, messages, images in rows]
    if n_rows == 0 and not problems:
        problems.append(f"{src}: no samples (the file is empty); add one conversation per line")
    return samples, problems


def load_samples(path: str | os.PathLike, **kw: Any) -> list[Sample]:
    """`read_samples`, but raise `VlmkitError` (the first problem, and how many more) if any."""
    samples, problems = read_samples(path, **kw)
    if problems:
        raise VlmkitError(_summarise(problems, f"vlmkit data check {path}"))
    return samples


def parse_messages(
    obj: Any, base_dir: str | os.PathLike, *, where: str = "messages", require_assistant: bool = False
) -> tuple[list[dict], list[Path]]:
    """Normalise one conversation: a bare list of messages, a chat row or a LLaVA row.

    Returns (messages, absolute image paths in part order). Image parts carry their paths (or the row
    gives `images`); relative paths resolve against `base_dir`, and each must exist. `where` names
    the source in errors (e.g. the `--messages` file). Raises `VlmkitError` on any problem.
    """
    base = Path(os.path.abspath(Path(base_dir).expanduser()))
    report = Reporter(where)
    row = {"messages": obj} if isinstance(obj, list) else obj
    parsed = _parse_row(row, base, report, require_assistant=require_assistant)
    if parsed is not None:
        for field, image in parsed[1]:
            problem = _image_problem(image, base, check=False)
            if problem is not None:
                report(field, problem)
    if report.problems or parsed is None:
        raise VlmkitError(_summarise(report.problems, None))
    messages, fields_images = parsed
    return messages, [p for _, p in fields_images]


# ---------------------------------------------------------------------------------------- reading rows


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
                    seen[image] = _image_problem(image, base_dir, check_images)
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


# ---------------------------------------------------------------------------------------- parsing rows


def _parse_row(obj: Any, base_dir: Path, report: Reporter, *, require_assistant: bool):
    """Return (messages, [(field, image path), ...]) or None; every problem goes to `report`."""
    if not isinstance(obj, dict):
        report(None, f"expected a JSON object, got {kind_of(obj)}; write each sample as {{\"messages\": [...]}}")
        return None
    if "messages" in obj:
        parsed = parse_chat(obj, base_dir, report)
    elif "conversations" in obj:
        parsed = _parse_llava(obj, base_dir, report)
    else:
        report("messages", "missing; give a list of {\"role\", \"content\"} messages (or LLaVA `conversations`)")
        return None
    if parsed is None:
        return None
    messages = parsed[0]
    roles = [m["role"] for m in messages]
    # A misspelt role is already reported; "no assistant" on top of it would only add noise.
    if require_assistant and roles and "assistant" not in roles and all(r in ROLES for r in roles):
        report("messages", "has no assistant message; add the answer to learn as {\"role\": \"assistant\", ...}")
    return parsed


def parse_chat(obj: dict, base_dir: Path, report: Reporter):
    raw = obj["messages"]
    if not isinstance(raw, list):
        report("messages", f"expected a list of messages, got {kind_of(raw)}; give [{{\"role\", \"content\"}}, ...]")
        return None
    if not raw:
        report("messages", "is empty; give at least a user and an assistant message")
        return None

    # Each image part gets (field, path value) if it names its own file, else None (filled from `images`).
    messages: list[dict] = []
    slots: list[tuple[str, Any] | None] = []
    complete = True  # False once a message is unreadable: image parts can no longer be counted
    for i, m in enumerate(raw):
        field = f"messages[{i}]"
        if not isinstance(m, dict):
            report(field, f"expected an object with `role` and `content`, got {kind_of(m)}; fix the message")
            complete = False
            continue
        role = m.get("role", MISSING)
        if role is MISSING:
            report(f"{field}.role", "missing; set it to system, user or assistant")
        elif role not in ROLES:
            report(f"{field}.role", f"{_show(role)} is not one of system/user/assistant; use one of those")
        parts = _parse_content(m.get("content", MISSING), f"{field}.content", slots, report)
        if parts is None:
            complete = False
        else:
            messages.append({"role": role, "content": parts})

    listed = listed_images(obj, report)
    if listed is None or not complete:
        return None
    n_slots = sum(s is None for s in slots)
    if n_slots != len(listed):
        key = "image" if "image" in obj and "images" not in obj else "images"
        with_path = len(slots) - n_slots
        own = f" ({with_path} more name their own file)" if with_path else ""
        report(
            key,
            f"{len(listed)} image(s) listed but {n_slots} {{\"type\": \"image\"}} part(s) without a path in "
            f"`messages`{own}; put one image part where each listed image goes",
        )
        return None
    images = iter(listed)
    fields_values = [s if s is not None else next(images) for s in slots]
    resolved = _resolve_all(fields_values, base_dir, report)
    if resolved is None:
        return None
    return messages, resolved


def _parse_content(content: Any, field: str, slots: list, report: Reporter) -> list[dict] | None:
    """Normalise one message's content to a list of parts, appending one entry to `slots` per image."""
    if content is MISSING or content is None:
        report(field, "missing; give a string or a list of {\"type\": \"text\" | \"image\"} parts")
        return None
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        report(field, f"expected a string or a list of parts, got {kind_of(content)}; fix the content")
        return None
    if not content:
        report(field, "is empty; give at least one text or image part")
        return None
    parts: list[dict] = []
    ok = True
    for k, part in enumerate(content):
        pf = f"{field}[{k}]"
        if not isinstance(part, dict):
            report(pf, f"expected an object like {{\"type\": \"text\", \"text\": ...}}, got {kind_of(part)}; fix the part")
            ok = False
            continue
        kind = part.get("type", MISSING)
        if kind == "text":
            text = part.get("text", MISSING)
            if not isinstance(text, str):
                got = "missing" if text is MISSING else f"expected a string, got {kind_of(text)}"
                report(f"{pf}.text", f"{got}; give the text as a string")
                ok = False
                continue
            parts.append({"type": "text", "text": text})
        elif kind == "image":
            key = next((k2 for k2 in ("image", "path") if part.get(k2) is not None), None)
            slots.append((f"{pf}.{key}", part[key]) if key else None)
            parts.append({"type": "image"})
        elif kind is MISSING:
            report(f"{pf}.type", "missing; set it to \"text\" or \"image\"")
            ok = False
        else:
            report(f"{pf}.type", f"{_show(kind)} is not a supported part type; use \"text\" or \"image\"")
            ok = False
    return parts if ok else None


def listed_images(obj: dict, report: Reporter) -> list[tuple[str, Any]] | None:
    """The row's `images` list (or HF-style single `image`), as (field, value) pairs."""
    images, image = obj.get("images"), obj.get("image")
    if images is not None and image is not None:
        report("image", "both `image` and `images` are given; keep only `images`")
        return None
    if image is not None:
        return [("image", image)]
    if images is None:
        return []
    if isinstance(images, str):
        return [("images", images)]
    if not isinstance(images, list):
        report("images", f"expected a list of image paths, got {kind_of(images)}; give [\"a.png\", ...]")
        return None
    return [(f"images[{k}]", v) for k, v in enumerate(images)]


def _parse_llava(obj: dict, base_dir: Path, report: Reporter):
    raw = obj["conversations"]
    if not isinstance(raw, list) or not raw:
        got = "is empty" if isinstance(raw, list) else f"expected a list of turns, got {kind_of(raw)}"
        report("conversations", f"{got}; give [{{\"from\": \"human\", \"value\": ...}}, {{\"from\": \"gpt\", ...}}]")
        return None
    image = obj.get("image", obj.get("images"))
    key = "image" if "image" in obj else "images"
    if image is None:
        listed: list[tuple[str, Any]] = []
    elif isinstance(image, str):
        listed = [(key, image)]
    elif isinstance(image, list):
        listed = [(f"{key}[{k}]", v) for k, v in enumerate(image)]
    else:
        report(key, f"expected an image path or a list of them, got {kind_of(image)}; fix the value")
        return None

    messages: list[dict] = []
    n_markers = 0
    complete = True  # False once a turn is unreadable: markers can no longer be counted
    for i, turn in enumerate(raw):
        field = f"conversations[{i}]"
        if not isinstance(turn, dict):
            report(field, f"expected an object with `from` and `value`, got {kind_of(turn)}; fix the turn")
            complete = False
            continue
        who = turn.get("from", MISSING)
        if who not in LLAVA_ROLES:
            got = "missing" if who is MISSING else f"{_show(who)} is not one of human/gpt/system"
            report(f"{field}.from", f"{got}; use human, gpt or system")
        value = turn.get("value", MISSING)
        if not isinstance(value, str):
            got = "missing" if value is MISSING else f"expected a string, got {kind_of(value)}"
            report(f"{field}.value", f"{got}; give the turn's text as a string")
            complete = False
            continue
        parts = _split_markers(value)
        n_markers += sum(p["type"] == "image" for p in parts)
        messages.append({"role": LLAVA_ROLES.get(who, who), "content": parts})
    if not complete:
        return None

    if n_markers == 0 and listed:
        # LLaVA's own loader puts an unmarked image before the first question; so do we.
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            report("conversations", "has an image but no human turn to put it in; add a human turn")
            return None
        first_user["content"][:0] = [{"type": "image"} for _ in listed]
    elif n_markers != len(listed):
        report(
            key if listed else "conversations",
            f"{len(listed)} image(s) but {n_markers} `{IMAGE_MARKER}` marker(s) in `conversations`; "
            "make them match (one marker where each image goes)",
        )
        return None
    resolved = _resolve_all(listed, base_dir, report)
    if resolved is None:
        return None
    return messages, resolved


def _split_markers(text: str) -> list[dict]:
    """'<image>\\nWhat is it?' -> [image, text 'What is it?']; the newline beside a marker is layout."""
    pieces = text.split(IMAGE_MARKER)
    parts: list[dict] = []
    for k, piece in enumerate(pieces):
        if k > 0:
            parts.append({"type": "image"})
            piece = piece.removeprefix("\n")
        if k < len(pieces) - 1:
            piece = piece.removesuffix("\n")
        if piece or len(pieces) == 1:
            parts.append({"type": "text", "text": piece})
    return parts


# ---------------------------------------------------------------------------------------- image paths


def _resolve_all(fields_values: list[tuple[str, Any]], base_dir: Path, report: Reporter):
    out: list[tuple[str, Path]] = []
    for field, value in fields_values:
        if not isinstance(value, str) or not value.strip():
            got = "is empty" if isinstance(value, str) else f"expected an image path, got {kind_of(value)}"
            report(field, f"{got}; give the image file's path")
        elif value.startswith(("http://", "https://")):
            report(field, f"{_show(value)} is a URL and vlmkit does not download; download it and give the local path")
        else:
            out.append((field, Path(os.path.abspath(base_dir / Path(value).expanduser()))))
    return out if len(out) == len(fields_values) else None


def _image_problem(image: Path, base_dir: Path, check: bool) -> str | None:
    if not image.is_file():
        what = "is a folder, not an image file" if image.is_dir() else "not found"
        return f"image {image} {what}; check the path (relative paths resolve against {base_dir})"
    if check:
        return check_image(image)
    return None


# ---------------------------------------------------------------------------------------- wording


def _summarise(problems: list[str], check_command: str | None) -> str:
    first = problems[0] if problems else "invalid messages; check the format"
    rest = len(problems) - 1
    if rest <= 0:
        return first
    tail = f"; run `{check_command}` to see them all" if check_command else ""
    return f"{first} (and {rest} more problem{'s' if rest > 1 else ''}{tail})"


def kind_of(value: Any) -> str:
    """The JSON name of a value's type, as the user wrote it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number"}.get(
        type(value), type(value).__name__
    )


def _show(value: Any, limit: int = 40) -> str:
    """A short one-line repr of a user's value, so a problem line stays one line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
