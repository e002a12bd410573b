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

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmkit.data.rows import MISSING, Reporter, check_data_file, image_problem, kind_of, parse_rows, raise_problems, show
from vlmkit.errors import VlmkitError

ROLES = ("system", "user", "assistant")
LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
IMAGE_MARKER = "<image>"


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
    raise_problems(problems, f"vlmkit data check {path}")
    return samples


def split_reference(sample: Sample) -> tuple[list[dict], str, int]:
    """(prompt messages, reference text, images used by the prompt) for one sample."""
    messages = sample.messages
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise VlmkitError(f"{sample.where}: no assistant turn to use as the reference")
    reference = "".join(p["text"] for p in messages[last]["content"] if p["type"] == "text")
    prompt = messages[:last]
    n_images = sum(1 for m in prompt for p in m["content"] if p["type"] == "image")
    return prompt, reference, n_images


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
            problem = image_problem(image, base, check=False)
            if problem is not None:
                report(field, problem)
    if report.problems or parsed is None:
        raise_problems(report.problems or ["invalid messages; check the format"])
    messages, fields_images = parsed
    return messages, [p for _, p in fields_images]


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
            report(f"{field}.role", f"{show(role)} is not one of system/user/assistant; use one of those")
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
            report(f"{pf}.type", f"{show(kind)} is not a supported part type; use \"text\" or \"image\"")
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
            got = "missing" if who is MISSING else f"{show(who)} is not one of human/gpt/system"
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
            report(field, f"{show(value)} is a URL and vlmkit does not download; download it and give the local path")
        else:
            out.append((field, Path(os.path.abspath(base_dir / Path(value).expanduser()))))
    return out if len(out) == len(fields_values) else None
