"""LoRA on the language model (peft), merged back before the model is saved.

Targets every linear projection of the LM's attention and MLP blocks; the tower and the projector are
left alone (the projector trains in full anyway).
"""

from __future__ import annotations

from torch import nn

from vlmkit.errors import VlmkitError
from vlmkit.model.quantize import quiet_bitsandbytes

LM_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "c_attn", "c_proj", "c_fc", "qkv_proj", "gate_up_proj", "dense", "fc1", "fc2")


def lm_target_modules(lm: nn.Module) -> list[str]:
    names = {name.rsplit(".", 1)[-1] for name, m in lm.named_modules() if isinstance(m, nn.Linear)}
    found = sorted(names & set(LM_PROJECTIONS))
    if not found:
        raise VlmkitError(f"LoRA: no known projection layers in the LM ({', '.join(sorted(names))})")
    return found


def chosen_targets(lm: nn.Module, spec: str) -> list[str]:
    """`auto`: every attention/MLP projection of the LM; else the user's comma-separated layer names,
    each of which must name linear layers of the LM."""
    if spec in ("auto", "", None):
        return lm_target_modules(lm)
    wanted = [name.strip() for name in spec.split(",") if name.strip()]
    names = {name.rsplit(".", 1)[-1] for name, m in lm.named_modules() if isinstance(m, nn.Linear)}
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
    lm = language_model(model)
    config = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=chosen_targets(lm, getattr(cfg, "lora_targets", "auto")),
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
