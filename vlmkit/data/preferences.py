"""Preference data for DPO: reading pairs and tokenizing them for either kind of model.

TRL's preference format, one pair a line:

    {"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}],
     "chosen": [{"role": "assistant", "content": "Red."}],
     "rejected": [{"role": "assistant", "content": "Blue."}],
     "images": ["imgs/a.png"]}

or the plain form, where `prompt`, `chosen` and `rejected` are strings and the prompt becomes one user
turn with one image part per listed image before the text. Rows are checked with the chat format's own
message parser (`schema.py`), and every problem is reported with file, line and field.

A pair renders as two conversations, prompt + chosen and prompt + rejected, through the model's renderer
(`collate.py`), exactly as SFT renders them; only the reply (its text and end-of-turn token) is labelled.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from vlmkit.data.collate import Example, fit
from vlmkit.data.messages import user_turn
from vlmkit.data.processor import IGNORE_INDEX
from vlmkit.data.rows import MISSING, Reporter, check_data_file, kind_of, parse_rows, raise_problems
from vlmkit.data.schema import listed_images, parse_chat
from vlmkit.errors import VlmkitError


@dataclass(frozen=True)
class PreferenceSample:
    """One validated pair: normalised prompt messages, the two replies and the prompt's images.

    Messages have the `vlmkit.data.schema.Sample` layout (content = list of text/image parts);
    `chosen` and `rejected` each hold exactly one assistant message; `images[k]` belongs to the k-th
    image part of the prompt.
    """

    prompt: list[dict]
    chosen: list[dict]
    rejected: list[dict]
    images: tuple[Path, ...]
    source: str
    line: int

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


# ---------------------------------------------------------------------------------------- reading


class _FieldReporter(Reporter):
    """A reporter for the SFT parser that names the preference field instead of `messages`."""

    def __init__(self, parent: Reporter, field: str):
        super().__init__(parent.where)
        self.problems = parent.problems  # shared: one list per row
        self.field = field

    def __call__(self, field: str | None, message: str) -> None:
        if field and field.startswith("messages"):
            field = self.field + field[len("messages") :]
        super().__call__(field, message)


def read_preferences(
    path: str | os.PathLike, *, image_root: str | os.PathLike | None = None, check_images: bool = False
) -> tuple[list[PreferenceSample], list[str]]:
    """Parse every row of a preference `.jsonl` (or `.json` list); return good samples and ALL problems.

    Relative image paths resolve against `image_root`, else the data file's folder; with `check_images`
    each image is also decoded once.
    """
    path = Path(path)
    src = str(path)
    base_dir, problem = check_data_file(path, image_root, "preference data file", "use .jsonl with one pair a line")
    if problem:
        return [], [problem]

    def parse(obj, base, report):
        parsed = _parse_pair(obj, base, report)
        return None if parsed is None else (parsed[:3], parsed[3])

    rows, problems, n_rows = parse_rows(path, base_dir, parse, check_images)
    samples = [PreferenceSample(*value, images, src, line) for line, value, images in rows]
    if n_rows == 0 and not problems:
        problems.append(f"{src}: no preference pairs (the file is empty); add one {{prompt, chosen, rejected}} a line")
    return samples, problems


def load_preferences(path: str | os.PathLike, **kw: Any) -> list[PreferenceSample]:
    """`read_preferences`, but raise one `VlmkitError` listing every problem (the first 20, then a count)."""
    samples, problems = read_preferences(path, **kw)
    raise_problems(problems, list_all=True)
    return samples


def _parse_pair(obj: Any, base_dir: Path, report: Reporter):
    """(prompt, chosen, rejected, [(field, image path)]) or None; every problem goes to `report`."""
    if not isinstance(obj, dict):
        report(None, f"expected a JSON object, got {kind_of(obj)}; write each pair as {{\"prompt\", \"chosen\", \"rejected\"}}")
        return None
    values = {}
    for key in ("prompt", "chosen", "rejected"):
        value = obj.get(key, MISSING)
        if value is MISSING or value is None:
            report(key, "missing; give a string or a list of chat messages")
        elif not isinstance(value, (str, list)):
            report(key, f"expected a string or a list of chat messages, got {kind_of(value)}; fix the value")
        else:
            values[key] = value
    if "prompt" not in values:
        return None

    raw_prompt = values["prompt"]
    if isinstance(raw_prompt, str):
        # The plain form: one user turn, every listed image before the text.
        listed = listed_images(obj, report)
        if listed is None:
            return None
        raw_prompt = user_turn(raw_prompt, len(listed))
    row = {"messages": raw_prompt, **{k: obj[k] for k in ("images", "image") if k in obj}}
    parsed_prompt = parse_chat(row, base_dir, _FieldReporter(report, "prompt"))
    if parsed_prompt is not None and parsed_prompt[0][-1]["role"] == "assistant":
        report("prompt", "ends with an assistant message; the prompt should end with the user's turn")

    replies = {}
    for key in ("chosen", "rejected"):
        if key in values:
            replies[key] = _parse_reply(values[key], key, base_dir, report)
    if parsed_prompt is None or any(replies.get(k) is None for k in ("chosen", "rejected")):
        return None
    return parsed_prompt[0], replies["chosen"], replies["rejected"], parsed_prompt[1]


def _parse_reply(value: str | list, key: str, base_dir: Path, report: Reporter) -> list[dict] | None:
    """One assistant message from a string or a one-message list; images are not allowed in replies."""
    if isinstance(value, str):
        value = [{"role": "assistant", "content": value}]
    elif len(value) != 1:
        report(key, f"has {len(value)} messages; give exactly one {{\"role\": \"assistant\", \"content\": ...}}")
        return None
    content = value[0].get("content") if isinstance(value[0], dict) else None
    if isinstance(content, list) and any(isinstance(p, dict) and p.get("type") == "image" for p in content):
        report(f"{key}[0].content", "has an image part; images belong in the prompt, replies are text")
        return None
    n_before = len(report.problems)
    parsed = parse_chat({"messages": value}, base_dir, _FieldReporter(report, key))
    if parsed is None or len(report.problems) > n_before:
        return None
    messages = parsed[0]
    if messages[0]["role"] != "assistant":
        report(f"{key}[0].role", f"{messages[0]['role']!r} must be assistant; the reply is the assistant's turn")
        return None
    return messages


# ---------------------------------------------------------------------------------------- tokenising


@dataclass(frozen=True)
class PreferencePair:
    """A tokenized pair: prompt + chosen and prompt + rejected, labelled on the reply only."""

    chosen: Example
    rejected: Example
    where: str

    @property
    def length(self) -> int:
        return max(self.chosen.length, self.rejected.length)

    @property
    def images(self) -> tuple:
        """The prompt's image paths (both sides show the same images)."""
        return self.chosen.images


