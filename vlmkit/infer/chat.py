"""`vlmkit chat`: an interactive multi-turn conversation with a model, images included.

Each line the user types is a user turn; the reply is streamed as it is generated and kept in the
history, so later turns see the whole conversation. Commands:
    /image PATH   attach an image to the next message (checked at once; several may be attached)
    /video PATH   attach a video's keyframes (8, evenly spaced) to the next message
    /reset        forget the conversation and any attached images
    /quit         leave (so does end of input, Ctrl-D)
"""

from __future__ import annotations

import sys
from typing import Callable, TextIO

from vlmkit.data.images import load_image
from vlmkit.data.video import read_frames
from vlmkit.errors import VlmkitError

HELP = "/image PATH or /video PATH attaches media to your next message, /reset starts over, /quit leaves."


def chat_loop(
    engine,
    system: str | None = None,
    max_new_tokens: int = 256,
    input_fn: Callable[[str], str] = input,
    output: TextIO | None = None,
) -> None:
    """Read user lines from `input_fn` until /quit or EOF; stream each reply to `output` (stdout)."""
    output = output or sys.stdout  # looked up per call, so a redirected stdout is honoured
    head = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
    history: list[dict] = []  # user and assistant turns so far
    images: list = []  # decoded images of `history`, in order of appearance
    pending: list = []  # images attached to the next user message

    def say(text: str = "", end: str = "\n") -> None:
        output.write(text + end)
        output.flush()

    say(HELP)
    while True:
        try:
            line = input_fn("you> ").strip()
        except EOFError:
            say()
            return
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return
        if line == "/reset":
            history, images, pending = [], [], []
            say("(conversation cleared)")
            continue
        command = line.split(" ", 1)[0]
        if command in ("/image", "/video"):
            kind = command[1:]
            path = line[len(command) :].strip().strip("'\"")  # a dragged-in path may come quoted
            if not path:
                say(f"error: give the {kind}'s path: {command} PATH")
                continue
            try:
                pending.append((kind, load_image(path) if kind == "image" else read_frames(path)))
            except VlmkitError as e:
                say(f"error: {e}")
                continue
            say(f"({kind} {path} attached to your next message)")
            continue
        if line.startswith("/"):
            say(f"error: unknown command {line.split()[0]}; {HELP}")
            continue

        message = {"role": "user", "content": [{"type": kind} for kind, _ in pending] + [{"type": "text", "text": line}]}
        pieces: list[str] = []
        say("assistant> ", end="")
        try:
            media = images + [m for _, m in pending]
            for piece in engine.stream(head + history + [message], media, max_new_tokens=max_new_tokens):
                pieces.append(piece)
                say(piece, end="")
        except VlmkitError as e:  # e.g. the conversation outgrew the model; the turn is dropped
            say(f"\nerror: {e}")
            continue
        say()
        history += [message, {"role": "assistant", "content": [{"type": "text", "text": "".join(pieces).strip()}]}]
        images, pending = images + [m for _, m in pending], []
