"""QLoRA on tiny random models: only the LM's linear layers go 4-bit (NF4, double quant, bf16 compute), the
logits stay close to fp32, LoRA on top trains while the 4-bit weights stay put, and merging gives back a plain
float model. Layer widths are 64 (bitsandbytes' CPU kernels want >= 64); the 32-wide towers are never quantised.
"""

import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from tiny_vlms import IMAGES_NESTED, NO_CHAT_TEMPLATE, make_vlm
from vlmkit.errors import VlmkitError
from vlmkit.model import quantize
from vlmkit.model.parts import find_part
from vlmkit.model.lora import add_lora

REASON = quantize.qlora_available("cpu")
needs_4bit = pytest.mark.skipif(REASON is not None, reason=f"4-bit unavailable: {REASON}")
LORA = SimpleNamespace(lora_r=8, lora_alpha=16, lora_dropout=0.0)
# Relative RMS errors against fp32 (measured on these models; NF4's own error on normal weights is ~0.09):
# - each 4-bit layer's dequantised weight: 0.093-0.095; its output, bf16 compute included: 0.098-0.11;
# - the logits: 0.012 (paligemma) to 0.13 (llava). With every 4-bit weight's bytes reversed (a broken
#   quantisation) the logits' error is 0.59-1.03, except paligemma: 0.16, its logits being dominated by the
#   (unquantised, x8-scaled) embeddings; the per-layer checks catch that case.
WEIGHT_TOL = 0.12
LAYER_TOL = 0.15
LOGIT_TOL = 0.2


def relative_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b - mean(b)|| over the last dim: the error relative to the logits' spread."""
    a, b = a.float(), b.float()
    return ((a - b).norm() / (b - b.mean(-1, keepdim=True)).norm()).item()