def tokenize_pairs(samples: list[PreferenceSample], renderer, max_length: int) -> list[PreferencePair]:
    """Render both sides of every pair; labels are -100 everywhere but the final reply (earlier assistant
    turns belong to the prompt). A side too long for `max_length` is cut by the renderer's rule; one with
    no reply token left to score is an error naming the sample."""
    pairs = []
    for sample in samples:
        sides = []
        for name, reply in (("chosen", sample.chosen), ("rejected", sample.rejected)):
            example = renderer.render(sample.prompt + reply, list(sample.images), sample.where)
            first = last_span_start(example.labels)
            example = replace(example, labels=[IGNORE_INDEX] * first + example.labels[first:])
            fitted, why = fit(renderer, example, max_length)
            if fitted is None:
                raise VlmkitError(f"{sample.where}: the {name} reply: {why}; raise max_length or shorten the prompt")
            sides.append(fitted)
        pairs.append(PreferencePair(sides[0], sides[1], sample.where))
    return pairs


def collate_pairs(pairs: list[PreferencePair], renderer, image_source) -> dict:
    """Chosen rows then rejected rows as one (2B, T) batch: `{"pair_inputs": model inputs, "pair_labels"}`."""
    both = renderer.collate([p.chosen for p in pairs] + [p.rejected for p in pairs], image_source)
    labels = both.pop("labels")
    return {"pair_inputs": both, "pair_labels": labels}


def last_span_start(labels: list[int]) -> int:
    """Index where the last run of labelled tokens starts (the final assistant turn)."""
    i = len(labels)
    while i > 0 and labels[i - 1] == IGNORE_INDEX:
        i -= 1
    while i > 0 and labels[i - 1] != IGNORE_INDEX:
        i -= 1
    return i
