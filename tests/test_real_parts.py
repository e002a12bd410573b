"""The real default parts (EfficientNet-Lite0 ImageNet weights + SmolLM2-135M-Instruct GGUF), a few steps.

Slow (about two minutes on 2 CPU cores) but it is the one test that proves the default path works:
the GGUF loads, the features are cached, the loss falls, the trained model answers in the data's words and
stops (the untrained one says "The answer is"), and what it says depends on the image.
"""

import json
import re

import pytest
import torch

from vlmkit.config import load_config
from vlmkit.data.shapes import make_shapes_dataset
from vlmkit.infer.load import load
from vlmkit.train.loop import train


@pytest.mark.slow
def test_default_parts_train_and_answer(tmp_path):
    data = make_shapes_dataset(tmp_path / "data", "train", 48, seed=0, questions_per_image=3, captions=False)
    cfg = load_config(None, ["max_steps=8", "batch_size=6", "save_every=0"], data=str(data), output=str(tmp_path / "run"))
    summary = train(cfg)
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    first, last = history[0]["loss"], sum(r["loss"] for r in history[-3:]) / 3
    assert last < 0.5 * first, (first, last)

    vlm = load(summary["model"])
    images = [str(p) for p in sorted((tmp_path / "data" / "images").glob("*.png"))[:2]]
    question = "How many shapes are there?"
    # the shapes data answers this with "1" or "2" and nothing else: one word, then <|im_end|>, which decoding drops
    assert vlm.ask(images[0], question, max_new_tokens=4) in {"1", "2"}

    # the image reaches the LM: two pictures, two different next-token distributions (total variation
    # measured 0.08 to 0.11 between training images; exactly 0 if the image were ignored)
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    with torch.no_grad():
        p, q = (vlm.model(**vlm.engine.inputs([conversation], [[i]])).logits[0, -1].softmax(-1) for i in images)
    assert 0.5 * (p - q).abs().sum() > 0.01


@pytest.mark.slow
def test_quickstart_runs_end_to_end(tmp_path, monkeypatch, capsys):
    """The main job on fewer images and steps: data, compose, eval, train, eval, report, summary."""
    import vlmkit.quickstart as qs

    full = qs.make_data
    monkeypatch.setattr(qs, "make_data", lambda folder: full(folder, train_images=40, test_images=12))
    out = tmp_path / "qs"
    result = qs.quickstart(str(out), overrides=["max_steps=6", "save_every=0"])

    report = json.loads((out / "eval.json").read_text())
    assert {"n", "exact_match", "vqa_accuracy", "bleu4", "rougeL", "cider"} <= set(report) and report["n"] == 12
    assert result["after"]["exact_match"] == report["exact_match"]
    assert len((out / "eval.predictions.jsonl").read_text().splitlines()) == 12
    assert json.loads((out / "quickstart.json").read_text())["model"] == str(out / "model")
    assert (out / "model" / "config.json").is_file() and (out / "loss.png").is_file()
    printed = capsys.readouterr().out
    assert "held-out exact match" in printed and f"vlmkit generate --model {out / 'model'}" in printed
    assert re.search(r"training took [0-9.]+ min in (fp32|bf16) \(auto: ", printed)  # the precision used, and why