def check_lm_only_4bit(model, reference) -> None:
    """Every LM linear layer but lm_head is NF4 + double quant + bf16 compute; nothing else is 4-bit."""
    import bitsandbytes as bnb

    lm_name, lm = find_part(model, "language")
    head = model.get_output_embeddings()
    want = {n for n, m in find_part(reference, "language")[1].named_modules() if isinstance(m, nn.Linear)}
    got = {n for n, m in lm.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert got and got == want - {n for n, m in lm.named_modules() if m is head}
    for name in got:
        layer = lm.get_submodule(name)
        state = layer.weight.quant_state
        assert state.quant_type == "nf4" and state.nested and layer.compute_dtype == torch.bfloat16, name
        assert layer.weight.dtype == torch.uint8 and layer.weight.numel() * 2 == layer.in_features * layer.out_features
        fp32 = find_part(reference, "language")[1].get_submodule(name)
        weight_error = (quantize.dequantized_weight(layer) - fp32.weight).norm() / fp32.weight.norm()
        assert weight_error < WEIGHT_TOL, (name, weight_error)
        x = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert relative_diff(layer(x), fp32(x)) < LAYER_TOL, name
    assert type(head) is nn.Linear and head.weight.dtype == torch.float32
    for part in ("vision", "projector"):
        module = find_part(model, part)[1]
        assert not any(isinstance(m, bnb.nn.Linear4bit) for m in module.modules()), part
        assert all(p.dtype == torch.float32 for p in module.parameters()), part
    assert not any(p.requires_grad for p in model.parameters())


def train_steps(model, batch, params, steps=6, lr=1e-2) -> list[float]:
    optimizer = torch.optim.AdamW(params, lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def snapshot(model) -> dict[str, torch.Tensor]:
    """Every parameter, 4-bit ones as their packed bytes plus absmax (what a step could change)."""
    out = {}
    for name, p in model.named_parameters():
        out[name] = p.detach().clone()
        state = getattr(p, "quant_state", None)
        if state is not None:
            out[name + ".absmax"] = state.absmax.clone()
    return out


def changed(before: dict, model) -> set[str]:
    after = snapshot(model)
    return {n for n, v in after.items() if not torch.equal(v, before[n])}


# -- no bitsandbytes: a clear error ------------------------------------------------------------------------------
def test_missing_bitsandbytes_gives_one_line(monkeypatch, parts):
    from vlmkit.build import compose

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails
    quantize._check.cache_clear()
    try:
        reason = quantize.qlora_available("cpu")
        assert reason and "bitsandbytes" in reason and "\n" not in reason
        model, _ = compose(vision=parts["clip"], llm=parts["llama"], image_tokens=4)
        with pytest.raises(VlmkitError, match="method=qlora: .*bitsandbytes"):
            quantize.quantize_language_model_4bit(model)
        with pytest.raises(VlmkitError, match="bitsandbytes"):
            quantize.load_pretrained_4bit("/nonexistent", "cpu")
    finally:
        monkeypatch.undo()
        quantize._check.cache_clear()


# -- vlmkit's composed model ---------------------------------------------------------------------------------------
def composed_batch(model):
    torch.manual_seed(1)
    ids = torch.randint(10, model.config.text_config.vocab_size, (2, 20))
    ids[:, 2:6] = model.config.image_token_id  # image_tokens=4
    labels = ids.clone()
    labels[:, :6] = -100
    return {"input_ids": ids, "pixel_values": torch.randn(2, 3, 32, 32), "labels": labels}


@needs_4bit
def test_composed_model_qlora(parts, tmp_path):
    from vlmkit.build import compose, load_model
    from vlmkit.io import save_pretrained_atomic

    reference, _ = compose(vision=parts["clip"], llm=parts["llama"], image_tokens=4)
    model, processor = compose(vision=parts["clip"], llm=parts["llama"], image_tokens=4)
    batch = composed_batch(model)
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    names = quantize.quantize_language_model_4bit(model)
    assert len(names) == 7 * 2  # q k v o gate up down, 2 layers
    check_lm_only_4bit(model, reference)
    assert 4 * weight_bytes(model.language_model.model.layers) < weight_bytes(
        reference.language_model.model.layers
    )
    with torch.no_grad():
        want, got = reference(**inputs).logits, model(**inputs).logits
    diff = relative_diff(got, want)
    print(f"composed: 4-bit vs fp32 logits, max abs diff {(got - want).abs().max():.4f}, relative RMS {diff:.4f}")
    assert diff < LOGIT_TOL

    lora = add_lora(model, LORA)
    projector = list(model.projector.parameters())
    for p in lora + projector:
        p.requires_grad_(True)
    before = snapshot(model)
    losses = train_steps(model, batch, lora + projector)
    assert losses[-1] < losses[0] - 0.2, losses
    moved = changed(before, model)
    lora_b = {n for n in before if "lora_B" in n}
    assert lora_b <= moved  # B starts at zero: every adapter trained
    assert all("lora_" in n or n.startswith("projector.") for n in moved), sorted(moved)

    # LoRA folded into dequantised fp32 weights: the same function as the trained 4-bit model, saved as plain floats
    with torch.no_grad():
        trained = model(**inputs).logits
        assert quantize.merge_and_dequantize(model) == len(names)
        merged = model(**inputs).logits
    assert not any(quantize.is_4bit(m) or "lora" in n for n, m in model.named_modules())
    assert relative_diff(merged, trained) < 0.05  # bf16 compute vs fp32
    save_pretrained_atomic(model, processor, tmp_path / "model")
    reloaded, _ = load_model(tmp_path / "model")
    with torch.no_grad():
        assert torch.allclose(reloaded(**inputs).logits, merged, atol=1e-5)


# -- pretrained transformers VLMs ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    root = tmp_path_factory.mktemp("qlora_vlms")
    return lambda family: make_vlm(family, root / family)


def family_batch(family, processor):
    from PIL import Image

    image = Image.fromarray(np.random.RandomState(0).randint(0, 256, (32, 32, 3), dtype=np.uint8))
    if family in NO_CHAT_TEMPLATE:
        prompt = "<image>What is this? a red circle"
    else:
        user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}
        prompt = processor.apply_chat_template([user], add_generation_prompt=True, tokenize=False) + "a red circle"
    images = [[image]] if family in IMAGES_NESTED else [image]
    batch = dict(processor(images=images, text=[prompt], return_tensors="pt"))
    labels = batch["input_ids"].clone()
    labels[:, : labels.shape[1] - 6] = -100  # the answer's tokens
    batch["labels"] = labels
    return batch


@needs_4bit
@pytest.mark.parametrize("family", ["smolvlm", "idefics3", "llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "paligemma"])
def test_pretrained_4bit_quantises_only_the_language_model(family, tiny_vlm):
    from transformers import AutoModelForImageTextToText

    folder = tiny_vlm(family)
    reference = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    model, processor = quantize.load_pretrained_4bit(str(folder), "cpu")
    check_lm_only_4bit(model, reference)
    batch = family_batch(family, processor)
    batch.pop("labels")
    with torch.no_grad():
        want, got = reference(**batch).logits, model(**batch).logits
    diff = relative_diff(got, want)
    print(f"{family}: 4-bit vs fp32 logits, max abs diff {(got - want).abs().max():.4f}, relative RMS {diff:.4f}")
    assert diff < LOGIT_TOL


@needs_4bit
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_pretrained_qlora_trains_adapters_and_projector_only(family, tiny_vlm):
    folder = tiny_vlm(family)
    model, processor = quantize.load_pretrained_4bit(str(folder), "cpu")
    batch = family_batch(family, processor)
    projector_name, projector = find_part(model, "projector")
    lora = add_lora(model, LORA)
    params = lora + list(projector.parameters())
    for p in params:
        p.requires_grad_(True)
    before = snapshot(model)
    losses = train_steps(model, batch, params)
    assert losses[-1] < losses[0] - 0.2, losses
    moved = changed(before, model)
    assert {n for n in before if "lora_B" in n} <= moved
    assert all("lora_" in n or n.startswith(projector_name + ".") for n in moved), sorted(moved)

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        trained = model(**inputs).logits
        assert quantize.merge_and_dequantize(model) > 0
        merged = model(**inputs).logits
    assert relative_diff(merged, trained) < 0.05
    assert not hasattr(model.config, "quantization_config") and not getattr(model, "is_loaded_in_4bit", False)


def weight_bytes(module: nn.Module) -> int:
    """Bytes held by a module's parameters and buffers, 4-bit weights counted with their quantisation state
    (absmax, nested absmax, code tables)."""
    total = 0
    seen = set()
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
        state = getattr(t, "quant_state", None)
        while state is not None:  # absmax per block, the code table; the nested state of double quant
            extra = [state.absmax, state.code, getattr(state, "offset", None)]
            total += sum(x.numel() * x.element_size() for x in extra if torch.is_tensor(x))
            state = getattr(state, "state2", None)
    return total
