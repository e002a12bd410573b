"""The chat tab's logic, without Gradio: a conversation of turns, and the handlers the buttons call.

A conversation is a list of turns, each `{"text", "images": [paths], "reply"}`: plain data, kept per
browser session. Every generation rebuilds the whole conversation from it, so the model receives every
image of every turn, in order, each in the turn it was sent with (`conversation`), and the chat shows
each image beside its own question (`chatbot_messages`), during streaming as after it.

Handlers are generators of `Step`s (what the page shows after each streamed piece); a user's mistake
(a file that is not an image, a decompression bomb, a conversation over the model's context) becomes a
one-line message in `Step.status` and leaves the conversation as it was.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from threading import Event
from typing import Iterator

from vlmkit.data.images import load_image
from vlmkit.errors import VlmkitError, first_line
from vlmkit.ui.backends import Settings

log = logging.getLogger(__name__)
EMPTY_BOX = {"text": "", "files": []}


@dataclass
class Step:
    """What the page shows after one step of a handler. `box` None leaves the input box as it is;
    `seen` is a `vlmkit.ui.seen.Seen`, None (leave the "what the model sees" panel as it is) or False
    (the backend cannot tell: a model behind an API)."""

    turns: list[dict]
    status: str
    box: dict | None = None
    seen: object = None
    reply: str = ""  # the last reply exactly as generated (the chat renders it as Markdown)
    done: bool = False


def conversation(turns: list[dict], system: str = "", reply_last: bool = True) -> tuple[list[dict], list[str]]:
    """(chat messages, images in order of appearance) for the model. The last turn's reply is left out
    with `reply_last=False` (the reply about to be generated)."""
    messages: list[dict] = []
    if system:
        messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
    images: list[str] = []
    for k, turn in enumerate(turns):
        parts = [{"type": "image"} for _ in turn["images"]]
        if turn["text"]:
            parts.append({"type": "text", "text": turn["text"]})
        messages.append({"role": "user", "content": parts})
        images.extend(turn["images"])
        if reply_last or k < len(turns) - 1:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": turn["reply"]}]})
    return messages, images


def chatbot_messages(turns: list[dict]) -> list[dict]:
    """The chat as Gradio's Chatbot shows it: each user message holds its own images, then its text."""
    out = []
    for turn in turns:
        content: list = [{"path": path} for path in turn["images"]]
        if turn["text"]:
            content.append(turn["text"])
        out.append({"role": "user", "content": content})
        if turn["reply"]:
            out.append({"role": "assistant", "content": turn["reply"]})
    return out


def file_paths(files) -> list[str]:
    """Uploaded files as Gradio hands them (paths, or dicts with a `path`) -> paths."""
    out = []
    for f in files or []:
        path = f.get("path") if isinstance(f, dict) else getattr(f, "path", f)
        if path:
            out.append(str(path))
    return out


def check_uploads(files) -> tuple[list[str], list[str]]:
    """(the paths that are readable images, one line per file that is not), naming files by their own
    name rather than the server's upload path."""
    good, problems = [], []
    for path in file_paths(files):
        try:
            load_image(path)
        except VlmkitError as e:
            problems.append(str(e).replace(path, os.path.basename(path)))
        else:
            good.append(path)
    return good, problems


class Chat:
    """The chat tab's handlers for one backend (shared by every browser session; the turns are not)."""

    def __init__(self, backend):
        self.backend = backend

    def submit(self, turns: list[dict], message: dict | None, settings: Settings, stop: Event | None = None) -> Iterator[Step]:
        """Send the input box (text and images) as a new turn and stream the reply."""
        message = message or EMPTY_BOX
        text = (message.get("text") or "").strip()
        images, problems = check_uploads(message.get("files"))
        if problems:
            kept = {"text": message.get("text") or "", "files": images}
            yield Step(turns, "Not sent: " + " | ".join(problems), box=kept, done=True)
            return
        if not text and not images:
            yield Step(turns, "Type a message or attach an image first.", done=True)
            return
        turn = {"text": text, "images": images, "reply": ""}
        yield from self._generate(list(turns) + [turn], settings, stop, box=EMPTY_BOX, restore=message)

    def retry(self, turns: list[dict], settings: Settings, stop: Event | None = None) -> Iterator[Step]:
        """Generate the last turn's reply again (with the current settings)."""
        if not turns:
            yield Step(turns, "Nothing to retry yet.", done=True)
            return
        last = dict(turns[-1], reply="")
        yield from self._generate(list(turns[:-1]) + [last], settings, stop, restore=None, fallback=turns, done="Retried")

    @staticmethod
    def undo(turns: list[dict]) -> Step:
        """Drop the last turn and put its text and images back in the input box."""
        if not turns:
            return Step(turns, "Nothing to undo.", done=True)
        last = turns[-1]
        return Step(list(turns[:-1]), "Removed the last turn.", box={"text": last["text"], "files": list(last["images"])}, done=True)

    @staticmethod
    def clear() -> Step:
        return Step([], "Cleared.", box=EMPTY_BOX, done=True)

    def _generate(
        self, turns: list[dict], settings: Settings, stop: Event | None, box: dict | None = None,
        restore: dict | None = None, fallback: list[dict] | None = None, done: str = "Done",
    ) -> Iterator[Step]:
        """Stream the last turn's reply. On an error the conversation goes back to `fallback` (the turns
        before this call) and the input box to `restore` (what the user had typed)."""
        before = fallback if fallback is not None else turns[:-1]
        messages, images = conversation(turns, settings.system, reply_last=False)
        try:
            seen = self.backend.sees(messages, images)
            if seen is not None and seen.context and seen.prompt_tokens >= seen.context:
                raise VlmkitError(
                    f"the conversation is {seen.prompt_tokens} tokens, and the model takes {seen.context}; "
                    "undo turns or clear the chat"
                )
        except VlmkitError as e:
            yield Step(before, f"Not sent: {e}", box=restore, done=True)
            return
        working = f"Generating the reply to turn {len(turns)}..."
        yield Step(turns, working, box=box, seen=seen if seen is not None else False)
        start, reply = time.perf_counter(), ""
        try:
            for piece in self.backend.stream(messages, images, settings, stop):
                reply += piece
                turns[-1]["reply"] = reply
                yield Step(turns, working, reply=reply)
        except VlmkitError as e:
            yield Step(before, f"Error: {e}", box=restore, done=True)
            return
        except Exception as e:  # a bug, not the user's mistake: logged in full, shown in one line
            log.exception("generation failed")
            yield Step(before, f"Error: generation failed ({type(e).__name__}: {first_line(e)}); see the server's log", box=restore, done=True)
            return
        turns[-1]["reply"] = reply.strip()
        seconds = time.perf_counter() - start
        stopped = stop is not None and stop.is_set()
        how = "Stopped" if stopped else done
        yield Step(turns, f"{how}: turn {len(turns)}, {seconds:.1f} s.", reply=reply.strip(), done=True)


def example_turn(prompt: str, image: str | Path) -> dict:
    """An example as the input box holds it."""
    return {"text": prompt, "files": [str(image)]}
