"""Training precision: what `precision=auto` picks with and without CPU bf16 units (forced either way with
VLMKIT_CPU_BF16, so both paths run on any machine), and the bf16 path's exact equalities on tiny models.

Emulated bf16 is slow on CPUs without bf16 units, so the bf16 runs here are a few steps of tiny models.
"""

import json
import math

import pytest
import torch

from vlmkit.config import load_config
from vlmkit.device import cpu_has_bf16, training_precision
from vlmkit.errors import VlmkitError
from vlmkit.build import load_model
from vlmkit.train.loop import train


@pytest.mark.parametrize("units", ["0", "1"])
def test_auto_trains_in_fp32_on_cpu_with_or_without_bf16_units(parts, shapes, tmp_path, monkeypatch, units):
    monkeypatch.setenv("VLMKIT_CPU_BF16", units)
    assert cpu_has_bf16() == (units == "1")
    train_file, _ = shapes
    cfg = load_config(None, [f"vision={parts['clip']}", f"llm={parts['llama']}", "max_steps=1", "batch_size=2", "save_every=0"],
                      data=str(train_file), output=str(tmp_path / "run"))
    summary = train(cfg)
    assert summary["precision"] == "fp32"
    assert ("docs/precision.md" in summary["precision_reason"]) == (units == "1")
    assert "no bf16 units" in summary["precision_reason"] or units == "1"
    assert json.loads((tmp_path / "run" / "train_summary.json").read_text())["precision"] == "fp32"


def test_precision_resolution(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert training_precision("bf16", cpu).bf16 and training_precision("bf16", cpu).dtype == torch.bfloat16
    assert not training_precision("fp32", cuda).bf16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert training_precision("auto", cuda).bf16  # GPUs with bf16: autocast, as is standard
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert not training_precision("auto", cuda).bf16
    monkeypatch.setenv("VLMKIT_CPU_BF16", "yes")
    with pytest.raises(VlmkitError, match="VLMKIT_CPU_BF16='yes': set it to 1"):
        training_precision("auto", cpu)


def _cfg(parts, shapes, out, *extra):
    train_file, _ = shapes
    keys = [f"vision={parts['clip']}", f"llm={parts['llama']}", "method=full", "image_tokens=4", "batch_size=4", "max_steps=4", "lr=3e-3",
            "save_every=0", "precision=bf16", *extra]
    return load_config(None, keys, data=str(train_file), output=str(out))


def test_bf16_resume_gives_the_same_weights(parts, shapes, tmp_path):
    whole = train(_cfg(parts, shapes, tmp_path / "whole"))
    assert whole["precision"] == "bf16"
    cut = _cfg(parts, shapes, tmp_path / "cut")
    assert train(cut, stop_after=2) == {"stopped_at": 2}
    resumed = train(cut, resume=True)
    a, _ = load_model(whole["model"])
    b, _ = load_model(resumed["model"])
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def test_bf16_dpo_starts_at_log_2(parts, shapes, tmp_path):
    """The reference log-probs are computed in the run's precision and the first epoch's batches, so the
    first step's policy is its reference bit for bit: the loss is log 2 to fp32 rounding, not only to bf16's
    resolution (a reference computed in fp32 gave 0.69295, off by 2e-4, well inside bf16's 2^-8)."""
    from vlmkit.data.schema import load_samples

    rows = []
    for sample in load_samples(shapes[0]):
        question = next(p["text"] for p in sample.messages[0]["content"] if p["type"] == "text")
        answer = sample.messages[1]["content"][0]["text"]
        rows.append({"images": [str(sample.images[0])], "prompt": question, "chosen": answer, "rejected": "purple"})
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for grouped in ("false", "true"):  # batches as drawn, and grouped by length
        out = tmp_path / f"run-{grouped}"
        cfg = load_config(None, [f"vision={parts['clip']}", f"llm={parts['llama']}", "method=dpo", "beta=0.5", "max_steps=2",
                                 "batch_size=4", "save_every=0", "warmup_ratio=0", "precision=bf16",
                                 f"group_by_length={grouped}"], data=str(prefs), output=str(out))
        train(cfg)
        first = json.loads((out / "history.jsonl").read_text().splitlines()[0])
        assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
        assert first["rewards/margins"] == 0.0
