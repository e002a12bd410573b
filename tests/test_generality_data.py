"""The generality benchmark's datasets (bench/datasets.py): valid chat JSONL, fixed by their seed, no image in
both splits, and every answer as specified, checked against the pixels where the answer is about them."""

import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench/ is a folder of scripts, imported as a namespace package
    sys.path.insert(0, str(ROOT))

from bench import datasets as D  # noqa: E402
from bench.scenes import COLUMNS2, COLUMNS3, NINE, PALETTE, QUADRANTS, held_out  # noqa: E402
from vlmkit.data.schema import load_samples  # noqa: E402
from vlmkit.eval.run import question_type  # noqa: E402

N_TRAIN, N_TEST = 40, 20
SIZES = {"scenes3": 96, "grid": 128, "multiturn": 80, "unbalanced": 112, "captions": 120, "mnist": 64, "fashion": 80}
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# Fashion-MNIST's labels 0-9, from its README
CLOTHES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
SYNTHETIC = ["scenes3", "grid", "multiturn", "unbalanced", "captions"]


def available(name: str) -> bool:
    return name != "fashion" or (D.FASHION_DIR / "t10k-images-idx3-ubyte.gz").is_file()


def needs(name: str):
    if not available(name):
        pytest.skip("Fashion-MNIST is missing: apt-get install dataset-fashion-mnist (or set FASHION_MNIST_DIR)")


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """{name: (train.jsonl, test.jsonl)}: seed 0 for train, 1 for test, as the benchmark writes them."""
    root = tmp_path_factory.mktemp("generality")
    return {
        name: (maker(root / name, "train", N_TRAIN, 0), maker(root / name, "test", N_TEST, 1))
        for name, (maker, _, _) in D.DATASETS.items()
        if available(name)
    }


