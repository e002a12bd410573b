"""Frozen weights multiplied in bf16, everything trained in fp32 (`precision=bf16-frozen`).

LoRA and the projector train a few million values beside a language model whose weights stay fixed, and
most of a step's time is the products with those fixed weights: the forward pass's, and the input
gradients of the backward pass (a frozen weight gets no gradient of its own). On a CPU with AMX those
products run about 3-4x faster in bf16 than in fp32 (docs/precision.md), and faster too with AVX512-BF16
alone, but autocast casts every weight to bf16 again at every call, which ate the gain. Here each frozen
`nn.Linear` gets its bf16 copy once and multiplies by it: its input is rounded to bf16 and its output
returned in fp32, so the adapters, the projector, the norms, attention, the residual sums and the loss
stay fp32.

Each copy is a buffer of its layer that the state dict leaves out (`bf16_weight`), read by the layer's
forward like its own weight, so the layers of a compiled block (`vlmkit.train.compiled`) share one graph.
`restore` puts the plain layers back before the model is merged and saved, so checkpoints and the saved
model are unchanged.
"""

from __future__ import annotations

import types

import torch
from torch import nn
from torch.nn import functional as F

COPY = "bf16_weight"


def _bf16_forward(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    y = F.linear(x.to(torch.bfloat16), getattr(layer, COPY)).to(x.dtype)
    return y if layer.bias is None else y + layer.bias


def copyable_linears(module: nn.Module) -> list[nn.Linear]:
    """The layers of `module` that can multiply by a bf16 copy: exactly `nn.Linear` (LoRA's wrappers and
    4-bit layers are other classes; the plain layer a LoRA wrapper holds is one) with an fp32 weight.
    `FrozenBf16` copies those that do not train; `vlmkit.train.plan` counts them in the parts that will not."""
    return [m for m in module.modules() if type(m) is nn.Linear and m.weight.dtype == torch.float32]


class FrozenBf16:
    """bf16 copies of `model`'s frozen linear weights, in use from construction until `restore()`."""

    def __init__(self, model: nn.Module):
        self.layers = [m for m in copyable_linears(model) if not any(p.requires_grad for p in m.parameters())]
        self.copies: dict[int, torch.Tensor] = {}  # by the weight's id: layers that share a weight share its copy
        for layer in self.layers:
            if id(layer.weight) not in self.copies:
                self.copies[id(layer.weight)] = layer.weight.detach().to(torch.bfloat16)
            layer.register_buffer(COPY, self.copies[id(layer.weight)], persistent=False)
            layer.forward = types.MethodType(_bf16_forward, layer)

    @property
    def bytes(self) -> int:
        """Memory the copies take."""
        return sum(w.numel() * w.element_size() for w in self.copies.values())

    def restore(self) -> None:
        """The layers' own fp32 forward again, the copies freed (twice is harmless)."""
        for layer in self.layers:
            vars(layer).pop("forward", None)
            if hasattr(layer, COPY):
                delattr(layer, COPY)
        self.layers, self.copies = [], {}
