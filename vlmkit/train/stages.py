"""What trains: the stages (`align`: projector only; `sft`: projector + LM, in full or with LoRA) as
parameter groups with one learning rate per part, and which modules stay in eval mode.
"""

from __future__ import annotations

from torch import nn

from vlmkit.config import TrainConfig
from vlmkit.errors import VlmkitError
from vlmkit.model.lora import add_lora
from vlmkit.model.parts import find_part, part_parameters


def set_trainable(model, cfg: TrainConfig) -> list[dict]:
    """Freeze/unfreeze by stage; returns the optimizer's parameter groups (one lr per part)."""
    model.requires_grad_(False)
    parts = part_parameters(model)
    if not parts["projector"]:
        raise VlmkitError(f"{type(model).__name__}: no projector module found to train")
    groups = [{"params": parts["projector"], "lr": cfg.projector_lr, "name": "projector"}]
    if cfg.train_vision:
        groups.append({"params": parts["vision"], "lr": cfg.vision_lr, "name": "vision"})
    if cfg.stage == "sft":
        if cfg.uses_lora:
            lora_params = add_lora(model, cfg)
            groups.append({"params": lora_params, "lr": cfg.lr, "name": "lora"})
        else:
            groups.append({"params": parts["language"], "lr": cfg.lr, "name": "llm"})
    for group in groups:
        for p in group["params"]:
            p.requires_grad_(True)
    return groups


def train_mode(model, cfg: TrainConfig) -> None:
    """Training mode, except in the vision tower: a frozen tower stays in eval mode, and a trained one keeps
    its BatchNorm layers in eval mode, statistics fixed (their weights still train): a batch of a few images
    gives statistics too noisy to normalise by, and ones that differ from those generation uses."""
    model.train()
    if isinstance(getattr(model, "feature_dropout", None), nn.Dropout):
        model.feature_dropout.p = cfg.feature_dropout
    elif cfg.feature_dropout > 0:
        raise VlmkitError(f"config field `feature_dropout` drops the features a vlmkit composition's projector reads; "
                          f"this model ({type(model).__name__}) has none: leave it at 0")
    tower = find_part(model, "vision")
    if tower is None:
        return
    if not cfg.train_vision:
        tower[1].eval()
        return
    for module in tower[1].modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