def rows(path: Path) -> list[tuple[list[tuple[str, str]], Image.Image, str | None]]:
    """Each sample as ([(question, answer), ...], its image, the system text or None)."""
    out = []
    for s in load_samples(path):
        text = ["".join(p["text"] for p in m["content"] if p["type"] == "text") for m in s.messages]
        roles = [m["role"] for m in s.messages]
        system = text[0] if roles[0] == "system" else None
        start = 1 if system is not None else 0
        assert roles[start:] == ["user", "assistant"] * ((len(roles) - start) // 2)
        out.append((list(zip(text[start::2], text[start + 1 :: 2])), Image.open(s.images[0]).convert("RGB"), system))
    return out


def cell_colours(image: Image.Image, layout) -> list[set[str]]:
    """The palette colours found in each cell of the layout (at least 4 pixels of exactly that colour)."""
    a = np.asarray(image)
    size = a.shape[0]
    found = []
    for cell in range(len(layout.names)):
        x0, y0, x1, y1 = layout.box(cell, size)
        block = a[y0:y1, x0:x1].reshape(-1, 3)
        found.append({c for c, rgb in PALETTE.items() if (block == rgb).all(axis=1).sum() >= 4})
    return found


@pytest.mark.parametrize("name", list(D.DATASETS))
def test_each_dataset_loads_with_its_sizes(written, name):
    needs(name)
    maker, n_train, n_test = D.DATASETS[name]
    assert 1500 <= n_train <= 3000 and 200 <= n_test <= 300  # fits a 15-minute CPU budget
    for path, n in zip(written[name], (N_TRAIN, N_TEST)):
        samples = load_samples(path, check_images=True)
        assert len(samples) == n
        for s in samples:
            assert s.n_images == 1 and s.messages[-1]["role"] == "assistant"
            assert Path(s.images[0]).relative_to(path.parent)  # under the JSONL's folder
            assert Image.open(s.images[0]).size == (SIZES[name], SIZES[name])


@pytest.mark.parametrize("name", list(D.DATASETS))
def test_same_seed_gives_the_same_bytes_and_another_seed_other_data(written, tmp_path, name):
    needs(name)
    maker = D.DATASETS[name][0]
    again = maker(tmp_path / "again", "test", N_TEST, 1)
    other = maker(tmp_path / "other", "test", N_TEST, 2)
    first = written[name][1]
    assert again.read_bytes() == first.read_bytes()
    for png in sorted((first.parent / "images").glob("test_*.png")):
        assert (again.parent / "images" / png.name).read_bytes() == png.read_bytes()
    assert other.read_bytes() != first.read_bytes()


@pytest.mark.parametrize("name", list(D.DATASETS))
def test_no_image_is_in_both_splits(written, name):
    needs(name)
    train, test = ({Image.open(s.images[0]).convert("RGB").tobytes() for s in load_samples(p)} for p in written[name])
    assert not train & test
    if name in SYNTHETIC:  # the rule that makes it so whatever the seeds: held-out iff the pixels' hash says so
        assert not any(held_out(b) for b in train) and all(held_out(b) for b in test)


@pytest.mark.parametrize("name, source", [("mnist", D.mnist), ("fashion", D.fashion_mnist)])
def test_real_images_at_full_size_use_disjoint_sources_balanced_by_class(name, source):
    needs(name)
    images, labels = source()
    _, n_train, n_test = D.DATASETS[name]
    train = D.pick_sources(images, labels, "train", n_train, np.random.default_rng(0))
    test = D.pick_sources(images, labels, "test", n_test, np.random.default_rng(1))
    assert len(set(train)) == n_train and len(set(test)) == n_test
    assert not {images[i].tobytes() for i in train} & {images[i].tobytes() for i in test}
    assert set(Counter(labels[test].tolist()).values()) == {n_test // 10}


@pytest.mark.parametrize("name, source, question, words", [
    ("mnist", D.mnist, "Which digit is this?", DIGITS),
    ("fashion", D.fashion_mnist, "What item of clothing is this?", CLOTHES),
])
def test_real_image_answers_name_the_label_of_the_image_shown(written, name, source, question, words):
    needs(name)
    images, labels = source()
    for split, seed, path in (("train", 0, written[name][0]), ("test", 1, written[name][1])):
        picked = D.pick_sources(images, labels, split, len(load_samples(path)), D._rng(name, split, seed))
        for (qas, image, _), i in zip(rows(path), picked):
            assert qas == [(question, words[labels[i]])]
            assert image.tobytes() == D.upscale(images[i], SIZES[name]).tobytes()
    answers = Counter(qas[0][1] for qas, _, _ in rows(written[name][1]))
    assert len(answers) == 10 and set(answers.values()) == {N_TEST // 10}  # classes balanced


def check_scenes3(q: str, answer: str, cells: list[set[str]]) -> str:
    present = set().union(*cells)
    if m := re.fullmatch(r"What colour is the (circle|square|triangle|diamond)\?", q):
        assert answer in list(PALETTE)[:6] and answer in present
        return "colour"
    if m := re.fullmatch(r"What shape is the (\w+) one\?", q):
        assert answer in ("circle", "square", "triangle", "diamond") and m[1] in present
        return "shape"
    if q == "How many objects are there?":
        assert answer == DIGITS[sum(bool(c) for c in cells)]  # a number word
        return "count"
    if m := re.fullmatch(r"Is there an? (\w+) (\w+)\?", q):
        assert answer in ("yes", "no") and (answer == "no" or m[1] in present)
        return answer
    m = re.fullmatch(r"Which column is the (\w+) (\w+) in\?", q)
    assert m and m[1] in cells[COLUMNS3.names.index(answer)]
    return "position"


def test_scenes3_answers_follow_the_pixels_and_types_are_balanced(written):
    for path in written["scenes3"]:
        kinds = Counter(check_scenes3(*qas[0], cell_colours(im, COLUMNS3)) for qas, im, _ in rows(path))
        n = sum(kinds.values())
        assert [kinds[t] for t in ("colour", "shape", "count", "position")] == [n // 5] * 4
        assert kinds["yes"] == kinds["no"] == n // 10


def test_grid_answers_follow_the_pixels(written):
    seen = set()
    for qas, im, _ in rows(written["grid"][0]) + rows(written["grid"][1]):
        (q, answer), = qas
        cells = cell_colours(im, QUADRANTS)
        present = set().union(*cells)
        seen.add(question_type([{"content": [{"type": "text", "text": q}]}]))
        if m := re.fullmatch(r"Name the colour of the (\w+)\.", q):
            assert answer in present
        elif q == "How many objects are in the picture?":
            assert answer == str(sum(bool(c) for c in cells))  # digits here
        elif m := re.fullmatch(r"Where is the (\w+) (\w+)\?", q):
            assert m[1] in cells[QUADRANTS.names.index(answer)]
        elif m := re.fullmatch(r"What is in the (.+) quadrant\?", q):
            cell = cells[QUADRANTS.names.index(m[1])]
            assert (answer == "nothing") == (not cell) and (answer == "nothing" or answer.split()[0] in cell)
        else:
            assert re.fullmatch(r"Are there any (circles|squares|triangles|diamonds|crosses|stars)\?", q)
            assert answer in ("yes", "no")
    assert seen == {"name the", "how many", "where is", "what is", "are there"}  # one report group per type


def test_multiturn_asks_three_types_in_one_conversation(written):
    last = Counter()
    for path in written["multiturn"]:
        for qas, im, system in rows(path):
            assert system == "Answer with one word." and len(qas) == 3
            types = [question_type([{"content": [{"type": "text", "text": q}]}]) for q, _ in qas]
            assert len(set(types)) == 3
            cells = cell_colours(im, COLUMNS3)
            for q, answer in qas:
                if m := re.fullmatch(r"Is the (\w+) \w+ to the left of the (\w+) \w+\?", q):
                    left_of = [i for i, c in enumerate(cells) if m[1] in c][0] < [i for i, c in enumerate(cells) if m[2] in c][0]
                    assert answer == ("yes" if left_of else "no")
                elif q == "How many things are in the image?":
                    assert answer == str(sum(bool(c) for c in cells))
                elif m := re.fullmatch(r"Which colour is the \w+\?", q):
                    assert answer in set().union(*cells)
            last[types[-1]] += path.name == "test.jsonl"
    assert set(last.values()) == {N_TEST // 5}  # the held-out question's type is balanced


def test_unbalanced_trains_on_60_25_10_5_and_tests_on_equal_shares(written):
    train, test = ([question_type([{"content": [{"type": "text", "text": qas[0][0]}]}]) for qas, _, _ in rows(p)]
                   for p in written["unbalanced"])
    order = ["what colour", "how many", "which shape", "is the"]
    assert [Counter(train)[t] for t in order] == [24, 10, 4, 2]
    assert [Counter(test)[t] for t in order] == [5, 5, 5, 5]
    for qas, im, _ in rows(written["unbalanced"][1]):
        (q, answer), = qas
        if m := re.fullmatch(r"Is the (\w+) \w+ on the left or the right\?", q):
            assert m[1] in cell_colours(im, COLUMNS2)[COLUMNS2.names.index(answer)]


def test_captions_are_sentences_that_describe_the_pixels(written):
    place = {"in the top left corner": "top left", "at the top": "top", "in the top right corner": "top right",
             "on the left": "left", "in the centre": "centre", "on the right": "right",
             "in the bottom left corner": "bottom left", "at the bottom": "bottom",
             "in the bottom right corner": "bottom right"}
    one = r"an? (small|large) (\w+) (circle|square|triangle|diamond|cross|star) (" + "|".join(place) + ")"
    for qas, im, _ in rows(written["captions"][1]):
        (q, answer), = qas
        assert q in ("Describe the image.", "Write a caption for this picture.", "What do you see?")
        m = re.fullmatch(r"(One|Two|Three) shapes?: (.+)\.", answer)
        assert m, answer
        objects = re.split(r", | and ", m[2])
        assert all(re.fullmatch(one, o) for o in objects) and len(objects) == DIGITS.index(m[1].lower())
        cells = cell_colours(im, NINE)
        assert sum(bool(c) for c in cells) == len(objects)
        for o in objects:
            _, colour, _, where = re.fullmatch(one, o).groups()
            assert colour in cells[NINE.names.index(place[where])]
