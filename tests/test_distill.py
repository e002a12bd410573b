"""`vlmkit distill`: each filter as a pure function; then whole runs over a folder with a tiny random VLM as the
teacher, loaded here and behind `vlmkit serve` (the same rows), a run killed mid-way and resumed (the same
manifest as an uninterrupted run), torn and half-written images repaired, bad images listed and skipped;
and the pipeline's bookkeeping (self-consistency, duplicates, proposed questions) with a scripted teacher
whose replies the test chooses; image-text similarity (--scorer) with a tiny random dual encoder."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_serve import Server
from tiny import make_varied_vlm

from vlmkit.data.schema import load_samples
from vlmkit.distill import filters as F
from vlmkit.distill.manifest import file_sha256, load_manifest
from vlmkit.distill.run import Plan, distill, parse_proposals, read_questions
from vlmkit.distill.teachers import ApiTeacher, LocalTeacher, Sampling
from vlmkit.errors import VlmkitError

SAMPLING = Sampling(max_new_tokens=6)


class Killed(Exception):
    """Stands for the process being killed after a batch's records are written."""


def kill(n):
    raise Killed


# -- the filters, one by one -------------------------------------------------------------------------
def test_empty_and_length():
    assert F.empty("  \n") == "empty" and F.empty("a red circle") is None
    assert F.length("red", 3, 10) == "too_short" and F.length("a red circle", 3, 10) is None
    assert F.length(" ".join(["word"] * 11), 3, 10) == "too_long"
    assert F.length("", 3, 10) is None  # `empty` says it, once
    filters = F.Filters()
    assert F.reply_reasons("red", "caption", filters) == ["too_short"]  # a caption needs 3 words
    assert F.reply_reasons("red", "qa", filters) == []  # a one-word answer is an answer
    assert F.Filters.of(min_words=2).bounds("qa") == (2, 300)


@pytest.mark.parametrize("text", ["I can't see the image.", "I'm sorry, but I cannot help with that.",
                                  "As an AI language model, I have no eyes.", "There is no image provided.",
                                  "I am unable to determine the colour."])
def test_refusals(text):
    assert F.refusal(text) == "refusal"


@pytest.mark.parametrize("text", ["A cat sits on a mat.", "The sign says: I can see clearly now.", "red"])
def test_not_refusals(text):
    assert F.refusal(text) is None


def test_repetition():
    assert F.repetition("the cat the cat the cat the cat the cat the cat") == "repetition"
    assert F.repetition("a red circle on the left and a red circle on the left and a red circle on the left and a red circle on the") == "repetition"
    assert F.repetition("!?!?!?!?!?!?!?!?") == "repetition"  # a loop of symbols, few words
    assert F.repetition("a red circle on the left and a blue square on the right.") is None
    assert F.repetition("yes") is None


def test_non_text():
    assert F.non_text("\ufffd\ufffd red") == "non_text"
    assert F.non_text("red\x00\x01") == "non_text"
    assert F.non_text("#@{}[]<>~^ |#@{}") == "non_text"
    assert F.non_text("A red circle (left), 50% of it.") is None
    assert F.non_text("Ein Hund läuft über die Straße.") is None  # letters of any script count


def test_self_consistency():
    assert F.consistency(["Red.", "red", "the red", "Blue"]) == [None, None, None, "disagrees"]
    assert F.consistency(["red", "blue"]) == ["no_agreement", "no_agreement"]  # half is not a majority
    assert F.consistency(["red", "red", "blue"], min_agreement=0.7) == ["no_agreement"] * 3
    assert F.consistency(["anything"]) == [None]


def test_duplicates_and_judge():
    seen = set()
    assert F.duplicate(F.duplicate_key("sha", "Q?", "A  Red"), seen) is None
    assert F.duplicate(F.duplicate_key("sha", "Q?", "a red"), seen) == "duplicate"  # case and spaces aside
    assert F.duplicate(F.duplicate_key("sha", "Other?", "a red"), seen) is None  # another question
    assert F.duplicate(F.duplicate_key("sha2", "Q?", "a red"), seen) is None  # another image
    seen = set()
    reasons = F.judge(["red", "Red", "red", "blue", ""], "qa", "sha", "Q?", True, F.Filters(), seen)
    assert reasons == [[], ["duplicate"], ["duplicate"], ["disagrees"], ["empty", "disagrees"]]


