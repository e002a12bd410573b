"""A memory plan for a training run, before it starts: what trains, and roughly how much memory it takes.

`estimate(model, method, ...)` counts parameters per part and the trainable ones for a method, and adds
up the memory of one training step. Everything below is an ESTIMATE from shapes, not a measurement:
allocator caching and fragmentation, CUDA context (~0.5 GiB), kernels' workspaces and framework
overhead are not included, and the activation formula is fitted to what PyTorch keeps for a Llama-style
block (checked against the tensors autograd actually saves, in tests/test_plan.py).

Methods (the parameters that train):
    full   projector + language model              align  projector only
    lora   projector + LoRA adapters on the LM     qlora  lora, with the LM's linear weights in 4 bit
`trainable_groups` adds parts trained in full (e.g. "vision_tower" for `train_vision`).

Bytes, for P parameters of which T train (b = batch, s = seq_len, h = hidden, I = MLP width,
L = layers, a = heads, V = vocabulary):
    weights      each parameter (and buffer) at its stored dtype; qlora: the LM's linear weights at
                 0.5 byte + one fp32 absmax per 64-value block (0.5625 byte/param), the rest of the LM
                 in bf16; LoRA adapters in fp32: r * (in + out) per adapted linear layer
    autocast     bf16 autocast over fp32 weights keeps a bf16 copy of every weight a matmul saves for
                 the backward pass: 2 bytes per LM/projector linear parameter (not for qlora)
    bf16 copies  precision=bf16-frozen: one bf16 copy of each frozen fp32 linear weight, kept for the run
                 (vlmkit.model.frozen_bf16): 2 bytes per parameter of the plain fp32 linear layers in the
                 parts that do not train (the LM under lora/align, a frozen tower), a tied head once
    int8 packs   precision=int8-frozen: the same layers but the LM's head, as int8 values of the weight
                 and of its transpose (vlmkit.model.frozen_int8): 2 bytes per parameter
    gradients    T at the trainable parameters' dtype
    optimizer    AdamW: 2 states x 4 bytes x T
    ema          with `ema` > 0: a copy of the trainable weights (their moving average)
    activations  per layer and token, elements kept for the backward pass:
                     2h            inputs of the two RMSNorms               (residual-stream dtype)
                     2h            their outputs, kept when the linears after them (or their
                                   adapters) train                          (residual-stream dtype)
                     4h + a*s      q, k, v, attention output (k, v repeated to all heads); a*s
                                   attention probabilities only with eager attention
                     h + I         inputs of o_proj and down_proj, when they (or adapters) train
                     3I            gate output, SiLU output, up output
                 x b*s*L, plus 3h*b*s outside the layers (embeddings, final norm). Activations are in
                 bf16 under autocast (2 bytes), else in the weights' dtype; the residual stream keeps
                 the weights' dtype. With gradient checkpointing only each layer's input (h) is kept,
                 plus one layer's activations while it is recomputed. A vision tower that trains adds
                 the same formula over its patch tokens (b * images_per_sample images), for towers
                 with a transformers config; others are left out (noted in the table).
    logits       N * V * 12 bytes (fp32 logits, log-softmax output, and its gradient at the start of
                 the backward pass; +2 under bf16), N = b*s positions, or only the labelled ones
                 (b*s*label_fraction) when the model projects only labelled positions through its head
                 (vlmkit models do, see `VlmkitForConditionalGeneration._loss_on_labels`)
The peak is taken as the sum of the items: from the second step on the optimizer states live through
the whole step, and gradients build up while activations are still held. On CPU (fp32, full fine-
tuning of a ~7M-parameter model) the sum came within 25% of the measured peak RSS of two steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from vlmkit.config import TrainConfig
from vlmkit.device import resolve_device, training_precision
from vlmkit.errors import VlmkitError
from vlmkit.model.frozen_bf16 import copyable_linears

METHODS = ("full", "lora", "qlora", "align")
PARTS = ("vision_tower", "projector", "language_model")
QLORA_BYTES = 0.5 + 4 / 64  # nf4 values + one fp32 absmax per block of 64 (bitsandbytes' default blocksize)
ADAM_BYTES = 8
LOGIT_BYTES = 12


@dataclass
class Plan:
    """What `estimate` found: parameter counts per part and memory in bytes per item."""

    method: str
    batch_size: int
    seq_len: int
    bf16: bool
    gradient_checkpointing: bool
    parts: list[tuple[str, int, int]]  # (part, parameters, trainable parameters)
    memory: dict[str, int]  # item -> bytes
    lora_r: int = 0
    lora_targets: tuple[str, ...] = ()
    notes: list[str] = field(default_factory=list)

    @property
    def total_params(self) -> int:
        return sum(n for _, n, _ in self.parts)

    @property
    def trainable_params(self) -> int:
        return sum(t for _, _, t in self.parts)

    @property
    def trainable_share(self) -> float:
        return self.trainable_params / max(1, self.total_params)

    @property
    def total_bytes(self) -> int:
        return sum(self.memory.values())

    def table(self) -> str:
        how = self.method + (f" (r={self.lora_r})" if self.method in ("lora", "qlora") else "")
        precision = "bf16 autocast" if self.bf16 else "no autocast"
        checkpointing = ", gradient checkpointing" if self.gradient_checkpointing else ""
        lines = [f"plan: {how}, batch {self.batch_size} x {self.seq_len} tokens, {precision}{checkpointing}", ""]
        lines.append(f"{'part':<20}{'parameters':>14}{'trainable':>14}")
        for name, n, t in self.parts:
            lines.append(f"{name:<20}{_count(n):>14}{_count(t):>14}")
        share = f"{_count(self.trainable_params)} ({100 * self.trainable_share:.2f}%)"
        lines.append(f"{'total':<20}{_count(self.total_params):>14}{share:>22}")
        if self.lora_targets:
            lines.append(f"LoRA on: {', '.join(self.lora_targets)}")
        lines += ["", f"{'memory (estimate)':<20}{'':>14}"]
        for name, size in self.memory.items():
            lines.append(f"{name:<20}{_bytes(size):>14}")
        lines.append(f"{'total':<20}{_bytes(self.total_bytes):>14}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def estimate(
    model: nn.Module,
    method: str,
    batch_size: int,
    seq_len: int,
    bf16: bool,
    gradient_checkpointing: bool,
    lora_r: int = 16,
    trainable_groups: tuple[str, ...] | list[str] = (),
    label_fraction: float = 1.0,
    images_per_sample: int = 1,
    lora_targets: str = "auto",
    ema: bool = False,
    frozen_bf16: bool = False,
    frozen_int8: bool = False,
) -> Plan:
    """The `Plan` of training `model` with `method` on batches of `batch_size` x `seq_len` tokens.

    `trainable_groups` names parts trained in full on top of the method ("vision_tower", "projector",
    "language_model"); `label_fraction` is the share of positions with labels (used when the model scores
    only those); `images_per_sample` sizes a trained tower's activations. Models without vlmkit's three
    parts are counted as one part, which is the language model.
    """
    if method not in METHODS:
        raise VlmkitError(f"plan: method {method!r} is not one of {', '.join(METHODS)}")
    if batch_size < 1 or seq_len < 1:
        raise VlmkitError(f"plan: batch_size and seq_len must be >= 1 (got {batch_size}, {seq_len})")
    parts = _parts(model)
    lm = parts.get("language_model", model)
    unknown = [g for g in trainable_groups if g not in parts]
    if unknown:
        raise VlmkitError(f"plan: trainable group(s) {', '.join(map(repr, unknown))} not in the model; use {', '.join(parts)}")
    if method == "align" and "projector" not in parts:
        raise VlmkitError("plan: method 'align' trains the projector, and this model has none")

    trained = set(trainable_groups)
    trained |= {"projector"} & set(parts)
    if method == "full":
        trained.add("language_model" if "language_model" in parts else "model")
        trained |= {"lm_head"} & set(parts)
    notes: list[str] = []

    # -- parameters ---------------------------------------------------------------------------
    seen: set[int] = set()  # tied weights count once
    rows, part_params = [], {}
    for name, module in parts.items():
        params = [p for p in module.parameters() if id(p) not in seen]
        seen.update(id(p) for p in params)
        part_params[name] = params
        n = sum(p.numel() for p in params)
        rows.append((name, n, n if name in trained else 0))
    targets: tuple[str, ...] = ()
    adapter = 0
    if method in ("lora", "qlora"):
        from vlmkit.model.lora import chosen_targets

        targets = tuple(chosen_targets(lm, lora_targets))
        adapter = lora_param_count(lm, targets, lora_r)
        rows.append(("lora adapters", adapter, adapter))

    # -- memory -------------------------------------------------------------------------------
    lm_name = "language_model" if "language_model" in parts else "model"
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    quantized = {id(m.weight) for m in _linears(lm, skip=head)}  # bitsandbytes keeps the LM head unquantized
    weights = 0.0
    for name, params in part_params.items():
        for p in params:
            if method == "qlora" and name == lm_name:
                weights += p.numel() * (QLORA_BYTES if id(p) in quantized else 2)
            else:
                weights += p.numel() * p.element_size()
    weights += sum(b.numel() * b.element_size() for b in model.buffers())
    weights += adapter * 4
    memory = {"weights": int(weights)}

    if bf16 and method != "qlora":
        fp32_linears = sum(
            m.weight.numel() for part in ("projector", lm_name) if part in parts
            for m in _linears(parts[part]) if m.weight.element_size() == 4
        )
        if "vision_tower" in trained:
            fp32_linears += sum(m.weight.numel() for m in _linears(parts["vision_tower"]) if m.weight.element_size() == 4)
        memory["autocast copies"] = 2 * fp32_linears
    if (frozen_bf16 or frozen_int8) and method != "qlora":
        # int8-frozen keeps the head in fp32; its packs hold the weight and its transpose at a byte each
        head = model.get_output_embeddings() if frozen_int8 and hasattr(model, "get_output_embeddings") else None
        frozen = {id(m.weight): m.weight.numel() for name, part in parts.items() if name not in trained
                  for m in copyable_linears(part) if m is not head}
        if frozen:
            memory["int8 packs" if frozen_int8 else "bf16 copies"] = 2 * sum(frozen.values())

    trainable_bytes = sum(p.numel() * p.element_size() for name in trained for p in part_params[name]) + adapter * 4
    n_trainable = sum(t for _, _, t in rows)
    memory["gradients"] = trainable_bytes
    memory["optimizer (AdamW)"] = ADAM_BYTES * n_trainable
    if ema:
        memory["weight average (ema)"] = trainable_bytes

    res_bytes = next(lm.parameters()).element_size() if method != "qlora" else 2
    act_bytes = 2 if bf16 else res_bytes
    lm_trains = method != "align" or "language_model" in trained
    memory["activations"] = activation_bytes(
        lm.config, batch_size, seq_len, act_bytes, res_bytes, gradient_checkpointing, linears_train=lm_trains
    )
    if "vision_tower" in trained:
        tower = _tower_config(parts["vision_tower"])
        if tower is None:
            notes.append("the trained vision tower's activations are not estimated (no transformer config)")
        else:
            tokens = (tower.image_size // tower.patch_size) ** 2 + 1
            memory["activations"] += activation_bytes(
                tower, batch_size * images_per_sample, tokens, act_bytes, res_bytes, gradient_checkpointing,
                linears_train=True, gated_mlp=False,
            )

    vocab = lm.config.vocab_size
    scored = batch_size * seq_len
    if getattr(model, "_plain_lm_head", None) is not None and model._plain_lm_head():
        scored = max(1, round(batch_size * (seq_len - 1) * label_fraction))
    memory["logits"] = scored * vocab * (LOGIT_BYTES + (2 if bf16 else 0))
    notes.append("an estimate from shapes: allocator overhead and (on GPU) the CUDA context are not included")
    return Plan(
        method, batch_size, seq_len, bf16, gradient_checkpointing, rows, memory,
        lora_r=lora_r if targets else 0, lora_targets=targets, notes=notes,
    )


def lora_param_count(lm: nn.Module, targets, r: int) -> int:
    """r * (in + out) for every layer peft would wrap: named like a target, a Linear or GPT-2 Conv1D."""
    total = 0
    for name, module in lm.named_modules():
        if name.rsplit(".", 1)[-1] not in targets:
            continue
        if isinstance(module, nn.Linear):
            total += r * (module.in_features + module.out_features)
        elif type(module).__name__ == "Conv1D":  # transformers' GPT-2 layer: weight is (in, out)
            total += r * sum(module.weight.shape)
    return total


def activation_bytes(
    config, batch: int, seq: int, act_bytes: int, res_bytes: int, checkpointing: bool,
    linears_train: bool = True, gated_mlp: bool | None = None,
) -> int:
    """Bytes autograd keeps for a stack of transformer blocks (see the module docstring)."""
    h = config.hidden_size
    inter = getattr(config, "intermediate_size", None) or 4 * h
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    if gated_mlp is None:
        gated_mlp = getattr(config, "hidden_act", "silu") in ("silu", "swiglu") and hasattr(config, "intermediate_size")
    eager = getattr(config, "_attn_implementation", None) == "eager"
    residual = 2 * h + (2 * h if linears_train else 0)  # norm inputs (+ outputs)
    other = 4 * h + (h + inter if linears_train else 0) + (3 * inter if gated_mlp else inter)
    per_token_layer = residual * res_bytes + other * act_bytes
    if eager:
        per_token_layer += heads * seq * (4 + (act_bytes if act_bytes != 4 else 0))
    tokens = batch * seq
    outside = 3 * h * tokens * res_bytes
    if checkpointing:
        return int(layers * h * tokens * res_bytes + per_token_layer * tokens + outside)
    return int(layers * per_token_layer * tokens + outside)


# ---------------------------------------------------------------------------------------- helpers


def _parts(model: nn.Module) -> dict[str, nn.Module]:
    if all(isinstance(getattr(model, p, None), nn.Module) for p in PARTS):
        return {p: getattr(model, p) for p in PARTS}
    from vlmkit.model.parts import find_part

    found = {name: find_part(model, part) for name, part in (("projector", "projector"), ("vision_tower", "vision"), ("language_model", "language"))}
    if all(found.values()):  # a pretrained transformers VLM (a projector inside its tower counts as projector)
        parts = {name: module for name, (_, module) in found.items()}
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is not None:
            parts["lm_head"] = head
        return parts
    if not hasattr(getattr(model, "config", None), "num_hidden_layers"):
        raise VlmkitError(f"plan: {type(model).__name__} is neither a vlmkit model nor a transformers language model")
    return {"model": model}


def _linears(module: nn.Module, skip: nn.Module | None = None):
    return [m for m in module.modules() if isinstance(m, nn.Linear) and m is not skip]


def _tower_config(tower: nn.Module):
    config = getattr(getattr(tower, "model", None), "config", None)
    config = getattr(config, "vision_config", config)
    needed = ("hidden_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size")
    return config if config is not None and all(hasattr(config, k) for k in needed) else None


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _bytes(n: float) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.1f} MiB"


def plan_run(cfg: TrainConfig) -> str:
    """`vlmkit train --dry-run`: what the run would train and an estimate of its peak memory."""
    from vlmkit.build import for_training
    from vlmkit.recipe import resolve

    device = resolve_device()
    cfg, choices = resolve(cfg, device.type)
    model, _ = for_training(cfg)
    method = "align" if cfg.stage == "align" else ("lora" if cfg.method == "dpo" and cfg.uses_lora else cfg.method)
    method = "full" if method == "dpo" else method
    batch = cfg.batch_size * (2 if cfg.method == "dpo" else 1)  # DPO scores chosen and rejected together
    precision = training_precision(cfg.precision, device)
    plan = estimate(
        model, method, batch, cfg.max_length, precision.bf16, cfg.gradient_checkpointing,
        lora_r=cfg.lora_r or 16, trainable_groups=("vision_tower",) if cfg.train_vision else (), lora_targets=cfg.lora_targets,
        ema=cfg.ema > 0, frozen_bf16=precision.frozen_bf16, frozen_int8=precision.frozen_int8,
    )
    chosen = "".join(f"\n  {c}" for c in choices)
    return (plan.table() + f"\n(batch {cfg.batch_size}, max_length {cfg.max_length}; device {device})"
            + (f"\nchosen for this run:{chosen}" if chosen else ""))
