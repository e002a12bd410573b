"""The compare tab's logic, without Gradio: two models answer the same input, a person picks the better
answer, and the pair is appended to a preference file that `vlmkit train method=dpo` reads as it is.

The file is TRL's conversational preference format (`vlmkit/data/preferences.py`), one pair a line:

    {"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}],
     "chosen": [{"role": "assistant", "content": "Red."}],
     "rejected": [{"role": "assistant", "content": "Blue."}],
     "images": ["preferences_images/3f1c0d2b9a7e4c11.png"]}

Images are copied into a folder beside the file (`<file stem>_images/`), named by a hash of their bytes
(an image sent twice is stored once), and listed relative to the file, so the file and its folder move
together. Each append rewrites the file through a temporary file and a rename: a crash leaves the old
file or the new one, never half a line.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from threading import Event, Lock
from typing import Iterator

from vlmkit.errors import VlmkitError, first_line
from vlmkit.io import atomic_write
from vlmkit.ui.backends import Settings
from vlmkit.ui.chat import check_uploads, conversation


class PreferenceFile:
    """Appends preference pairs to a JSONL file, with the images saved beside it."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser().absolute()
        if self.path.suffix.lower() != ".jsonl":
            raise VlmkitError(f"--preferences {path}: give a .jsonl file (one preference pair a line)")
        if self.path.is_dir():
            raise VlmkitError(f"--preferences {path}: is a folder; give the path of a .jsonl file")
        self.image_dir = self.path.with_name(f"{self.path.stem}_images")
        self._lock = Lock()  # two browser tabs choosing at once append one after the other

    def append(self, prompt: list[dict], images: list[str], chosen: str, rejected: str) -> dict:
        """Write one pair; return the row as written."""
        with self._lock:
            row = {
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
                "images": [self._save_image(image) for image in images],
            }
            old = self.path.read_bytes() if self.path.exists() else b""
            if old and not old.endswith(b"\n"):
                old += b"\n"
            line = (json.dumps(row, ensure_ascii=False) + "\n").encode()
            atomic_write(self.path, lambda tmp: tmp.write_bytes(old + line))
        return row

    def count(self) -> int:
        if not self.path.exists():
            return 0
        return sum(1 for line in self.path.read_bytes().splitlines() if line.strip())

    def _save_image(self, image: str) -> str:
        raw = Path(image).read_bytes()
        suffix = Path(image).suffix.lower() or ".png"
        target = self.image_dir / f"{hashlib.sha256(raw).hexdigest()[:16]}{suffix}"
        if not target.exists():
            atomic_write(target, lambda tmp: tmp.write_bytes(raw))
        return target.relative_to(self.path.parent).as_posix()


@dataclass
class CompareStep:
    answer_a: str
    answer_b: str
    status: str
    pending: dict | None = None  # the pair waiting for the person's choice
    done: bool = False


class Compare:
    """The compare tab's handlers: model A and model B, and where chosen pairs go."""

    def __init__(self, backend_a, backend_b, preferences: PreferenceFile | None):
        self.a, self.b, self.preferences = backend_a, backend_b, preferences

    def run(self, message: dict | None, settings: Settings, stop: Event | None = None) -> Iterator[CompareStep]:
        """Both models answer the input box's text and images, A then B, streamed."""
        message = message or {}
        text = (message.get("text") or "").strip()
        images, problems = check_uploads(message.get("files"))
        if problems:
            yield CompareStep("", "", "Not sent: " + " | ".join(problems), done=True)
            return
        if not text:
            yield CompareStep("", "", "Type a prompt first (and attach images if you like).", done=True)
            return
        if self.b is None:
            yield CompareStep("", "", "Start `vlmkit ui` with --model-b to compare two models.", done=True)
            return
        turn = {"text": text, "images": images, "reply": ""}
        messages, _ = conversation([turn], settings.system, reply_last=False)
        answers = ["", ""]
        for side, backend in enumerate((self.a, self.b)):
            name = "A" if side == 0 else "B"
            try:
                for piece in backend.stream(messages, images, settings, stop):
                    answers[side] += piece
                    yield CompareStep(answers[0], answers[1], f"Model {name} is answering...")
            except VlmkitError as e:
                yield CompareStep(answers[0], answers[1], f"Error from model {name}: {e}", done=True)
                return
            except Exception as e:  # a bug: shown in one line, the page stays usable
                yield CompareStep(answers[0], answers[1], f"Error from model {name}: {type(e).__name__}: {first_line(e)}", done=True)
                return
            if stop is not None and stop.is_set():
                yield CompareStep(answers[0], answers[1], "Stopped; nothing to choose from.", done=True)
                return
        a, b = (x.strip() for x in answers)
        pending = {"prompt": messages, "images": images, "a": a, "b": b}
        status = "Both answered the same; nothing to choose." if a == b else "Which answer is better?"
        yield CompareStep(a, b, status, pending=None if a == b else pending, done=True)

    def choose(self, pending: dict | None, better: str) -> tuple[str, dict | None]:
        """Save the pending pair with `better` ("a" or "b") chosen: (status, pending after)."""
        if not pending:
            return "Generate two answers first (each pair is saved once).", None
        if self.preferences is None:
            return "No preference file: start `vlmkit ui` with --preferences FILE.jsonl", pending
        chosen, rejected = (pending["a"], pending["b"]) if better == "a" else (pending["b"], pending["a"])
        try:
            self.preferences.append(pending["prompt"], pending["images"], chosen, rejected)
        except OSError as e:
            return f"Could not write {self.preferences.path}: {first_line(e)}", pending
        n = self.preferences.count()
        return f"Saved: {better.upper()} is better ({n} pair{'s' if n != 1 else ''} in {self.preferences.path}).", None
