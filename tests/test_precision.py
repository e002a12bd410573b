"""Training precision: what `precision=auto` picks with and without CPU bf16 units (forced either way with
VLMKIT_CPU_BF16, so both paths run on any machine), the bf16 path's exact equalities on tiny models, and
`int8-frozen`'s products (fbgemm's int8 kernels, x86 torch builds).

Emulated bf16 is slow on CPUs without bf16 units, so the bf16 runs here are a few steps of tiny models.
"""

import json
import math
import re

import pytest
import torch

from vlmkit.config import load_config
from vlmkit.device import cpu_has_bf16, cpu_int8_products, training_precision
from vlmkit.errors import VlmkitError
from vlmkit.build import load_model
from vlmkit.train.loop import train

needs_int8 = pytest.mark.skipif(not cpu_int8_products(), reason="int8-frozen uses fbgemm's int8 kernels (x86 torch builds)")


@pytest.mark.parametrize("units, expected", [("0", "fp32"), ("1", "bf16-frozen"), ("amx", "bf16-frozen")])
def test_auto_picks_frozen_bf16_products_or_fp32_by_the_cpus_units(parts, shapes, tmp_path, monkeypatch, capfd, units, expected):
    monkeypatch.setenv("VLMKIT_CPU_BF16", units)
    assert cpu_has_bf16() == (units != "0")
    train_file, _ = shapes
    cfg = load_config(None, [f"vision={parts['clip']}", f"llm={parts['llama']}", "max_steps=1", "batch_size=2", "save_every=0"],
                      data=str(train_file), output=str(tmp_path / "run"))
    summary = train(cfg)
    assert summary["precision"] == expected
    assert "docs/precision.md" in summary["precision_reason"]
    assert ("no bf16 units" in summary["precision_reason"]) == (units == "0")
    assert ("this CPU has AMX" in summary["precision_reason"]) == (units == "amx")
    assert ("this CPU has AVX512-BF16" in summary["precision_reason"]) == (units == "1")
    assert json.loads((tmp_path / "run" / "train_summary.json").read_text())["precision"] == expected
    said = re.search(r"precision=bf16-frozen: bf16 copies of (\d+) frozen linear layers", capfd.readouterr().err)
    assert (said is not None and int(said[1]) > 0) == (units != "0")


def test_precision_resolution(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert training_precision("bf16", cpu).bf16 and training_precision("bf16", cpu).dtype == torch.bfloat16
    assert not training_precision("fp32", cuda).bf16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert training_precision("auto", cuda).bf16  # GPUs with bf16: autocast, as is standard
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert not training_precision("auto", cuda).bf16
    monkeypatch.setenv("VLMKIT_CPU_BF16", "0")
    assert training_precision("auto", cpu).name == "fp32"  # int8-frozen's steps learned less: asked for, never auto
    monkeypatch.setenv("VLMKIT_CPU_BF16", "yes")
    with pytest.raises(VlmkitError, match="VLMKIT_CPU_BF16='yes': set it to amx"):
        training_precision("auto", cpu)


def _cfg(parts, shapes, out, method="full", precision="bf16"):
    train_file, _ = shapes
    keys = [f"vision={parts['clip']}", f"llm={parts['llama']}", f"method={method}", "image_tokens=4", "batch_size=4", "max_steps=4",
            "lr=3e-3", "save_every=0", f"precision={precision}"]
    return load_config(None, keys, data=str(train_file), output=str(out))


@pytest.mark.parametrize("method, precision", [("full", "bf16"), ("lora", "bf16-frozen"),
                                               pytest.param("lora", "int8-frozen", marks=needs_int8)])
def test_lower_precisions_resume_to_the_same_weights(parts, shapes, tmp_path, method, precision):
    whole = train(_cfg(parts, shapes, tmp_path / "whole", method, precision))
    assert whole["precision"] == precision and f"precision={precision} was asked for" in whole["precision_reason"]
    cut = _cfg(parts, shapes, tmp_path / "cut", method, precision)
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


def _lora_llama(path):
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from vlmkit.model.lora import add_lora

    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    lm.requires_grad_(False)
    holder = torch.nn.Module()
    holder.language_model = lm
    adapters = add_lora(holder, SimpleNamespace(lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_targets="attention"))
    for p in adapters:
        p.requires_grad_(True)
        torch.nn.init.normal_(p, std=0.05)  # B starts at zero: give the adapters something to say
    return lm, adapters


def _loss_and_grads(lm, adapters, ids):
    lm.zero_grad(set_to_none=True)
    loss = lm(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), [p.grad.clone() for p in adapters]


@pytest.mark.parametrize("kind", ["bf16", pytest.param("int8", marks=needs_int8)])
def test_frozen_products_stay_close_to_fp32_and_leave_the_model_as_it_was(parts, kind):
    """precision=bf16-frozen: only the frozen linear layers multiply in bf16 (one copy each, the tied head and
    embeddings sharing theirs); int8-frozen: the same layers but the head, in int8, forward and input
    gradients. The loss and the adapters' gradients stay within the rounding of fp32's, the state dict is
    untouched, and after `restore` the model computes exactly what it did before."""
    from vlmkit.model.frozen_bf16 import FrozenBf16
    from vlmkit.model.frozen_int8 import FrozenInt8

    lm, adapters = _lora_llama(parts["llama"])
    ids = torch.randint(0, lm.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(1))
    keys = list(lm.state_dict())
    loss, grads = _loss_and_grads(lm, adapters, ids)

    frozen = FrozenBf16(lm) if kind == "bf16" else FrozenInt8(lm)
    frozen_names = {n.rsplit(".", 1)[-1] for n, m in lm.named_modules() if m in frozen.layers}
    head = {"lm_head"} if kind == "bf16" else set()  # int8-frozen keeps the logits in fp32
    assert frozen_names == {"base_layer", "gate_proj", "up_proj", "down_proj"} | head  # no adapter, nothing trained
    assert frozen.bytes == sum(m.weight.numel() * 2 for m in frozen.layers)
    low, low_grads = _loss_and_grads(lm, adapters, ids)
    assert list(lm.state_dict()) == keys
    assert low != loss  # the products did run in the lower precision...
    loss_rel, grad_rel = (1e-2, 0.05) if kind == "bf16" else (2e-2, 0.15)
    assert low == pytest.approx(loss, rel=loss_rel)  # ...within its rounding
    for g, h in zip(grads, low_grads):
        assert torch.linalg.vector_norm(g - h) <= grad_rel * torch.linalg.vector_norm(g)
        assert torch.nn.functional.cosine_similarity(g.flatten(), h.flatten(), dim=0) > 0.98

    frozen.restore()
    frozen.restore()
    assert frozen.bytes == 0 and all("forward" not in vars(m) for m in lm.modules())
    again, again_grads = _loss_and_grads(lm, adapters, ids)
    assert again == loss and all(torch.equal(g, h) for g, h in zip(grads, again_grads))


def test_frozen_bf16_layers_sharing_a_weight_share_its_copy():
    from vlmkit.model.frozen_bf16 import FrozenBf16

    a, b, trained = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8, bias=False), torch.nn.Linear(8, 8)
    b.weight = a.weight
    a.requires_grad_(False)
    frozen = FrozenBf16(torch.nn.Sequential(a, b, trained))
    assert frozen.layers == [a, b] and frozen.bytes == 8 * 8 * 2
    assert a.bf16_weight is b.bf16_weight and a.bf16_weight.dtype == torch.bfloat16
    assert "bf16_weight" not in torch.nn.Sequential(a, b).state_dict() and "forward" in vars(a)
    frozen.restore()
    assert frozen.bytes == 0 and "forward" not in vars(a) and "forward" not in vars(b)
    assert not hasattr(a, "bf16_weight") and not hasattr(b, "bf16_weight")


