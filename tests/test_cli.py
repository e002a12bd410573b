"""The command line end to end on a tiny composed model saved to disk: what each command prints and
writes, and, for each kind of bad input, exit status 2 with ONE `error:` line naming the culprit."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers / huggingface_hub are imported: never the network

import io
import json
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny import make_clip_vision, make_llama

from vlmkit.cli import main

MAX_NEW = "6"


# -- fixtures ----------------------------------------------------------------------------------------
def _noise(path, seed, size=(40, 30)):
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return path


def _png_header(path, width, height):
    """A tiny PNG that claims to be width x height: a decompression bomb as PIL sees it."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 8)) + chunk(b"IEND", b""))
    return path


def _row(question, answer=None, images=("red.png",)):
    messages = [{"role": "user", "content": [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return json.dumps({"messages": messages, "images": list(images)})


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    """A folder with a saved tiny model, good and bad images, and data files."""
    from vlmkit.build import compose

    root = tmp_path_factory.mktemp("cli")
    model, processor = compose(
        vision=str(make_clip_vision(root / "clip")), llm=str(make_llama(root / "llm")), image_tokens=4
    )
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    _noise(root / "red.png", 0)
    _noise(root / "blue.png", 1, size=(24, 36))
    (root / "empty.png").write_bytes(b"")
    good = (root / "red.png").read_bytes()
    (root / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "text.png").write_text("this is not an image\n")
    _png_header(root / "bomb.png", 100_000, 100_000)
    (root / "good.jsonl").write_text(
        _row("What colour is it?", "red") + "\n"
        + _row("Compare them.", "different", images=("red.png", "blue.png")) + "\n"
        + _row("Is it red?", "yes") + "\n"
    )
    (root / "malformed.jsonl").write_text(_row("What colour?", "red") + "\n" + '{"messages": [\n')
    return root


def run(capfd, *argv):
    code = main([str(a) for a in argv])
    out, err = capfd.readouterr()
    return code, out, err


def user_error(capfd, *argv, names=()):
    """Run a command that must fail on the user's input: exit 2, one `error:` line, no traceback."""
    code, out, err = run(capfd, *argv)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for name in names:
        assert str(name) in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def vlm(w):
    from vlmkit.infer.load import load

    return load(str(w / "model"), device="cpu")


def _user(text, n_images=1):
    return {"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}


# -- generate ----------------------------------------------------------------------------------------
# A random tiny LM's reply says little about its input, so the engine is wrapped to record what the CLI
# asked it for; the reply it printed is compared with what the real engine produced.
@pytest.fixture
def calls(monkeypatch):
    from vlmkit.infer.engine import Engine

    seen = []
    stream, generate = Engine.stream, Engine.generate

    def spy_stream(self, messages, images=None, **kw):
        pieces = list(stream(self, messages, images, **kw))
        seen.append({"messages": messages, "images": [str(i) for i in images or []], "reply": "".join(pieces), **kw})
        yield from pieces

    def spy_generate(self, conversations, images=None, **kw):
        replies = generate(self, conversations, images, **kw)
        seen.append({"messages": conversations, "images": [[str(i) for i in g] for g in images], "reply": replies, **kw})
        return replies

    monkeypatch.setattr(Engine, "stream", spy_stream)
    monkeypatch.setattr(Engine, "generate", spy_generate)
    return seen


def test_generate_one_image(w, capfd, calls):
    code, out, err = run(capfd, "generate", "--model", w / "model", "--image", w / "red.png", "--prompt", "What colour?", "--max-new-tokens", MAX_NEW)
    assert code == 0, err
    [call] = calls
    assert call["messages"] == [_user("What colour?")]
    assert call["images"] == [str(w / "red.png")] and call["max_new_tokens"] == 6
    assert out == call["reply"] + "\n"


def test_generate_two_images_and_a_system_message(w, capfd, calls):
    code, out, err = run(
        capfd, "generate", "--model", w / "model", "--image", w / "red.png", "--image", w / "blue.png",
        "--prompt", "Compare them.", "--system", "Be brief.", "--max-new-tokens", MAX_NEW,
    )
    assert code == 0, err
    [call] = calls
    system = {"role": "system", "content": [{"type": "text", "text": "Be brief."}]}
    assert call["messages"] == [system, _user("Compare them.", 2)]
    assert call["images"] == [str(w / "red.png"), str(w / "blue.png")]
    assert out == call["reply"] + "\n"


def test_generate_messages_file(w, capfd, calls, tmp_path):
    messages = [
        {"role": "user", "content": [{"type": "image", "image": "red.png"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A square."},
        {"role": "user", "content": [{"type": "image", "image": str(w / "blue.png")}, {"type": "text", "text": "And this?"}]},
    ]
    path = w / "conv.json"  # relative image paths resolve against the file's folder
    path.write_text(json.dumps(messages))
    code, out, err = run(capfd, "generate", "--model", w / "model", "--messages", path, "--max-new-tokens", MAX_NEW)
    assert code == 0, err
    [call] = calls
    assert call["messages"] == [_user("What is it?"), {"role": "assistant", "content": [{"type": "text", "text": "A square."}]}, _user("And this?")]
    assert call["images"] == [str(w / "red.png"), str(w / "blue.png")]
    assert out == call["reply"] + "\n"

    path = tmp_path / "broken.json"
    path.write_text("[{\"role\": ")
    user_error(capfd, "generate", "--model", w / "model", "--messages", path, names=[path])
    user_error(capfd, "generate", "--model", w / "model", "--messages", tmp_path / "gone.json", names=[tmp_path / "gone.json"])


def test_generate_batch_prints_one_json_line_per_row(w, capfd, calls, tmp_path):
    batch = w / "batch.jsonl"
    batch.write_text((w / "good.jsonl").read_text() + _row("No answer yet?", images=("blue.png",)) + "\n")
    code, out, err = run(capfd, "generate", "--model", w / "model", "--batch", batch, "--batch-size", "2", "--max-new-tokens", MAX_NEW)
    assert code == 0, err
    [call] = calls
    # rows with an answer are asked without it; a row without one is asked as it is
    assert call["messages"] == [[_user("What colour is it?")], [_user("Compare them.", 2)], [_user("Is it red?")], [_user("No answer yet?")]]
    red, blue = str(w / "red.png"), str(w / "blue.png")
    assert call["images"] == [[red], [red, blue], [red], [blue]]
    assert call["batch_size"] == 2
    assert [json.loads(line) for line in out.splitlines()] == [{"prediction": p} for p in call["reply"]]


# -- eval --------------------------------------------------------------------------------------------
def test_eval_with_a_model_writes_report_and_predictions(w, capfd, tmp_path):
    report_path = tmp_path / "r.json"
    code, out, err = run(capfd, "eval", "--model", w / "model", "--data", w / "good.jsonl", "--output", report_path, "--max-new-tokens", "4")
    assert code == 0, err
    report = json.loads(report_path.read_text())
    assert {"n", "exact_match", "vqa_accuracy", "bleu4", "rougeL", "cider"} <= set(report)
    assert report["n"] == 3
    assert json.loads(out)["n"] == 3  # the summary on stdout is the report without by_type
    rows = [json.loads(line) for line in (tmp_path / "r.predictions.jsonl").read_text().splitlines()]
    assert [r["reference"] for r in rows] == ["red", "different", "yes"]
    assert report["exact_match"] == pytest.approx(sum(r["correct"] for r in rows) / 3)


def test_eval_scores_existing_predictions_without_a_model(w, capfd, tmp_path):
    preds = tmp_path / "p.jsonl"
    preds.write_text("".join(json.dumps({"prediction": p}) + "\n" for p in ["Red", "the same", "yes"]))
    code, _, err = run(capfd, "eval", "--data", w / "good.jsonl", "--predictions", preds, "--output", tmp_path / "r.json")
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["n"] == 3 and report["exact_match"] == pytest.approx(2 / 3)

    preds.write_text(json.dumps({"prediction": "red"}) + "\n")  # one prediction for three samples
    user_error(capfd, "eval", "--data", w / "good.jsonl", "--predictions", preds, "--output", tmp_path / "r2.json", names=[preds])


def test_eval_on_bad_data_keeps_the_existing_report(w, capfd, tmp_path):
    report_path = tmp_path / "existing.json"
    report_path.write_text('{"precious": true}\n')
    line = user_error(capfd, "eval", "--model", w / "model", "--data", w / "malformed.jsonl", "--output", report_path)
    assert f"{w / 'malformed.jsonl'}:2" in line
    assert report_path.read_text() == '{"precious": true}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing.json"]  # no predictions, no temp files


# -- inspect -----------------------------------------------------------------------------------------
def test_inspect_reports_parts_counts_and_tokens(w, vlm, capfd):
    code, out, err = run(capfd, "inspect", w / "model", "--image", w / "blue.png", "--prompt", "Which shape?")
    assert code == 0, err
    total = sum(p.numel() for p in vlm.model.parameters())
    tower = sum(p.numel() for p in vlm.model.vision_tower.parameters())
    assert f"{total:,}" in out and f"{tower:,}" in out
    assert "clip_vision_model" in out and "mlp" in out and "LlamaForCausalLM" in out
    assert "24x36" in out  # the real image's size
    assert "(1, 3, 32, 32)" in out and "(1, 4, 4, 32)" in out and "(1, 2, 2, 32)" in out and "(1, 4, 64)" in out
    assert "<image x4>Which shape?" in out and "template and render agree" in out
    assert "<|im_start|>" in out  # the chat template

    user_error(capfd, "inspect", w / "model", "--image", w / "text.png", names=[w / "text.png"])


# -- data check --------------------------------------------------------------------------------------
def test_data_check_good_file_shows_trained_tokens(w, vlm, capfd):
    code, out, err = run(capfd, "data", "check", w / "good.jsonl", "--model", w / "model")
    assert code == 0, err
    assert "3 samples, 2 images, 0 problems" in out
    assert "<image x4>What colour is it?" in out
    rendered = out.split("[[...]]:", 1)[1]
    assert "[[red<|im_end|>]]" in rendered  # the answer and its end of turn are trained; nothing else is
    assert rendered.count("[[") == 1
    ids, labels = vlm.processor.render([_user("What colour is it?"), {"role": "assistant", "content": "red"}])
    n_trained = sum(label != -100 for label in labels)
    assert n_trained == 1 + len(vlm.processor.tokenizer.encode("red", add_special_tokens=False))
    assert f"{len(ids)} tokens, {n_trained} trained, 4 image tokens" in rendered

    code, out, _ = run(capfd, "data", "check", w / "good.jsonl", "--no-sample")
    assert code == 0 and out.strip() == "3 samples, 2 images, 0 problems"


def test_data_check_default_tokenizer(w, capfd, monkeypatch):
    """Without --model the default LM's tokenizer renders the sample (no weights loaded)."""
    import vlmkit.build

    def no_weights(*args, **kwargs):
        raise AssertionError("data check loaded a model")

    monkeypatch.setattr(vlmkit.build, "load_llm", no_weights)
    code, out, err = run(capfd, "data", "check", w / "good.jsonl")
    assert code == 0, err
    # the default composition: a 3x3 grid, each column after its word
    assert " left<image x3> middle<image x3> right<image x3>What colour is it?" in out and "[[red<|im_end|>]]" in out


def test_data_check_bad_file_lists_every_problem(w, capfd, tmp_path):
    bad = tmp_path / "bad.jsonl"
    rows = [
        _row("fine", "yes", images=(str(w / "red.png"),)),
        '{"messages": [',
        _row("where?", "here", images=(str(w / "nowhere.png"),)),
        _row("empty?", "yes", images=(str(w / "empty.png"),)),
        _row("cut?", "yes", images=(str(w / "truncated.png"),)),
        _row("bomb?", "yes", images=(str(w / "bomb.png"),)),
        json.dumps({"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "ok"}]}),
    ]
    bad.write_text("\n".join(rows) + "\n")
    with pytest.raises(SystemExit) as e:
        main(["data", "check", str(bad), "--model", str(w / "model")])
    assert e.value.code == 1
    out, _ = capfd.readouterr()
    lines = out.strip().splitlines()
    for n, needle in [(2, "invalid JSON"), (3, "nowhere.png"), (4, "empty.png"), (5, "truncated.png"), (6, "bomb.png"), (7, "robot")]:
        assert any(line.startswith(f"{bad}:{n}:") and needle in line for line in lines), (n, out)
    assert lines[-1] == "1 samples, 1 images, 6 problems"
    assert "[[" not in out  # no sample is rendered for a dataset with problems


# -- chat --------------------------------------------------------------------------------------------
def test_chat_with_scripted_input(w, capfd, monkeypatch):
    script = [f"/image {w / 'nowhere.png'}", f"/image {w / 'red.png'}", "What colour?", "/bogus", "And now?", "/reset", "Hi."]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(script) + "\n"))  # then EOF ends the chat
    code, out, err = run(capfd, "chat", "--model", w / "model", "--max-new-tokens", "4")
    assert code == 0, err
    assert f"error: {w / 'nowhere.png'}: image file not found" in out
    assert f"(image {w / 'red.png'} attached" in out
    assert "error: unknown command /bogus" in out
    assert out.count("assistant> ") == 3
    assert "(conversation cleared)" in out


def test_chat_keeps_history_and_images(w, vlm):
    seen = []

    class Spy:
        def stream(self, messages, images, **kw):
            seen.append((messages, list(images)))
            yield from vlm.engine.stream(messages, images, **kw)

    lines = iter([f"/image {w / 'red.png'}", "First?", f"/image {w / 'blue.png'}", "Second?", "/reset", "Third?", "/quit", "never"])
    out = io.StringIO()
    from vlmkit.infer.chat import chat_loop

    chat_loop(Spy(), system="Be brief.", max_new_tokens=3, input_fn=lambda _: next(lines), output=out)
    assert [len(m) for m, _ in seen] == [2, 4, 2]  # system + user; + assistant + user; after /reset again
    assert [len(i) for _, i in seen] == [1, 2, 0]
    second = seen[1][0]
    assert [m["role"] for m in second] == ["system", "user", "assistant", "user"]
    assert second[2]["content"][0]["text"] == vlm.generate(seen[0][0], seen[0][1], max_new_tokens=3)
    assert second[3]["content"][0] == {"type": "image"}


# -- bad input: exit 2, one line ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "image, says",
    [
        ("nowhere.png", "not found"),
        ("empty.png", "empty"),
        ("truncated.png", "truncated"),
        ("text.png", "not an image"),
        ("bomb.png", "too large"),
    ],
)
def test_bad_image_is_one_error_line(w, capfd, image, says):
    line = user_error(capfd, "generate", "--model", w / "model", "--image", w / image, "--prompt", "Hi?", names=[w / image])
    assert says in line


def test_malformed_batch_names_file_and_line(w, capfd):
    line = user_error(capfd, "generate", "--model", w / "model", "--batch", w / "malformed.jsonl")
    assert f"{w / 'malformed.jsonl'}:2" in line and "invalid JSON" in line


def test_missing_model_folder(w, capfd):
    user_error(capfd, "generate", "--model", w / "no_such_model", "--prompt", "Hi?", names=[w / "no_such_model"])
    user_error(capfd, "inspect", w / "no_such_model", names=[w / "no_such_model"])


def test_train_unknown_config_key(w, capfd, tmp_path):
    user_error(capfd, "train", "--data", w / "good.jsonl", "--output", tmp_path / "run", "bogus_key=1", names=["unknown config key `bogus_key`"])
    assert not (tmp_path / "run").exists()


def test_train_unknown_vision_tower_fails_fast_offline(w, capfd, tmp_path):
    start = time.time()
    code, _, err = run(capfd, "train", "--data", w / "good.jsonl", "--output", tmp_path / "run", "vision=nonexistent_tower_xyz", "max_steps=1")
    assert code == 2
    assert time.time() - start < 120  # no hub retries: a wrong name fails at once, not after timeouts
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err
    assert "vision tower 'nonexistent_tower_xyz'" in errors[0]
    assert any(s in errors[0] for s in ("unknown", "not found", "not a built-in name"))


# -- the installed entry points ----------------------------------------------------------------------
def test_entry_points_exit_codes(w, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "vlmkit", "--help"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0 and "generate" in r.stdout and "data" in r.stdout

    script = shutil.which("vlmkit", path=str(Path(sys.executable).parent)) or "vlmkit"
    r = subprocess.run([script, "train", "--data", str(w / "good.jsonl"), "nope=1"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2
    assert r.stdout == "" and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1

    r = subprocess.run([script, "generate"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2 and "--model" in r.stderr  # argparse's own usage error


def test_data_shapes_writes_a_split_that_checks(capfd, tmp_path):
    code, out, _ = run(capfd, "data", "shapes", "--output", tmp_path, "--split", "val", "--n", 6, "--question-first")
    path = tmp_path / "val.jsonl"
    assert code == 0 and str(path) in out
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 6 and all(r["messages"][0]["content"][-1] == {"type": "image"} for r in rows)
    assert run(capfd, "data", "check", path, "--no-sample")[0] == 0


def test_quickstart_trains_about_ten_minutes_on_cpu_unless_told(capfd, monkeypatch):
    import vlmkit.quickstart as qs
    from vlmkit.device import resolve_device

    assert qs.default_minutes("cpu") == qs.CPU_MINUTES == 10 and qs.default_minutes("cuda") is None
    asked = []
    monkeypatch.setattr(qs, "quickstart", lambda output, minutes, overrides: asked.append((minutes, overrides)))
    assert run(capfd, "quickstart", "--output", "x")[0] == 0
    assert run(capfd, "quickstart", "--output", "x", "--minutes", "0", "seed=1")[0] == 0
    assert asked == [(qs.default_minutes(resolve_device().type), []), (0, ["seed=1"])]
