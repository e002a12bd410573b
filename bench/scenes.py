"""Synthetic scenes for the generality datasets (bench/datasets.py): coloured shapes laid out in cells.

A scene is a description first (`draw_scene`: which shape of which colour in which cell, where and how
big) and pixels second (`render`), so every answer follows from the description. `held_out` decides from
an image's pixels alone which side of the train / held-out divide it may go to, so no two splits written
with any seeds share an image; `scene_for` draws until a scene lands on the wanted side. `Even` keeps
question types and answers balanced (or in given shares) across a split.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

HELD_OUT = 10  # one image in ten is on the held-out side
PALETTE = {
    "red": (220, 40, 40),
    "orange": (245, 135, 20),
    "yellow": (235, 205, 25),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "purple": (135, 60, 185),
    "pink": (245, 120, 195),
    "brown": (125, 75, 35),
}
BACKGROUNDS = ((255, 255, 255), (226, 226, 226), (246, 240, 222))  # white, light grey, cream
LINE = (180, 180, 180)  # the grid's dividing lines
KINDS = ("circle", "square", "triangle", "diamond", "cross", "star")


@dataclass(frozen=True)
class Layout:
    """Cells in reading order, `cols` x `rows`, each with its name (the answer to "where")."""

    names: tuple[str, ...]
    cols: int
    rows: int

    def box(self, cell: int, size: int) -> tuple[int, int, int, int]:
        col, row = cell % self.cols, cell // self.cols
        return col * size // self.cols, row * size // self.rows, (col + 1) * size // self.cols, (row + 1) * size // self.rows


COLUMNS2 = Layout(("left", "right"), 2, 1)
COLUMNS3 = Layout(("left", "middle", "right"), 3, 1)
QUADRANTS = Layout(("top left", "top right", "bottom left", "bottom right"), 2, 2)
NINE = Layout(("top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right"), 3, 3)


@dataclass(frozen=True)
class Obj:
    colour: str
    kind: str
    cell: int
    cx: int
    cy: int
    r: int  # half the side of its bounding box
    big: bool = True

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"


@dataclass(frozen=True)
class Scene:
    size: int
    layout: Layout
    background: tuple[int, int, int]
    objects: tuple[Obj, ...]  # in reading order of their cells
    lines: bool = False

    def where(self, obj: Obj) -> str:
        return self.layout.names[obj.cell]

    def has(self, colour: str, kind: str) -> bool:
        return any(o.colour == colour and o.kind == kind for o in self.objects)


def draw_scene(
    rng: np.random.Generator, size: int, layout: Layout, n: int, colours, kinds, *,
    distinct: bool = True, radius=((0.22, 0.40),), lines: bool = False,
) -> Scene:
    """`n` objects, each wholly inside its own cell with 2 px to spare, so none touch or overlap.

    `distinct`: no two objects share a colour or a kind, so "the circle" and "the red one" name one
    object. `radius`: (low, high) fractions of the cell's shorter side, one pair per size class (the first
    is `big=False` when there are two)."""
    cells = sorted(int(c) for c in rng.permutation(len(layout.names))[:n])
    if distinct:
        cs = [colours[int(i)] for i in rng.permutation(len(colours))[:n]]
        ks = [kinds[int(i)] for i in rng.permutation(len(kinds))[:n]]
    else:
        cs = [colours[int(rng.integers(len(colours)))] for _ in range(n)]
        ks = [kinds[int(rng.integers(len(kinds)))] for _ in range(n)]
    objects = []
    for cell, colour, kind in zip(cells, cs, ks):
        x0, y0, x1, y1 = layout.box(cell, size)
        short = min(x1 - x0, y1 - y0)
        which = int(rng.integers(len(radius)))
        lo, hi = radius[which]
        r = int(rng.integers(max(3, round(lo * short)), min(round(hi * short), short // 2 - 3) + 1))
        cx = int(rng.integers(x0 + r + 2, x1 - r - 2))
        cy = int(rng.integers(y0 + r + 2, y1 - r - 2))
        objects.append(Obj(colour, kind, cell, cx, cy, r, big=which == len(radius) - 1))
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    return Scene(size, layout, background, tuple(objects), lines)


def render(scene: Scene) -> Image.Image:
    """Without anti-aliasing: every object pixel is exactly its palette colour."""
    im = Image.new("RGB", (scene.size, scene.size), scene.background)
    draw = ImageDraw.Draw(im)
    if scene.lines:
        for k in range(1, scene.layout.cols):
            x = k * scene.size // scene.layout.cols
            draw.line([(x, 0), (x, scene.size - 1)], fill=LINE)
        for k in range(1, scene.layout.rows):
            y = k * scene.size // scene.layout.rows
            draw.line([(0, y), (scene.size - 1, y)], fill=LINE)
    for o in scene.objects:
        fill, (x, y, r) = PALETTE[o.colour], (o.cx, o.cy, o.r)
        if o.kind == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        elif o.kind == "square":
            draw.rectangle((x - r, y - r, x + r, y + r), fill=fill)
        elif o.kind == "triangle":
            draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)
        elif o.kind == "diamond":
            draw.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=fill)
        elif o.kind == "cross":
            t = max(2, round(0.38 * r))
            draw.rectangle((x - r, y - t, x + r, y + t), fill=fill)
            draw.rectangle((x - t, y - r, x + t, y + r), fill=fill)
        elif o.kind == "star":
            angles = np.pi / 2 + np.arange(10) * np.pi / 5
            radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
            draw.polygon([(x + q * np.cos(a), y - q * np.sin(a)) for a, q in zip(angles, radii)], fill=fill)
        else:
            raise ValueError(f"unknown kind {o.kind!r}")
    return im


def held_out(pixels: bytes) -> bool:
    """Which side of the train / held-out divide an image is on: a function of its pixels alone."""
    return zlib.crc32(pixels) % HELD_OUT == 0


def fits(split: str, pixels: bytes) -> bool:
    """Whether an image with these pixels may go to `split`: `train`, or any other (held-out) split."""
    return held_out(pixels) == (split != "train")


def scene_for(split: str, draw) -> tuple[Scene, Image.Image]:
    """Draw scenes with `draw()` until one's image is on `split`'s side."""
    while True:
        scene = draw()
        im = render(scene)
        if fits(split, im.tobytes()):
            return scene, im


class Even:
    """Picks values so that their counts follow `weights` as closely as possible: the least served
    relative to its weight first, ties at random. Equal weights give each value once per round."""

    def __init__(self, rng: np.random.Generator, weights: dict):
        self.rng, self.weights = rng, weights
        self.used = dict.fromkeys(weights, 0)

    def next(self, among=None):
        keys = [k for k in self.weights if among is None or k in among]
        need = {k: (self.used[k] + 1) / self.weights[k] for k in keys}
        lo = min(need.values())
        ties = [k for k in keys if need[k] == lo]
        key = ties[int(self.rng.integers(len(ties)))]
        self.used[key] += 1
        return key
