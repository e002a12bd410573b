"""Training configuration: one typed dataclass, loaded from YAML and `key=value` overrides.

The config is data: built once, validated in `__post_init__`, saved as `config.yaml` in the run folder
and reloaded from there by `--resume`. Every key can be given on the command line
(`vlmkit train lr=3e-4 stage=sft`), in a YAML file, or both (the command line wins).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from vlmkit.errors import VlmkitError, first_line
from vlmkit.io import atomic_write_text

STAGES = ("align", "sft", "contrastive")
PROJECTOR_INITS = ("auto", "random", "text", "tokens")
REPLY_INITS = ("text", "tokens")  # the projector_init values fitted to supervised replies
PRECISIONS = ("auto", "fp32", "bf16", "bf16-frozen", "int8-frozen")
METHODS = ("auto", "full", "lora", "qlora", "dpo")
OBJECTIVES = ("lm", "contrastive")
CONTRASTIVE_LOSSES = ("clip", "siglip")


@dataclass
class TrainConfig:
    # what to train
    objective: str = "lm"  # lm: a VLM that writes text; contrastive: a dual encoder for retrieval (docs/retrieval.md)
    model: str | None = None  # fine-tune this model (a vlmkit run, or a pretrained VLM's folder / hub id)
    vision: str = "efficientnet-lite0"  # built-in name, local folder, hub id or timm:NAME
    llm: str = "smollm2-135m"  # built-in name, local folder, hub id or .gguf file
    projector: str = "ln_mlp"  # linear | mlp | ln_mlp | pixel_shuffle
    norm_image_embeds: bool = True  # scale image embeddings to the LM's token-embedding norm
    standardize_features: bool = True  # projector inputs standardised with the training images' statistics
    image_tokens: int | None = None  # tokens per image (a square number); None: chosen from the tower (vlmkit/recipe.py)
    image_positions: bool | None = None  # a learned embedding per image-token position; None: for towers without their own (CNNs)
    position_words: bool | None = None  # those embeddings start at the LM's words for their grid column and row (" left" + " top"...); None: with column_words
    column_words: bool | None = None  # lay each image out column by column, each after its word (" left", " middle", " right"); None: for 2 or 3 columns
    projector_init: str = "auto"  # auto | random | text | tokens: image tokens start at the words the replies say
    train_on_prompt: bool | None = None  # the user turns' words are trained too, not only the replies; None: for a new composition
    image_size: int | None = None  # input resolution of the tower; None: chosen with image_tokens, else the tower's own
    vision_feature_layer: int | None = None  # the tower's layer read (-1 last, -2 the one before); None: -2, or -3 for the built-in CNN (recipe: its block before its last)
    stage: str = "sft"  # align: projector only; sft: projector + LM (full or LoRA); contrastive: projector vs the LM's words
    train_vision: bool = False
    method: str = "auto"  # auto | full | lora | qlora (4-bit base + LoRA) | dpo (preference data; LoRA if lora_r > 0)
    fsdp: bool = False  # under torchrun/accelerate: shard parameters across processes (FSDP) instead of DDP
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: less memory, ~30% slower
    beta: float = 0.1  # DPO: strength of the pull towards the reference model
    lora_r: int = 0  # LoRA rank on the LM's attention and MLP projections; method=lora/qlora default 16
    lora_alpha: int = 32
    lora_targets: str = "auto"  # attention | all | comma-separated layer names (q_proj,v_proj); auto: attention with LoRA
    lora_dropout: float = 0.0
    # objective=contrastive (docs/retrieval.md)
    text: str = "all-minilm-l6-v2"  # text encoder: built-in name, local folder or hub id (BERT-like, or a causal LM)
    loss: str = "clip"  # clip (InfoNCE, learnable temperature) | siglip (sigmoid, learnable temperature and bias)
    embed_dim: int = 256  # the shared embedding size both projection heads map to
    logit_bias: float | None = None  # siglip's starting bias; None: log((1/B) / (1 - 1/B)) for batch size B
    train_text: bool = False  # tune the text encoder in full
    lora_towers: str = "text"  # with lora_r > 0: LoRA on text | vision | text+vision (instead of full tuning)
    probe_size: int = 256  # held-out images whose recall@K is logged during training
    # data
    data: str | None = None
    eval_data: str | None = None
    max_length: int = 512
    skip_too_long: bool = False  # drop (and count) samples whose image tokens would be cut, instead of failing
    cache_features: bool = True  # cache pooled vision features while the tower is frozen
    feature_dropout: float = 0.0  # share of the image features' values zeroed while training (before the projector)
    group_by_length: bool | None = None  # batches of samples of similar length; None: where that saves 7% of the padded tokens (vlmkit/recipe.py)
    # optimisation
    epochs: float | None = None  # None: at least 4000 steps and one epoch, at most six epochs (vlmkit/recipe.py)
    max_steps: int = 0  # > 0 overrides epochs and max_minutes
    max_minutes: float = 0.0  # > 0: about this many minutes of steps, the count fixed by timing a few (overrides epochs)
    batch_size: int | None = None  # None: 4 on CPU, 16 on a GPU
    grad_accum: int = 1
    lr: float | None = None  # language model (or LoRA) learning rate; None: LoRA 1e-3 on a new composition, 5e-4 on a trained VLM, 1e-4 in full
    projector_lr: float = 1e-3
    vision_lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    max_grad_norm: float = 1.0
    ema: float = 0.0  # > 0: save a moving average of the trainable weights, time constant ema x the run's steps
    precision: str = "auto"  # auto | fp32 | bf16 (autocast) | bf16-frozen / int8-frozen (frozen weights' products in bf16 / int8)
    compile: bool = False  # torch.compile the LM's blocks (TorchInductor; on CPU it needs a C++ compiler)
    seed: int = 0
    # bookkeeping
    output: str = "runs/train"
    eval_every: int = 0  # steps between eval-loss passes; 0 = at the end only
    save_every: int = 50  # steps between resumable checkpoints; 0 = never

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise VlmkitError(f"config field `objective`: {self.objective!r} is not one of {', '.join(OBJECTIVES)}")
        if self.objective == "contrastive" and self.feature_dropout > 0:
            raise VlmkitError("config field `feature_dropout` applies to a VLM's projector, not to objective=contrastive")
        if self.ema < 0 or (self.ema > 0 and "contrastive" in (self.objective, self.stage)):
            raise VlmkitError(f"config field `ema`: {self.ema} is not used here; give a share of the run's steps above "
                              "0 (0.1 is typical) for generative training, or 0 for none")
        if self.objective == "contrastive" and self.stage == "contrastive":
            raise VlmkitError("stage=contrastive aligns a VLM's projector; objective=contrastive trains a dual "
                              "encoder: give one of them")
        if self.lora_towers not in ("text", "vision", "text+vision", "vision+text"):
            raise VlmkitError(f"config field `lora_towers`: {self.lora_towers!r} is not one of text, vision, text+vision")
        if self.loss not in CONTRASTIVE_LOSSES:
            raise VlmkitError(f"config field `loss`: {self.loss!r} is not one of {', '.join(CONTRASTIVE_LOSSES)}")
        if self.stage not in STAGES:
            raise VlmkitError(f"config field `stage`: {self.stage!r} is not one of {', '.join(STAGES)}")
        if self.method not in METHODS:
            raise VlmkitError(f"config field `method`: {self.method!r} is not one of {', '.join(METHODS)}")
        if self.method in ("auto", "full") and self.lora_r > 0:  # lora_r alone asks for LoRA
            self.method = "lora"
        if self.method in ("lora", "qlora") and self.lora_r <= 0:
            self.lora_r = 16
        if self.precision not in PRECISIONS:
            raise VlmkitError(f"config field `precision`: {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        for name in ("batch_size", "grad_accum", "max_length", "image_tokens", "embed_dim"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise VlmkitError(f"config field `{name}` must be >= 1 (got {getattr(self, name)})")
        if self.projector_init not in PROJECTOR_INITS:
            raise VlmkitError(
                f"config field `projector_init`: {self.projector_init!r} is not one of {', '.join(PROJECTOR_INITS)}"
            )
        if self.projector_init in REPLY_INITS and (self.model or self.method == "dpo"):
            raise VlmkitError(
                "config field `projector_init` starts a new projector from supervised replies; it cannot apply to "
                "`model` (a trained one) or to method=dpo"
            )
        if self.train_on_prompt and (self.model or self.method == "dpo" or "contrastive" in (self.objective, self.stage)):
            raise VlmkitError(
                "config field `train_on_prompt` trains a new composition (vision + llm) on its user turns' words too; "
                "it cannot apply to `model` (a pretrained model's chat template trains its replies only), to "
                "method=dpo, objective=contrastive or stage=contrastive"
            )
        if self.position_words and self.image_positions is False:
            raise VlmkitError("config field `position_words` needs `image_positions=true` (the embeddings it starts)")
        if self.epochs is not None and self.epochs <= 0 and self.max_steps <= 0 and self.max_minutes <= 0:
            raise VlmkitError("give `epochs` > 0, `max_steps` > 0 or `max_minutes` > 0 (or leave `epochs` unset)")
        if self.max_minutes < 0:
            raise VlmkitError(f"config field `max_minutes` must be >= 0 (got {self.max_minutes})")
        for name in ("feature_dropout", "lora_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise VlmkitError(f"config field `{name}` is a share of values dropped: give 0 <= {name} < 1 "
                                  f"(got {getattr(self, name)})")

    @property
    def uses_lora(self) -> bool:
        return self.lora_r > 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(Path(path), yaml.safe_dump(self.to_dict(), sort_keys=False))


def _coerce(name: str, text: str, kind: type | str):
    """Parse a command-line value to the field's type."""
    kind = str(kind)
    if text.lower() in ("none", "null") and "None" in kind:
        return None
    try:
        if "bool" in kind:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if "int" in kind and "float" not in kind:
            return int(text)
        if "float" in kind:
            return float(text)
    except ValueError:
        raise VlmkitError(f"config field `{name}`: cannot read {text!r} as {kind}") from None
    return text


def load_config(path: str | None = None, overrides: list[str] | None = None, **fixed) -> TrainConfig:
    """YAML file (optional) + `key=value` overrides + keyword values (CLI flags) -> TrainConfig."""
    known = {f.name: f.type for f in fields(TrainConfig)}
    values: dict = {}
    if path:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise VlmkitError(f"config file {path} not found") from None
        except yaml.YAMLError as e:
            raise VlmkitError(f"{path}: not valid YAML ({first_line(e)})") from None
        if not isinstance(loaded, dict):
            raise VlmkitError(f"{path}: expected a mapping of config keys")
        for key in loaded:
            if key not in known:
                raise VlmkitError(f"{path}: unknown config key `{key}`; known: {', '.join(known)}")
        values.update(loaded)
    for item in overrides or []:
        key, sep, text = item.partition("=")
        if not sep:
            raise VlmkitError(f"expected key=value, got {item!r}")
        if key not in known:
            raise VlmkitError(f"unknown config key `{key}`; known: {', '.join(known)}")
        values[key] = _coerce(key, text, known[key])
    values.update({k: v for k, v in fixed.items() if v is not None})
    return TrainConfig(**values)