# -- a folder of images and a scripted teacher --------------------------------------------------------
def noise(path: Path, seed: int, size=(40, 30)) -> Path:
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture()
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for k in range(4):
        noise(folder / f"img{k}.png", k, size=(40 + 4 * k, 30))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)  # a truncated PNG
    (folder / "notes.jpg").write_text("not an image\n")
    return folder


def image_list(folder: Path) -> list[Path]:
    from vlmkit.infer.tasks import collect_images

    return [Path(os.path.abspath(p)) for p in collect_images([str(folder)])]


class Scripted:
    """A teacher whose reply is `script(request)`; it records what it was asked."""

    id = "scripted"
    params = {"kind": "test"}

    def __init__(self, script):
        self.script, self.asked = script, []

    def reply(self, requests):
        self.asked += requests
        return [self.script(r) for r in requests]


def test_self_consistency_duplicates_and_bad_images_in_a_run(tmp_path, images):
    shutil.copy(images / "img0.png", images / "copy.png")  # the same bytes under another name
    paths = image_list(images)
    teacher = Scripted(lambda r: "a small noisy picture" if r.task == "caption" else ["red", "red", "blue"][r.sample])
    plan = Plan(("caption", "qa"), {"": ["What colour is it?"]}, "q.txt", samples=3, temperature=0.7)
    out = tmp_path / "out"
    result = distill(teacher, paths, out, plan)
    assert sorted(Path(p).name for p, _ in result.unreadable) == ["broken.png", "notes.jpg"]
    assert all("corrupt or truncated" in why or "not an image file" in why for _, why in result.unreadable)
    assert not any(Path(str(r.image)).name in ("broken.png", "notes.jpg") for r in teacher.asked if isinstance(r.image, str))
    records = load_manifest(out)
    assert {Path(r["image"]).name for r in records} == {"img0.png", "img1.png", "img2.png", "img3.png", "copy.png"}
    assert len(records) == 5 * 6  # (1 caption + 1 question) x 3 samples per image
    for r in records:
        assert r["sha256"] == file_sha256(r["image"]) and r["of"] == 6
    qa = {(Path(r["image"]).name, r["sample"]): r for r in records if r["task"] == "qa"}
    assert qa["img1.png", 0]["status"] == "kept"
    assert qa["img1.png", 1]["reasons"] == ["duplicate"]  # agrees, but the same text is already kept
    assert qa["img1.png", 2]["reasons"] == ["disagrees"]
    assert qa["copy.png", 0]["status"] == "kept"
    assert qa["img0.png", 0]["reasons"] == ["duplicate"]  # the same image content (after copy.png) asked the same
    caps = [r for r in records if r["task"] == "caption"]
    assert sum(r["status"] == "kept" for r in caps) == 4  # one per distinct image; no self-consistency for captions

    summary = json.loads((out / "summary.json").read_text())
    assert summary["pairs"] == 30 and summary["kept"] == 8
    # duplicates: 11 captions; 5 second "red"s, img0's first "red" and its "blue" (also disagrees)
    assert summary["dropped_by_reason"] == {"disagrees": 5, "duplicate": 18}
    assert [Path(u["image"]).name for u in summary["unreadable"]] == ["broken.png", "notes.jpg"]
    rows = [json.loads(line) for line in (out / "data.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and len(load_samples(out / "data.jsonl")) == 8
    assert {r["messages"][1]["content"][0]["text"] for r in rows} == {"a small noisy picture", "red"}
    sheet = (out / "sheet.html").read_text()
    assert sheet.count('<div class="card') == 30 and sheet.count("data:image/png;base64,") == 30
    assert "dropped: disagrees" in sheet


def test_proposed_questions(tmp_path, images):
    assert parse_proposals("1. What colour is it?\n- How many shapes?\nA statement.\n3) What colour is it?", 5) == [
        "What colour is it?", "How many shapes?"]

    def script(r):
        if r.task == "propose":
            return "1. Is it bright?\n2. Is it noisy?\n3. Is it small?"
        return "yes"

    teacher = Scripted(script)
    paths = [p for p in image_list(images) if p.name.startswith("img")][:2]
    plan = Plan(("qa",), propose=2)
    distill(teacher, paths, tmp_path / "out", plan)
    records = load_manifest(tmp_path / "out")
    assert [r["prompt"] for r in records] == ["Is it bright?", "Is it noisy?"] * 2
    assert sum(r.task == "propose" for r in teacher.asked) == 2


def test_questions_file_and_settings(tmp_path, images):
    paths = image_list(images)
    (tmp_path / "q.jsonl").write_text(json.dumps({"question": "Is it square?"}) + "\n"
                                      + json.dumps({"image": "images/img1.png", "question": "Why?"}) + "\n")
    questions = read_questions(str(tmp_path / "q.jsonl"), paths)
    assert questions == {"": ["Is it square?"], str(images / "img1.png"): ["Why?"]}
    plan = Plan(("caption",), questions, "q.jsonl")
    assert plan.tasks == ("caption", "qa")
    assert plan.fixed_prompts(str(images / "img1.png"))[1:] == [("qa", "Is it square?"), ("qa", "Why?")]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"image": "nowhere.png", "question": "Why?"}) + "\n")
    with pytest.raises(VlmkitError, match=r"bad.jsonl:1: field `image`: nowhere.png is not one of the --images"):
        read_questions(str(tmp_path / "bad.jsonl"), paths)
    with pytest.raises(VlmkitError, match="give --temperature above 0"):
        Plan(samples=3)
    with pytest.raises(VlmkitError, match="--tasks caption,vqa: give one or more of caption, qa, ocr"):
        Plan(("caption", "vqa"))
    teacher = Scripted(lambda r: "a small noisy picture")
    distill(teacher, paths[:1], tmp_path / "out", Plan())
    with pytest.raises(VlmkitError, match="distilled with other settings \\(samples, temperature differ"):
        distill(teacher, paths[:1], tmp_path / "out", Plan(samples=2, temperature=0.5))


