"""LoRA on the language model (peft), merged back before the model is saved.

Targets the LM's attention projections (`lora_targets=attention`, the default recipe's) or every linear
projection of its attention and MLP blocks (`all`), or the layers named; the tower and the projector are
left alone (the projector trains in full anyway).
"""

from __future__ import annotations

from torch import nn

from vlmkit.errors import VlmkitError
from vlmkit.model.quantize import quiet_bitsandbytes

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "c_attn", "qkv_proj")
LM_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "c_attn", "c_proj", "c_fc", "qkv_proj", "gate_up_proj", "dense", "fc1", "fc2")


def linear_names(lm: nn.Module) -> set[str]:
    """The last name of every linear layer of the LM (GPT-2's Conv1D is a linear layer with its weight
    transposed; peft adapts it too)."""
    from transformers.pytorch_utils import Conv1D

    return {name.rsplit(".", 1)[-1] for name, m in lm.named_modules() if isinstance(m, (nn.Linear, Conv1D))}


def lm_target_modules(lm: nn.Module) -> list[str]:
    names = linear_names(lm)
    found = sorted(names & set(LM_PROJECTIONS))
    if not found:
        raise VlmkitError(f"LoRA: no known projection layers in the LM ({', '.join(sorted(names))})")
    return found


def chosen_targets(lm: nn.Module, spec: str) -> list[str]:
    """`all` (or `auto`, when no recipe resolved it): every attention/MLP projection of the LM; `attention`: its attention projections (every
    projection when it has none of the known names); else the user's comma-separated layer names, each of
    which must name linear layers of the LM."""
    if spec in ("all", "auto", "", None):
        return lm_target_modules(lm)
    if spec == "attention":
        every = lm_target_modules(lm)
        return [n for n in every if n in ATTENTION_PROJECTIONS] or every
    wanted = [name.strip() for name in spec.split(",") if name.strip()]
    names = linear_names(lm)
    unknown = [w for w in wanted if w not in names]
    if unknown:
        raise VlmkitError(
            f"config field `lora_targets`: {', '.join(unknown)} not among the LM's linear layers ({', '.join(sorted(names))})"
        )
    return sorted(wanted)


def add_lora(model, cfg) -> list[nn.Parameter]:
    """Wrap the LM's projections in LoRA adapters in place; returns the adapter parameters."""
    quiet_bitsandbytes()
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise VlmkitError("LoRA needs peft: pip install 'vlmkit[lora]'") from None
    from transformers.pytorch_utils import Conv1D

    lm = language_model(model)
    targets = chosen_targets(lm, getattr(cfg, "lora_targets", "auto"))
    conv1d = any(isinstance(m, Conv1D) and name.rsplit(".", 1)[-1] in targets for name, m in lm.named_modules())
    config = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        fan_in_fan_out=conv1d,  # GPT-2's Conv1D stores its weight transposed
    )
    inject_adapter_in_model(config, lm)
    return [p for n, p in lm.named_parameters() if "lora_" in n]


def language_model(model) -> nn.Module:
    from vlmkit.model.parts import find_part

    found = find_part(model, "language")
    if found is None:
        raise VlmkitError(f"LoRA: no language model module found in {type(model).__name__}")
    return found[1]


def merge_lora(model) -> None:
    """Fold every LoRA adapter into its base layer and drop the adapter modules."""
    from peft.tuners.lora import LoraLayer

    def replace(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            if isinstance(child, LoraLayer):
                child.merge()
                setattr(parent, name, child.get_base_layer())
            else:
                replace(child)

    replace(model)
