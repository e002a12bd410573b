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
    cfg = load_config(None, ["max_steps=12", "batch_size=6", "save_every=0"], data=str(data), output=str(tmp_path / "run"))
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
    written = json.loads((out / "quickstart.json").read_text())
    assert written["model"] == str(out / "model") and written["steps"] == 6
    assert (out / "model" / "config.json").is_file() and (out / "loss.png").is_file()
    printed = capsys.readouterr().out
    assert "held-out exact match" in printed and f"vlmkit generate --model {out / 'model'}" in printed
    assert re.search(r"training took [0-9.]+ min in (fp32|bf16|bf16-frozen) \(auto: ", printed)  # the precision used, and why


@pytest.mark.slow
def test_default_recipe_beats_a_constant_answer_on_held_out_images(tmp_path):
    """`vlmkit train` with no training keys on the real default parts: a tiny dataset whose answer is only
    in the image (the colour of one shape; the question never changes), scored on images it never saw.
    A constant answer gets 1/4; the trained model must get most of them."""
    from PIL import Image, ImageDraw

    from vlmkit.eval.run import evaluate
    from vlmkit.infer.engine import Engine

    colours = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220), "yellow": (235, 205, 25)}
    rng = __import__("random").Random(0)

    def write(split: str, n: int):
        (tmp_path / split).mkdir()
        rows = []
        for i in range(n):
            name = list(colours)[i % 4]
            im = Image.new("RGB", (96, 96), (255, 255, 255))
            x, y, r = rng.randint(20, 76), rng.randint(20, 76), rng.randint(10, 18)
            ImageDraw.Draw(im).ellipse((x - r, y - r, x + r, y + r), fill=colours[name])
            im.save(tmp_path / split / f"{i}.png")
            rows.append({"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the circle?"}]},
                                      {"role": "assistant", "content": [{"type": "text", "text": name}]}],
                         "images": [f"{split}/{i}.png"]})
        path = tmp_path / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    train_file, test_file = write("train", 96), write("test", 40)
    cfg = load_config(None, ["max_steps=60", "save_every=0"], data=str(train_file), output=str(tmp_path / "run"))
    summary = train(cfg)
    assert summary["recipe"]["method"]["value"] == "lora"
    vlm = load(summary["model"])
    report = evaluate(test_file, tmp_path / "eval.json", engine=Engine(vlm.model, vlm.processor), max_new_tokens=4)
    assert report["exact_match"] >= 0.75, report["exact_match"]  # a constant answer: 0.25
    # every decode precision reads the image as fp32 does (int4 weights in the prefill once lost it)
    scores = {d: evaluate(test_file, tmp_path / f"eval_{d}.json", engine=Engine(vlm.model, vlm.processor, decode=d),
                          max_new_tokens=4)["exact_match"] for d in ("fp32", "bf16", "int8", "int4")}
    assert min(scores.values()) >= scores["fp32"] - 0.1, scores


@pytest.mark.slow
def test_decoder_on_the_real_language_model():
    """SmolLM2-135M-Instruct's real weights (a few seconds): vlmkit's fp32 decode loop gives transformers'
    greedy tokens for a left-padded batch of chat prompts; int8 and int4 keep many of them."""
    from vlmkit.model.decoder import Decoder, decode
    from vlmkit.model.llm import load_llm

    lm, tokenizer = load_llm("smollm2-135m")
    tokenizer.padding_side = "left"
    prompts = ["Name three colours.", "What is the capital of France? Answer in one sentence.", "Count to five."]
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]
    inputs = dict(tokenizer(texts, return_tensors="pt", padding=True))
    pad, n = tokenizer.pad_token_id, 24
    with torch.inference_mode():
        want = lm.generate(**inputs, max_new_tokens=n, do_sample=False, pad_token_id=pad)[:, inputs["input_ids"].shape[1]:]
        eos = {lm.generation_config.eos_token_id} if isinstance(lm.generation_config.eos_token_id, int) else set(lm.generation_config.eos_token_id)
        got = decode(Decoder(lm.model, lm.lm_head, lm.config, "fp32"), lm, inputs, n, eos, pad)
        assert torch.equal(got, want), (tokenizer.batch_decode(got), tokenizer.batch_decode(want))
        assert "Paris" in tokenizer.decode(got[1])
        for precision in ("int8", "int4"):
            low = decode(Decoder(lm.model, lm.lm_head, lm.config, precision), lm, inputs, n, eos, pad)
            first = [int(torch.nonzero(row != ref).min()) if (row != ref).any() else n for row, ref in zip(low, want)]
            # tokens until the first difference, per reply: int8 keeps every reply's opening words (a near tie
            # later can send it elsewhere); int4 rounds more, and a reply can part at its second token
            assert sum(first) >= n and (precision == "int4" or min(first) >= 4), (precision, first)
