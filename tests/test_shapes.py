"""The synthetic shapes dataset: answers follow from the scene, splits are deterministic and balanced."""

import collections
import json

import numpy as np
import pytest
from PIL import Image

from vlmkit.data.schema import load_samples
from vlmkit.data.shapes import (
    CAPTION_QUESTION,
    COLOURS,
    KINDS,
    caption,
    make_question,
    make_scene,
    make_shapes_dataset,
    render_scene,
)
from vlmkit.errors import VlmkitError


def _scenes(n=300, size=64, seed=0, **kw):
    rng = np.random.default_rng(seed)
    return [make_scene(rng, size, **kw) for _ in range(n)], rng


def test_colours_are_distinct():
    assert len(set(COLOURS.values())) == len(COLOURS) == 5


@pytest.mark.parametrize("size", [32, 64, 96])
def test_rendered_pixels_match_the_scene(size):
    scenes, _ = _scenes(200, size)
    assert {len(s.shapes) for s in scenes} == {1, 2}
    for scene in scenes:
        px = np.asarray(render_scene(scene))
        assert px.shape == (size, size, 3)
        assert tuple(px[0, 0]) == scene.background and scene.background in ((255, 255, 255), (220, 220, 220))
        for s in scene.shapes:
            assert tuple(px[s.cy, s.cx]) == COLOURS[s.colour]
            assert 0 <= s.cx - s.r and s.cx + s.r < size and 0 <= s.cy - s.r and s.cy + s.r < size
        if len(scene.shapes) == 2:
            left, right = scene.shapes
            assert (left.colour, left.kind) != (right.colour, right.kind)
            assert left.cx + left.r < size / 2 <= right.cx - right.r  # each wholly in its half
            assert scene.side(left) == "left" and scene.side(right) == "right"
            # no overlap: each shape's own colour fills its box centre, and the halves are disjoint
            assert not (px[:, size // 2 - 1 : size // 2 + 1] != scene.background).any()


def test_kind_is_drawn_as_named():
    # A circle leaves its box corners empty, a square fills them, a triangle fills only the bottom ones.
    scenes, _ = _scenes(200)
    for scene in scenes:
        px = np.asarray(render_scene(scene))
        for s in scene.shapes:
            top_left = tuple(px[s.cy - s.r, s.cx - s.r]) == COLOURS[s.colour]
            bottom_left = tuple(px[s.cy + s.r, s.cx - s.r]) == COLOURS[s.colour]
            assert (top_left, bottom_left) == {"circle": (False, False), "square": (True, True), "triangle": (False, True)}[s.kind]


def test_answers_follow_from_the_scene():
    scenes, rng = _scenes(400)
    for scene in scenes:
        shapes = scene.shapes
        colours, kinds = [s.colour for s in shapes], [s.kind for s in shapes]
        q, a = make_question(scene, "count", rng)
        assert (q, a) == ("How many shapes are there?", str(len(shapes)))
        for want in (True, False):
            q, a = make_question(scene, "presence", rng, want_yes=want)
            word = q.removeprefix("Is there a ").removesuffix("?").removesuffix(" shape")
            assert a == ("yes" if word in colours + kinds else "no") == ("yes" if want else "no")
        if len(set(kinds)) == len(kinds):
            q, a = make_question(scene, "colour", rng)
            kind = q.removeprefix("What colour is the ").removesuffix("?")
            assert a == colours[kinds.index(kind)]
        if len(set(colours)) == len(colours):
            q, a = make_question(scene, "shape", rng)
            colour = q.removeprefix("What shape is the ").removesuffix(" object?")
            assert a == kinds[colours.index(colour)]
        if len(shapes) == 2:
            for _ in range(4):
                q, a = make_question(scene, "position", rng)
                if q.startswith("Which side"):
                    name = q.removeprefix("Which side is the ").removesuffix(" on?")
                    assert a == scene.side(next(s for s in shapes if s.name == name))
                else:
                    side = q.removeprefix("What colour is the shape on the ").removesuffix("?")
                    assert a == shapes[0 if side == "left" else 1].colour
        else:
            with pytest.raises(ValueError, match="^position questions need two shapes$"):
                make_question(scene, "position", rng)
        for s in shapes:
            assert s.name in caption(scene)
        assert caption(scene).endswith(".") and (len(shapes) == 1) == ("left" not in caption(scene))


def test_unique_constraints_are_honoured():
    scenes, _ = _scenes(200, n_shapes=2, unique_kinds=True, unique_colours=True)
    for s in scenes:
        assert s.shapes[0].kind != s.shapes[1].kind and s.shapes[0].colour != s.shapes[1].colour


def test_same_seed_same_files_other_seed_or_split_differs(tmp_path):
    a = make_shapes_dataset(tmp_path / "a", "train", 20, seed=3, questions_per_image=2)
    b = make_shapes_dataset(tmp_path / "b", "train", 20, seed=3, questions_per_image=2)
    c = make_shapes_dataset(tmp_path / "c", "train", 20, seed=4, questions_per_image=2)
    d = make_shapes_dataset(tmp_path / "a", "test", 20, seed=3, questions_per_image=2)
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    for i in range(20):
        name = f"images/train_{i:05d}.png"
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert a.read_text().replace("test_", "train_") != d.read_text().replace("test_", "train_")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["images", "test.jsonl", "train.jsonl"]  # no temp left


def _answered(path):
    """(question, answer, scene pixels) per turn, from the files on disk."""
    for sample in load_samples(path, check_images=True):
        assert sample.n_images == 1
        user, assistant = sample.messages[0::2], sample.messages[1::2]
        assert [m["role"] for m in user] == ["user"] * len(user) and [m["role"] for m in assistant] == ["assistant"] * len(user)
        assert {"type": "image"} in (user[0]["content"][0], user[0]["content"][-1])
        assert all(p["type"] == "text" for m in user[1:] + assistant for p in m["content"])
        for u, a in zip(user, assistant):
            text = next(p["text"] for p in u["content"] if p["type"] == "text")
            yield sample, text, a["content"][0]["text"]


def _qtype(q):
    if q == CAPTION_QUESTION:
        return "caption"
    if q.startswith("Which side") or "shape on the" in q:
        return "position"
    return {"What c": "colour", "What s": "shape", "How ma": "count", "Is the": "presence"}[q[:6]]


@pytest.mark.parametrize("per_image", [1, 3])
def test_split_is_balanced_and_loads(tmp_path, per_image):
    n = 300
    path = make_shapes_dataset(tmp_path, "train", n, seed=0, questions_per_image=per_image)
    assert path == tmp_path / "train.jsonl" and len(path.read_text().splitlines()) == n
    json.loads(path.read_text().splitlines()[0])  # plain JSON lines, paths relative to the file
    assert json.loads(path.read_text().splitlines()[0])["images"] == ["images/train_00000.png"]

    types, answers, per_sample, n_shapes = collections.Counter(), collections.Counter(), collections.Counter(), []
    for sample, q, a in _answered(path):
        t = _qtype(q)
        types[t] += 1
        per_sample[sample.line, t] += 1
        answers[t, a] += 1
        assert len(q) <= 40 and (t == "caption" or " " not in a)  # short questions, one-word answers
        if t == "count":
            n_shapes.append(int(a))
    assert types["caption"] == n
    assert max(per_sample.values()) == 1  # no question type twice for one image
    asked = [types[t] for t in ("colour", "shape", "count", "presence", "position")]
    assert sum(asked) >= n * per_image * 0.95
    assert max(asked) - min(asked) <= 0.1 * max(asked), types
    assert abs(answers["presence", "yes"] - answers["presence", "no"]) <= 1
    assert abs(answers["count", "1"] - answers["count", "2"]) <= 2
    assert set(a for (t, a) in answers if t == "colour") <= set(COLOURS)
    assert set(a for (t, a) in answers if t == "shape") <= set(KINDS)


def test_caption_share_adds_caption_only_images_and_keeps_questions_balanced(tmp_path):
    n = 400
    path = make_shapes_dataset(tmp_path, "train", n, seed=0, questions_per_image=1, captions=False, caption_share=0.2)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == n and all(len(r["messages"]) == 2 for r in rows)  # one turn each
    types = collections.Counter(_qtype(q) for _, q, _ in _answered(path))
    assert 0.14 * n <= types["caption"] <= 0.26 * n
    asked = [types[t] for t in ("colour", "shape", "count", "presence", "position")]
    assert sum(asked) == n - types["caption"] and max(asked) - min(asked) <= 0.1 * max(asked), types
    for sample, q, a in _answered(path):  # a caption names what is drawn
        if q == CAPTION_QUESTION:
            px = {tuple(c) for c in np.unique(np.asarray(Image.open(sample.images[0])).reshape(-1, 3), axis=0)}
            assert all(name in a for name, rgb in COLOURS.items() if rgb in px)


def test_question_first_puts_the_image_after_the_question(tmp_path):
    first = make_shapes_dataset(tmp_path / "q", "train", 50, seed=0, questions_per_image=2, question_first=True)
    plain = make_shapes_dataset(tmp_path / "p", "train", 50, seed=0, questions_per_image=2)
    rows, plain_rows = ([json.loads(x) for x in p.read_text().splitlines()] for p in (first, plain))
    for row, other in zip(rows, plain_rows):
        assert [p["type"] for p in row["messages"][0]["content"]] == ["text", "image"]
        assert other["messages"][0]["content"] == row["messages"][0]["content"][::-1]  # the same questions
        assert row["messages"][1:] == other["messages"][1:]
    list(_answered(first))  # loads, one image per row


def test_dataset_answers_match_the_images(tmp_path):
    # Read the pictures back: every colour answer must be a colour that is actually drawn.
    path = make_shapes_dataset(tmp_path, "val", 60, seed=1, questions_per_image=4, captions=False)
    drawn_in = {}
    for sample, q, a in _answered(path):
        if sample.line not in drawn_in:
            px = {tuple(c) for c in np.unique(np.asarray(Image.open(sample.images[0])).reshape(-1, 3), axis=0)}
            drawn_in[sample.line] = {name for name, rgb in COLOURS.items() if rgb in px}
        drawn = drawn_in[sample.line]
        if _qtype(q) == "count":
            assert int(a) == len(drawn) or len(drawn) == 1  # two shapes may share a colour
        if _qtype(q) in ("colour", "position") and a in COLOURS:
            assert a in drawn
        if q.startswith("Is there a") and q.endswith(" shape?"):
            assert (a == "yes") == (q.split()[3] in drawn)


def test_bad_arguments_raise_one_line(tmp_path):
    for kw in ({"n_images": 0}, {"questions_per_image": 0, "captions": False}, {"split": "../x"}, {"size": 8},
               {"caption_share": 1.0}):
        args = {"split": "train", "n_images": 2, "seed": 0} | kw
        with pytest.raises(VlmkitError) as e:
            make_shapes_dataset(tmp_path, **args)
        assert "\n" not in str(e.value)
