"""Frozen weights multiplied in int8, everything trained in fp32 (`precision=int8-frozen`).

The CPU counterpart of `vlmkit.model.frozen_bf16` for CPUs without bf16 units. A step's time is mostly the
products with the language model's fixed weights, forward and input gradients; on an AVX2 CPU fbgemm's int8
products ran 1.6-1.8x faster than fp32 ones at a training step's shapes (docs/precision.md). It is asked for,
never `precision=auto`'s pick: its gradients are further from fp32's than bf16's, and at equal steps the
quickstart learned its look-ups later (0.76-0.85 held-out after 800 steps against fp32's 0.95-0.97). Each frozen
`nn.Linear` of the model (the language model's beside LoRA, a frozen tower's; not the LM's output head: the
logits stay fp32) gets two int8 packs, of its weight and of its transpose, one symmetric scale per row:

- forward, y = x W^T: each row of x (a token) is first divided by its own largest magnitude, then multiplied
  by the int8 W with fbgemm's dynamic linear (which rounds its input to 7 bits at one scale for the whole
  matrix: an AVX2 CPU without VNNI sums pairs of 8-bit products in 16 bits, which full 8-bit inputs
  overflow), and scaled back. One scale a token, not one for the whole input: with one for the matrix a few
  large activations flattened the rest, and the quickstart's loss rose from 0.60 to 1.05;
- backward, dL/dx = dL/dy W: the same with the incoming gradient and the int8 W^T. A frozen weight gets
  no gradient of its own, so nothing else of the layer is needed.

The adapters, the projector, norms, attention, the residual sums and the loss stay fp32. `restore` puts the
plain layers back before the model is merged and saved, so checkpoints and the saved model are unchanged.

The packs are made with `torch.quantize_per_channel`, which torch 2.14 marks deprecated (with every
quantized tensor), and warns; the warning is silenced here. oneDNN's int8 linear takes plain int8 tensors,
but it set itself up again for every new number of rows, which made the steps a time budget times 1.5x
slower than the later ones, and so bought too few steps (docs/precision.md).
"""

from __future__ import annotations

import types
import warnings

import torch
from torch import nn

from vlmkit.device import cpu_int8_products
from vlmkit.model.frozen_bf16 import copyable_linears


def pack(weight: torch.Tensor):
    """`weight` (out, in) in fbgemm's packed int8 layout, each row scaled to its largest magnitude."""
    weight = weight.detach().float().contiguous()
    scale = (weight.abs().amax(dim=1) / 127).clamp_min(1e-12).double()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*deprecated")
        values = torch.quantize_per_channel(weight, scale, torch.zeros_like(scale, dtype=torch.long), 0, torch.qint8)
    return torch.ops.quantized.linear_prepack(values, None)


def product(x: torch.Tensor, packed) -> torch.Tensor:
    """x W^T for an fp32 `x` (..., in), each row of `x` rounded at its own scale."""
    flat = x.reshape(-1, x.shape[-1])
    size = flat.abs().amax(dim=1, keepdim=True).clamp_min_(1e-30)
    y = torch.ops.quantized.linear_dynamic((flat / size).contiguous(), packed, True)  # True: 7-bit inputs
    return y.mul_(size).reshape(*x.shape[:-1], -1)


class _FrozenProduct(torch.autograd.Function):
    """y = x W^T, and dL/dx = dL/dy W: both int8 products (the weight is frozen: it gets no gradient)."""

    @staticmethod
    def forward(ctx, x, packed, packed_t):
        ctx.packed_t = packed_t
        return product(x, packed)

    @staticmethod
    def backward(ctx, grad):
        return product(grad.contiguous(), ctx.packed_t), None, None


def _int8_forward(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    packed, packed_t = layer.int8_packs
    y = _FrozenProduct.apply(x, packed, packed_t)
    return y if layer.bias is None else y + layer.bias


class FrozenInt8:
    """int8 packs of `model`'s frozen linear weights (its output head aside), in use from construction until
    `restore()`."""

    def __init__(self, model: nn.Module):
        if not cpu_int8_products():
            raise RuntimeError("this torch build has no fbgemm int8 linear (torch.ops.quantized.linear_dynamic)")
        head = model.get_output_embeddings()
        self.layers = [m for m in copyable_linears(model)
                       if m is not head and not any(p.requires_grad for p in m.parameters())]
        self.bytes = 0  # memory the packs take: W and W^T at a byte a value
        packs: dict[int, tuple] = {}  # by the weight's id: layers that share a weight share its packs
        for layer in self.layers:
            if id(layer.weight) not in packs:
                packs[id(layer.weight)] = (pack(layer.weight), pack(layer.weight.t()))
                self.bytes += 2 * layer.weight.numel()
            layer.int8_packs = packs[id(layer.weight)]
            layer.forward = types.MethodType(_int8_forward, layer)

    def restore(self) -> None:
        """The layers' own fp32 forward again, the packs freed (twice is harmless)."""
        for layer in self.layers:
            vars(layer).pop("forward", None)
            vars(layer).pop("int8_packs", None)
        self.layers, self.bytes = [], 0

