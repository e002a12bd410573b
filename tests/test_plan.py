"""The memory plan: counts equal the real ones, the estimate moves the right way with every knob, the
activation formula matches what autograd keeps, and the total is near a measured CPU peak."""

import copy
import json
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

from vlmkit.errors import VlmkitError
from vlmkit.build import compose
from vlmkit.device import cpu_int8_products
from vlmkit.model.frozen_bf16 import FrozenBf16
from vlmkit.model.frozen_int8 import FrozenInt8
from vlmkit.model.lora import add_lora, lm_target_modules
from vlmkit.train.plan import estimate


@pytest.fixture(scope="module")
def tiny(parts):
    model, _ = compose(vision=parts["clip"], llm=parts["llama"], image_tokens=4)
    return model


def _n(module):
    return sum(p.numel() for p in module.parameters())


def plan(model, method="full", batch=4, seq=128, bf16=False, gc=False, **kw):
    return estimate(model, method, batch_size=batch, seq_len=seq, bf16=bf16, gradient_checkpointing=gc, **kw)


def test_counts_equal_the_real_counts(tiny):
    full = plan(tiny, "full")
    assert full.total_params == _n(tiny)
    assert dict((name, n) for name, n, _ in full.parts) == {
        "vision_tower": _n(tiny.vision_tower), "projector": _n(tiny.projector), "language_model": _n(tiny.language_model),
    }
    assert full.trainable_params == _n(tiny.projector) + _n(tiny.language_model)
    align = plan(tiny, "align")
    assert align.trainable_params == _n(tiny.projector)
    assert plan(tiny, "align", trainable_groups=["vision_tower"]).trainable_params == _n(tiny.projector) + _n(tiny.vision_tower)
    with pytest.raises(VlmkitError, match="vision"):
        plan(tiny, "align", trainable_groups=["vision"])
    with pytest.raises(VlmkitError, match="method"):
        plan(tiny, "dora")


@pytest.mark.parametrize("r", [4, 16])
def test_lora_count_equals_what_peft_creates(tiny, r):
    lora = plan(tiny, "lora", lora_r=r)
    model = copy.deepcopy(tiny)
    adapters = add_lora(model, SimpleNamespace(lora_r=r, lora_alpha=16, lora_dropout=0.0))
    created = sum(p.numel() for p in adapters)
    assert dict((name, n) for name, n, _ in lora.parts)["lora adapters"] == created
    assert lora.trainable_params == created + _n(tiny.projector)
    assert lora.total_params == _n(model)  # the model as it is after injection
    assert set(lora.lora_targets) == set(lm_target_modules(tiny.language_model))
    assert plan(tiny, "qlora", lora_r=r).trainable_params == lora.trainable_params


@pytest.mark.parametrize("kind", ["bf16", pytest.param("int8", marks=pytest.mark.skipif(
    not cpu_int8_products(), reason="int8-frozen uses fbgemm's int8 kernels (x86 torch builds)"))])
@pytest.mark.parametrize("method", ["lora", "align", "full"])
def test_the_frozen_copies_row_is_what_the_run_copies(tiny, method, kind):
    model = copy.deepcopy(tiny)
    model.requires_grad_(False)  # as training sets it up: the tower frozen, the projector (and the LM in full) trained
    model.projector.requires_grad_(True)
    if method == "lora":
        add_lora(model, SimpleNamespace(lora_r=8, lora_alpha=16, lora_dropout=0.0))
    if method == "full":
        model.language_model.requires_grad_(True)
    frozen = FrozenBf16(model) if kind == "bf16" else FrozenInt8(model)
    try:
        memory = plan(tiny, method, **{f"frozen_{kind}": True}).memory
        assert frozen.bytes > 0 and memory["bf16 copies" if kind == "bf16" else "int8 packs"] == frozen.bytes
    finally:
        frozen.restore()


def test_a_plain_language_model_is_one_part(parts):
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(parts["llama"])
    full = plan(lm, "full")
    assert [name for name, _, _ in full.parts] == ["model"]
    assert full.trainable_params == full.total_params == _n(lm)
    with pytest.raises(VlmkitError, match="projector"):
        plan(lm, "align")


