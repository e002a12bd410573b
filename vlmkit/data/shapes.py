"""The built-in synthetic dataset: small scenes of coloured shapes, with captions and one-word questions.

It exists so the quickstart can train and evaluate a VLM in minutes with nothing downloaded, and so
tests can check answers exactly: every answer follows from the scene description `make_scene`
returns. Question types, presence yes/no and count 1/2 are balanced across a split, so a model that
ignores the image scores no better than chance.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from vlmkit.errors import VlmkitError

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 200, 20),
    "purple": (140, 60, 180),
}
KINDS = ("circle", "square", "triangle")
BACKGROUNDS = ((255, 255, 255), (220, 220, 220))  # white, light grey
QUESTION_TYPES = ("colour", "shape", "count", "presence", "position")
CAPTION_QUESTION = "Describe the image."


@dataclass(frozen=True)
class Shape:
    colour: str
    kind: str
    cx: int  # centre, in pixels
    cy: int
    r: int  # half the width and height of its bounding box

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"


@dataclass(frozen=True)
class Scene:
    size: int
    background: tuple[int, int, int]
    shapes: tuple[Shape, ...]  # with two shapes: the left one first

    def side(self, shape: Shape) -> str:
        return "left" if shape.cx < self.size / 2 else "right"


def make_scene(
    rng: np.random.Generator,
    size: int = 64,
    *,
    n_shapes: int | None = None,
    unique_kinds: bool = False,
    unique_colours: bool = False,
) -> Scene:
    """Draw a random scene description (nothing rendered yet).

    With two shapes, one lies wholly in the left half and one in the right, so they never overlap
    and "left"/"right" is never ambiguous. `unique_kinds` / `unique_colours` forbid two circles /
    two red shapes, which the colour / shape questions need to have one answer.
    """
    if size < 16:
        raise VlmkitError(f"shapes dataset: size {size} is too small; use at least 16 pixels")
    if n_shapes is None:
        n_shapes = int(rng.integers(1, 3))
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    colours, kinds = list(COLOURS), list(KINDS)
    if n_shapes == 1:
        colour, kind = colours[int(rng.integers(5))], kinds[int(rng.integers(3))]
        r = int(rng.integers(round(0.14 * size), round(0.24 * size) + 1))
        cx, cy = (int(rng.integers(r + 2, size - r - 2)) for _ in range(2))
        return Scene(size, background, (Shape(colour, kind, cx, cy, r),))
    if n_shapes != 2:
        raise VlmkitError(f"shapes dataset: n_shapes={n_shapes}; use 1 or 2")

    # Two different (colour, kind) pairs, so every shape can be named without ambiguity.
    pairs = [(c, k) for c in colours for k in kinds]
    first = pairs[int(rng.integers(len(pairs)))]
    allowed = [
        p
        for p in pairs
        if p != first and not (unique_colours and p[0] == first[0]) and not (unique_kinds and p[1] == first[1])
    ]
    second = allowed[int(rng.integers(len(allowed)))]
    if rng.random() < 0.5:
        first, second = second, first
    half = size // 2
    shapes = []
    for (colour, kind), lo in ((first, 0), (second, half)):
        r = int(rng.integers(round(0.10 * size), round(0.17 * size) + 1))
        # Keep the whole bounding box inside its half with a pixel to spare on each side.
        cx = int(rng.integers(lo + r + 1, lo + half - r - 1))
        cy = int(rng.integers(r + 2, size - r - 2))
        shapes.append(Shape(colour, kind, cx, cy, r))
    return Scene(size, background, tuple(shapes))


def render_scene(scene: Scene) -> Image.Image:
    """Draw the scene without anti-aliasing, so every shape pixel is exactly its colour."""
    im = Image.new("RGB", (scene.size, scene.size), scene.background)
    draw = ImageDraw.Draw(im)
    for s in scene.shapes:
        fill = COLOURS[s.colour]
        box = (s.cx - s.r, s.cy - s.r, s.cx + s.r, s.cy + s.r)
        if s.kind == "circle":
            draw.ellipse(box, fill=fill)
        elif s.kind == "square":
            draw.rectangle(box, fill=fill)
        else:  # an upward triangle filling the box; its centre pixel is inside
            draw.polygon([(s.cx, s.cy - s.r), (s.cx - s.r, s.cy + s.r), (s.cx + s.r, s.cy + s.r)], fill=fill)
    return im


def caption(scene: Scene) -> str:
    """'a green triangle.' or 'a red circle on the left and a blue square on the right.'"""
    if len(scene.shapes) == 1:
        return f"a {scene.shapes[0].name}."
    left, right = scene.shapes
    return f"a {left.name} on the left and a {right.name} on the right."


def make_question(
    scene: Scene, qtype: str, rng: np.random.Generator, *, want_yes: bool | None = None
) -> tuple[str, str]:
    """One (question, one-word answer) of type `qtype` about `scene`.

    `want_yes` picks the answer of a presence question (random when None), so the caller can
    balance yes and no across a dataset. Raises ValueError if the scene cannot support the type.
    """
    shapes = scene.shapes
    pick = lambda seq: seq[int(rng.integers(len(seq)))]  # noqa: E731
    if qtype == "colour":
        kinds = [s.kind for s in shapes]
        s = pick([s for s in shapes if kinds.count(s.kind) == 1])
        return f"What colour is the {s.kind}?", s.colour
    if qtype == "shape":
        colours = [s.colour for s in shapes]
        s = pick([s for s in shapes if colours.count(s.colour) == 1])
        return f"What shape is the {s.colour} object?", s.kind
    if qtype == "count":
        return "How many shapes are there?", str(len(shapes))
    if qtype == "presence":
        yes = bool(rng.integers(2)) if want_yes is None else want_yes
        by_kind = bool(rng.integers(2))
        present = {s.kind for s in shapes} if by_kind else {s.colour for s in shapes}
        pool = sorted(present) if yes else [v for v in (KINDS if by_kind else COLOURS) if v not in present]
        value = pick(pool)
        question = f"Is there a {value}?" if by_kind else f"Is there a {value} shape?"
        return question, "yes" if yes else "no"
    if qtype == "position":
        if len(shapes) != 2:
            raise ValueError("position questions need two shapes")
        if rng.integers(2):
            s = pick(shapes)
            return f"Which side is the {s.name} on?", scene.side(s)
        side = pick(("left", "right"))
        return f"What colour is the shape on the {side}?", shapes[0 if side == "left" else 1].colour
    raise ValueError(f"unknown question type {qtype!r}; use one of {', '.join(QUESTION_TYPES)}")


def make_shapes_dataset(
    out_dir: str | os.PathLike,
    split: str,
    n_images: int,
    seed: int,
    questions_per_image: int = 1,
    captions: bool = True,
    size: int = 64,
    caption_share: float = 0.0,
    question_first: bool = False,
) -> Path:
    """Write `out_dir/images/{split}_{i:05d}.png` and `out_dir/{split}.jsonl`; return the JSONL path.

    Each line is one image: the first user turn holds the image and the first question, later turns
    ask further questions (no type twice per image), and with `captions` one turn at a random place
    asks for the caption. An image gets at most as many questions as its scene supports (four with
    one shape, five with two). With `caption_share` > 0, that share of the images (at random) instead
    get a conversation of one turn asking for the caption, and `captions` applies to the others. The
    split name is mixed into the seed, so two splits never repeat each other even if given the same seed.
    `question_first` puts the first question's text before the image instead of after it.
    """
    if n_images < 1:
        raise VlmkitError(f"shapes dataset: n_images={n_images}; ask for at least 1 image")
    if questions_per_image < 0 or (questions_per_image == 0 and not captions):
        raise VlmkitError(
            f"shapes dataset: questions_per_image={questions_per_image} with captions={captions} gives no "
            "text; ask for at least one question or turn captions on"
        )
    if not 0 <= caption_share < 1:
        raise VlmkitError(f"shapes dataset: caption_share={caption_share}; give a share in [0, 1)")
    if not split or any(c in split for c in "/\\") or split.startswith("."):
        raise VlmkitError(f"shapes dataset: split name {split!r} is not a plain name; use e.g. train or test")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, zlib.crc32(split.encode())])

    planner = _Planner(rng, questions_per_image)
    rows = []
    for i in tqdm(range(n_images), desc=f"shapes {split}", unit="img", disable=None, file=sys.stderr):
        name = f"images/{split}_{i:05d}.png"
        if caption_share and rng.random() < caption_share:  # a caption-only image
            scene = make_scene(rng, size)
            render_scene(scene).save(out / name)
            rows.append({"messages": _conversation([(CAPTION_QUESTION, caption(scene))], question_first), "images": [name]})
            continue
        qtypes, n_shapes = planner.plan()
        scene = make_scene(
            rng, size, n_shapes=n_shapes, unique_kinds="colour" in qtypes, unique_colours="shape" in qtypes
        )
        qas = []
        for qtype in qtypes:
            want_yes = planner.next_yes() if qtype == "presence" else None
            qas.append(make_question(scene, qtype, rng, want_yes=want_yes))
        if captions:
            qas.insert(int(rng.integers(len(qas) + 1)), (CAPTION_QUESTION, caption(scene)))
        render_scene(scene).save(out / name)
        rows.append({"messages": _conversation(qas, question_first), "images": [name]})

    # Written last and renamed into place: a crash never leaves a half-written split behind.
    path = out / f"{split}.jsonl"
    fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{split}.", suffix=".jsonl.tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _conversation(qas: list[tuple[str, str]], question_first: bool = False) -> list[dict]:
    messages = []
    for k, (question, answer) in enumerate(qas):
        content = [{"type": "text", "text": question}]
        if k == 0:
            content.insert(len(content) if question_first else 0, {"type": "image"})
        messages.append({"role": "user", "content": content})
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


class _Planner:
    """Chooses each image's question types and shape count so the split comes out balanced.

    Types are taken least-used first (random among ties). The shape count follows from them: a
    position question needs two shapes; a count question gets whichever answer ("1" or "2") is
    behind; otherwise whichever count is behind overall. When count wants one shape and position
    needs two, position is dropped and, being behind, comes first for a later image.
    """

    def __init__(self, rng: np.random.Generator, per_image: int):
        self.rng = rng
        self.per_image = per_image
        self.used = dict.fromkeys(QUESTION_TYPES, 0)
        self.count_answers = {1: 0, 2: 0}
        self.n_shapes = {1: 0, 2: 0}
        self.yes_no = {True: 0, False: 0}

    def _behind(self, tally: dict):
        lo = min(tally.values())
        keys = [k for k, v in tally.items() if v == lo]
        return keys[int(self.rng.integers(len(keys)))]

    def plan(self) -> tuple[list[str], int]:
        ties = self.rng.random(len(QUESTION_TYPES))
        order = sorted(QUESTION_TYPES, key=lambda t: (self.used[t], ties[QUESTION_TYPES.index(t)]))
        qtypes = order[: self.per_image]
        if "count" in qtypes:
            if "position" in qtypes and self.count_answers[2] <= self.count_answers[1]:
                n = 2
            else:
                n = self._behind(self.count_answers)
            self.count_answers[n] += 1
        elif "position" in qtypes:
            n = 2
        else:
            n = self._behind(self.n_shapes)
        if n == 1 and "position" in qtypes:
            qtypes.remove("position")
        for t in qtypes:
            self.used[t] += 1
        self.n_shapes[n] += 1
        return qtypes, n

    def next_yes(self) -> bool:
        yes = self._behind(self.yes_no)
        self.yes_no[yes] += 1
        return yes