@pytest.mark.parametrize("precision", ["bf16-frozen", pytest.param("int8-frozen", marks=needs_int8)])
def test_frozen_products_save_the_fp32_weights(parts, shapes, tmp_path, precision):
    from transformers import AutoModelForCausalLM

    a, _ = load_model(train(_cfg(parts, shapes, tmp_path / "run", "lora", precision))["model"])
    original = AutoModelForCausalLM.from_pretrained(parts["llama"], dtype=torch.float32).state_dict()
    saved = {k: v for k, v in a.state_dict().items() if k.endswith("layers.0.mlp.gate_proj.weight")}
    assert len(saved) == 1  # a frozen weight is saved as it was, not rounded
    assert torch.equal(next(iter(saved.values())), original["model.layers.0.mlp.gate_proj.weight"])


@needs_int8
def test_int8_product_keeps_each_rows_scale_and_its_transpose():
    """`precision=int8-frozen`'s product: each row of the input at its own scale, so a token far larger than
    the rest does not flatten them, and a row of zeros stays zeros; the transpose's pack gives the input
    gradient's product."""
    from vlmkit.model.frozen_int8 import pack, product

    torch.manual_seed(0)
    weight = torch.randn(96, 64) * 0.05
    x = torch.randn(3, 12, 64)
    x[0, 0] *= 50
    x[1, 3] = 0
    got, exact = product(x, pack(weight)), x @ weight.t()
    assert got.shape == exact.shape and got.dtype == torch.float32
    rows = (got - exact).flatten(0, 1).norm(dim=1) / exact.flatten(0, 1).norm(dim=1).clamp_min(1e-12)
    assert rows.max() < 0.03 and int((rows > 0).sum()) == rows.numel() - 1  # int8's rounding in every row but the zeros
    assert torch.equal(got[1, 3], torch.zeros(96))
    grad = torch.randn(5, 96)
    assert torch.linalg.vector_norm(product(grad, pack(weight.t())) - grad @ weight) < 0.05 * torch.linalg.vector_norm(grad @ weight)


@needs_int8
def test_frozen_int8_layers_sharing_a_weight_share_its_packs():
    from vlmkit.model.frozen_int8 import FrozenInt8

    a, b, trained = torch.nn.Linear(8, 16), torch.nn.Linear(8, 16, bias=False), torch.nn.Linear(8, 8)
    b.weight = a.weight
    a.requires_grad_(False)
    model = torch.nn.Sequential(a, b, trained)
    model.get_output_embeddings = lambda: None
    frozen = FrozenInt8(model)
    assert frozen.layers == [a, b] and frozen.bytes == 8 * 16 * 2 and a.int8_packs is b.int8_packs
    x = torch.randn(4, 8)
    assert torch.allclose(a(x), torch.nn.functional.linear(x, a.weight, a.bias), atol=0.05)  # the bias is added


@needs_int8
def test_int8_frozen_refuses_a_gpu_and_compile(parts, shapes, tmp_path):
    with pytest.raises(VlmkitError, match="precision=int8-frozen: it runs on the CPU, not cuda"):
        training_precision("int8-frozen", torch.device("cuda"))
    cfg = load_config(None, [f"vision={parts['clip']}", f"llm={parts['llama']}", "method=lora", "max_steps=1",
                             "precision=int8-frozen", "compile=true"], data=str(shapes[0]), output=str(tmp_path / "run"))
    with pytest.raises(VlmkitError, match="does not combine with compile=true: set precision=auto or fp32"):
        train(cfg)