def test_the_estimate_moves_the_right_way(tiny):
    base = plan(tiny, "full", batch=4, seq=256)
    assert plan(tiny, "full", batch=8, seq=256).total_bytes > base.total_bytes
    assert plan(tiny, "full", batch=4, seq=512).memory["activations"] > base.memory["activations"]
    checkpointed = plan(tiny, "full", batch=4, seq=256, gc=True)
    assert checkpointed.memory["activations"] < base.memory["activations"]
    assert checkpointed.memory["weights"] == base.memory["weights"]
    lora, qlora = plan(tiny, "lora", batch=4, seq=256), plan(tiny, "qlora", batch=4, seq=256)
    assert lora.total_bytes < base.total_bytes
    assert lora.memory["optimizer (AdamW)"] < base.memory["optimizer (AdamW)"]
    averaged = plan(tiny, "lora", batch=4, seq=256, ema=True)  # a copy of what trains, as large as its gradients
    assert averaged.memory["weight average (ema)"] == lora.memory["gradients"]
    assert averaged.total_bytes == lora.total_bytes + lora.memory["gradients"] and "weight average (ema)" not in lora.memory
    assert qlora.memory["weights"] < lora.memory["weights"]
    copies = plan(tiny, "lora", batch=4, seq=256, frozen_bf16=True)  # precision=bf16-frozen
    assert copies.total_bytes == lora.total_bytes + copies.memory["bf16 copies"]
    assert plan(tiny, "align", batch=4, seq=256).memory["activations"] < lora.memory["activations"]
    bf16 = plan(tiny, "full", batch=4, seq=256, bf16=True)
    assert bf16.memory["activations"] < base.memory["activations"] and bf16.memory["autocast copies"] > 0
    # vlmkit models score only labelled positions
    assert plan(tiny, "full", label_fraction=0.25).memory["logits"] < plan(tiny, "full").memory["logits"]


def test_table_lists_parts_and_memory(tiny):
    text = plan(tiny, "lora", lora_r=8).table()
    for word in ("vision_tower", "projector", "language_model", "lora adapters", "weights", "gradients",
                 "optimizer (AdamW)", "activations", "logits", "total", "MiB", "r=8"):
        assert word in text, word


def _saved_bytes(model, inputs):
    """Bytes of the distinct non-parameter tensors autograd keeps for the backward pass."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**inputs)
    return sum(storages.values())


@pytest.mark.parametrize("method", ["full", "align"])
def test_activation_formula_matches_what_autograd_keeps(tiny, method):
    model = copy.deepcopy(tiny).train().requires_grad_(False)
    model.projector.requires_grad_(True)
    if method == "full":
        model.language_model.requires_grad_(True)
    batch, seq = 2, 96
    ids = torch.randint(0, 250, (batch, seq))
    # image embeddings reach the LM with gradients (the projector trains); stand in for them
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    measured = _saved_bytes(model, {"inputs_embeds": embeds, "labels": ids, "attention_mask": torch.ones_like(ids)})
    p = plan(tiny, method, batch=batch, seq=seq)
    logsoftmax = batch * (seq - 1) * tiny.config.text_config.vocab_size * 4  # the one logits tensor autograd keeps
    assert 0.75 < (p.memory["activations"] + logsoftmax) / measured < 1.25


PEAK_SCRIPT = textwrap.dedent("""
    import gc, json, sys
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig
    from vlmkit.model.vlm import VlmkitConfig, VlmkitForConditionalGeneration
    from vlmkit.train.plan import estimate

    torch.set_num_threads(1)

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    def build(hidden, layers, vocab):
        vision = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4).to_dict()
        text = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                           num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
                           tie_word_embeddings=False)
        return VlmkitForConditionalGeneration(VlmkitConfig(
            vision={"kind": "hf", "config": vision}, text_config=text, image_tokens=4, image_token_id=vocab - 1))

    def train(model, ids, steps):
        model.train().requires_grad_(False)
        params = list(model.projector.parameters()) + list(model.language_model.parameters())
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=1e-4)
        for _ in range(steps):
            model(input_ids=ids, labels=ids, attention_mask=torch.ones_like(ids)).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    B, T, H, L, V = map(int, sys.argv[1:])
    tiny = build(64, 1, 512)  # the same code paths once, so imports and lazy set-up are not measured
    train(tiny, torch.randint(0, 500, (1, 8)), 1)
    del tiny
    gc.collect()
    rss0 = status("VmRSS")
    model = build(H, L, V)
    ids = torch.randint(0, V - 2, (B, T))
    open("/proc/self/clear_refs", "w").write("5")  # peak RSS := current RSS (Linux)
    train(model, ids, 2)  # the second step holds the optimizer states through forward and backward
    plan = estimate(model, "full", B, T, bf16=False, gradient_checkpointing=False)
    print(json.dumps({"measured": status("VmHWM") - rss0, "estimated": plan.total_bytes}))
""")


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc peak-RSS reset")
def test_full_estimate_is_near_a_measured_cpu_peak():
    """Peak RSS of two full fine-tuning steps of a ~7M-parameter model, in a fresh process (so nothing
    else in this test session has raised the peak), against the plan's total."""
    out = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, "2", "256", "256", "4", "8192"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["measured"] > 110 * 2**20  # the step really allocated (weights + grads + Adam alone ~110 MiB)
    assert 0.5 < result["estimated"] / result["measured"] < 2.0, result