# -- image-text similarity with a dual encoder (--scorer) ----------------------------------------------
@pytest.fixture(scope="module")
def scorer_dir(parts, tmp_path_factory):
    """A tiny random dual encoder (CLIP tower, Llama text encoder: its byte-level tokenizer gives every text its
    own tokens), saved as `vlmkit train objective=contrastive` saves it."""
    from vlmkit.model.dual_encoder import create_dual_encoder

    root = tmp_path_factory.mktemp("scorer")
    model, processor = create_dual_encoder(parts["clip"], parts["llama"], 8)
    model.save(root / "run" / "model", processor)
    return root / "run"


# a reply per image (by its width), so that a resumed run's teacher answers as the first did
CAPTIONS = {40: "a red circle on the left", 44: "two blue squares in the middle", 48: "a handwritten digit seven",
            52: "a yellow triangle on the right"}


def by_width(r):
    return CAPTIONS[r.image.width] if r.task == "caption" else ["red", "blue", "green", "purple"][(r.image.width - 40) // 4]


def direct_similarity(scorer_dir, image: str, text: str) -> float:
    from vlmkit.model.dual_encoder import load_dual_encoder
    from vlmkit.retrieval.encode import embed_images, embed_texts

    model, processor = load_dual_encoder(scorer_dir)
    return float(embed_images(model, processor, [image])[0][0] @ embed_texts(model, processor, [text])[0])


def test_similarity_is_the_dual_encoders_cosine(tmp_path, images, scorer_dir):
    from vlmkit.distill.scorer import Scorer

    paths = image_list(images)
    plan = Plan(("caption", "qa"), {"": ["What colour is it?"]}, "q.txt")
    distill(Scripted(by_width), paths, tmp_path / "out", plan, scorer=Scorer(str(scorer_dir), min_similarity=-1))
    records = load_manifest(tmp_path / "out")
    assert len(records) == 4 * 2 and all(r["status"] == "kept" for r in records)
    for r in records:
        text = r["prompt"] + " " + r["reply"] if r["task"] == "qa" else r["reply"]  # QA: the question and the answer
        assert r["similarity"] == pytest.approx(direct_similarity(scorer_dir, r["image"], text), abs=1e-4)
    assert len({r["similarity"] for r in records}) == 8  # each pair its own score
    settings = json.loads((tmp_path / "out" / "distill.json").read_text())
    assert settings["scorer"] == str((scorer_dir / "model").resolve()) and settings["min_similarity"] == -1
    assert "similarity " in (tmp_path / "out" / "sheet.html").read_text()


def test_replies_below_the_threshold_are_dropped(tmp_path, images, scorer_dir):
    from vlmkit.distill.scorer import Scorer

    paths = [p for p in image_list(images) if p.name.startswith("img")]
    plan = Plan(("caption",))
    sims = sorted(direct_similarity(scorer_dir, str(p), CAPTIONS[40 + 4 * k]) for k, p in enumerate(paths))
    threshold = (sims[1] + sims[2]) / 2  # two replies below, two above
    out = tmp_path / "out"
    distill(Scripted(by_width), paths, out, plan, scorer=Scorer(str(scorer_dir), min_similarity=threshold))
    records = load_manifest(out)
    low = [r for r in records if r["similarity"] < threshold]
    assert len(low) == 2 and all(r["reasons"] == ["low_similarity"] and r["status"] == "dropped" for r in low)
    assert all(r["status"] == "kept" for r in records if r["similarity"] >= threshold)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kept"] == 2 and summary["dropped_by_reason"] == {"low_similarity": 2}
    assert len((out / "data.jsonl").read_text().splitlines()) == 2
    with pytest.raises(VlmkitError, match="distilled with other settings \\(min_similarity differ"):
        distill(Scripted(by_width), paths, out, plan, scorer=Scorer(str(scorer_dir), min_similarity=0.9))
    with pytest.raises(VlmkitError, match="distilled with other settings \\(min_similarity, scorer differ"):
        distill(Scripted(by_width), paths, out, plan)  # without the scorer


def test_cli_scorer_and_its_errors(tmp_path, images, model_dir, scorer_dir, capfd):
    from vlmkit.cli import main
    from vlmkit.distill.scorer import Scorer

    with pytest.raises(VlmkitError, match=r"--scorer \S*nowhere: no such folder; give a dual encoder"):
        Scorer(str(tmp_path / "nowhere"))
    with pytest.raises(VlmkitError, match=r"--scorer \S*teacher\S*: not a dual encoder \(no dual_encoder.json\); give the folder"):
        Scorer(str(model_dir))  # a VLM, not a dual encoder
    with pytest.raises(VlmkitError, match=r"--min-similarity 1.5: give a cosine similarity from -1 to 1"):
        Scorer(str(tmp_path), 1.5)
    argv = ["distill", "--teacher", str(model_dir), "--images", str(images), "--output", str(tmp_path / "out")]
    assert main(argv + ["--scorer", str(model_dir)]) == 2
    err = capfd.readouterr().err
    assert f"--scorer {model_dir}: not a dual encoder" in err and "Traceback" not in err
    assert main(argv + ["--min-similarity", "0.3"]) == 2
    assert "--min-similarity 0.3: give --scorer R too" in capfd.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing was started
    scored = argv + ["--scorer", str(scorer_dir), "--min-similarity", "-1", "--max-new-tokens", "4", "--min-words", "1"]
    assert main(scored) == 0
    records = load_manifest(tmp_path / "out")
    assert len(records) == 4 and all(isinstance(r["similarity"], float) for r in records)
    assert json.loads((tmp_path / "out" / "distill.json").read_text())["min_similarity"] == -1
    assert main(scored[:-6] + ["--max-new-tokens", "4", "--min-words", "1"]) == 2  # the default threshold, 0.2
    assert "min_similarity differ" in capfd.readouterr().err


def test_a_killed_run_with_the_scorer_resumes_to_the_same_manifest(tmp_path, images, scorer_dir):
    from vlmkit.distill.scorer import Scorer

    paths = image_list(images)
    plan = Plan(("caption", "qa"), {"": ["What colour is it?"]}, "q.txt")
    scorer = Scorer(str(scorer_dir), min_similarity=0.0)
    distill(Scripted(by_width), paths, tmp_path / "whole", plan, images_per_batch=3, scorer=scorer)

    out = tmp_path / "killed"
    with pytest.raises(Killed):
        distill(Scripted(by_width), paths, out, plan, images_per_batch=3, scorer=scorer, after_write=kill)
    assert 0 < len(load_manifest(out)) < 8
    distill(Scripted(by_width), paths, out, plan, images_per_batch=2, scorer=scorer)  # other batches this time
    assert (out / "manifest.jsonl").read_text() == (tmp_path / "whole" / "manifest.jsonl").read_text()


# -- a real teacher, local and behind the API ---------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_varied_vlm(tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="module")
def vlm(model_dir):
    from vlmkit.infer.load import load

    return load(str(model_dir), device="cpu", decode="fp32")  # the local/API comparison is exact in fp32 (docs/decode.md)


LOOSE = F.Filters.of(min_words=1)
PLAN = Plan(("caption", "qa"), {"": ["What is it?", "Is it noisy?"]}, "q.txt")


def run_local(vlm, paths, out, **kw):
    return distill(LocalTeacher(vlm, "tiny", SAMPLING, batch_size=4), paths, out, PLAN, LOOSE, images_per_batch=2, **kw)


def without_teacher(records):
    return [{k: v for k, v in r.items() if k != "teacher"} for r in records]


def test_local_teacher_replies_are_the_models(tmp_path, images, vlm):
    paths = image_list(images)
    result = run_local(vlm, paths, tmp_path / "out")
    assert result.done == 4 and len(result.unreadable) == 2
    records = load_manifest(tmp_path / "out")
    assert len(records) == 4 * 3
    for r in records[:3] + records[-3:]:
        prompt = "Describe this image in one or two sentences." if r["task"] == "caption" else r["prompt"]
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        assert r["reply"] == vlm.generate(messages, [r["image"]], max_new_tokens=6)
        assert r["teacher"] == {"id": "tiny", "temperature": 0.0, "kind": "local", "family": "vlmkit", "max_new_tokens": 6, "top_p": 1.0}
    assert len({r["reply"] for r in records}) > 3  # the replies depend on the image and the prompt


def test_api_teacher_gives_the_local_rows(tmp_path, images, vlm):
    paths = image_list(images)
    run_local(vlm, paths, tmp_path / "local")
    server = Server(vlm)
    try:
        teacher = ApiTeacher(f"{server.url}/v1", sampling=SAMPLING, concurrency=4)
        assert teacher.model == "tiny"
        distill(teacher, paths, tmp_path / "api", PLAN, LOOSE, images_per_batch=2)
    finally:
        server.close()
    local, api = load_manifest(tmp_path / "local"), load_manifest(tmp_path / "api")
    assert without_teacher(api) == without_teacher(local)
    assert api[0]["teacher"]["id"] == f"tiny at {server.url}/v1" and api[0]["teacher"]["kind"] == "api"
    assert (tmp_path / "api" / "data.jsonl").read_text() == (tmp_path / "local" / "data.jsonl").read_text()


def test_a_killed_run_resumes_to_the_same_manifest(tmp_path, images, vlm):
    paths = image_list(images)
    run_local(vlm, paths, tmp_path / "whole")
    whole = (tmp_path / "whole" / "manifest.jsonl").read_text()

    out = tmp_path / "killed"
    with pytest.raises(Killed):
        run_local(vlm, paths, out, after_write=kill)  # dies after the first batch: broken.png, img0.png
    assert len(load_manifest(out)) == 3 and not (out / "data.jsonl").exists()
    # the next batch died mid-write: img1 whole, img2 with one record and a torn line
    lines = whole.splitlines(keepends=True)
    with open(out / "manifest.jsonl", "a") as f:
        f.write("".join(lines[3:7]) + lines[7][:25])
    result = run_local(vlm, paths, out)
    assert result.skipped == 2 and result.done == 2  # the half-written img2 is done again
    assert (out / "manifest.jsonl").read_text() == whole
    assert (out / "data.jsonl").read_text() == (tmp_path / "whole" / "data.jsonl").read_text()
    again = run_local(vlm, paths, out)
    assert again.skipped == 4 and again.done == 0 and (out / "manifest.jsonl").read_text() == whole


def test_cli_distill(tmp_path, images, model_dir, capfd):
    from vlmkit.cli import main

    (tmp_path / "q.txt").write_text("What is it?\n\nIs it noisy?\n")
    out = tmp_path / "out"
    argv = ["distill", "--teacher", str(model_dir), "--images", str(images), "--tasks", "caption,qa",
            "--questions", str(tmp_path / "q.txt"), "--output", str(out), "--max-new-tokens", "6", "--min-words", "1"]
    assert main(argv) == 0
    captured = capfd.readouterr()
    assert "4 images, 12 pairs" in captured.out and "unreadable, skipped: " + str(images / "broken.png") in captured.out
    assert len(load_manifest(out)) == 12
    assert main(["distill", "--images", str(images), "--output", str(out)]) == 2
    assert "give --teacher MODEL" in capfd.readouterr().err
    assert main(["distill", "--teacher", str(model_dir), "--images", str(tmp_path / "none"), "--output", str(out)]) == 2
    assert "none: no such file or folder" in capfd.readouterr().err
