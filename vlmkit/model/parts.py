"""The three parts of any VLM — vision tower, projector, language model — found by module name.

vlmkit's own model has them as attributes; transformers VLMs keep them under family-specific names
(Llava `multi_modal_projector`, SmolVLM `connector`, Qwen2-VL `visual.merger`...). Training (which
part trains at which rate, where LoRA goes), `inspect` and the memory plan all ask this one table.
"""

from __future__ import annotations

from torch import nn

# attribute names of each part, searched in this order; the first module whose name ends so wins
PART_NAMES = {
    "vision": ("vision_tower", "vision_model", "visual"),
    "projector": ("projector", "multi_modal_projector", "connector", "merger"),
    "language": ("language_model", "text_model"),
}


def find_part(model: nn.Module, part: str) -> tuple[str, nn.Module] | None:
    """(dotted name, module) of `part` ("vision", "projector" or "language"), or None."""
    for wanted in PART_NAMES[part]:
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] == wanted:
                return name, module
    return None


def part_parameters(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Parameters of each part, each parameter in one part only (Qwen2-VL's projector sits inside its
    vision tower: it counts as projector). Parameters in none of them (e.g. a separate lm_head) go to
    "language"."""
    owner: dict[int, str] = {}
    for part in ("projector", "vision", "language"):  # the most specific first
        found = find_part(model, part)
        if found is None:
            continue
        for p in found[1].parameters():
            owner.setdefault(id(p), part)
    out: dict[str, list[nn.Parameter]] = {"vision": [], "projector": [], "language": []}
    seen = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        out[owner.get(id(p), "language")].append(p)
    return out
