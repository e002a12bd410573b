"""`compile`: the language model's blocks compiled by torch.compile (TorchInductor) for a run's steps.

On a CPU, a small LM's step is more than its matrix products: SmolLM2-135M's 30 blocks launch about
15,000 small operations a step (norms, rotary embeddings, the activation, casts, LoRA's low-rank
products, attention), each dispatched from Python and recorded by autograd, and on a 2-core VM with the
frozen weights' products in bf16 the products took well under half of a 0.44 s step. Compiled, each
block's forward and backward become a few fused kernels (docs/precision.md has the measurements).

Every block is compiled alone, and all of them share one graph: the blocks are alike and their weights
(the bf16 copies of `vlmkit.model.frozen_bf16` included) are the graph's inputs, so the compiling costs
one block's forward and backward for each of the first two batch widths, then once for any width: 34-54 s
on 2 CPU cores from an empty TorchInductor cache, less when its on-disk cache holds the kernels. The
compiled forward is set on each block until `restore()`, which puts the plain one back, so the model that
is merged and saved is the one built. Not a default: on a 2-core CPU its steps were 1.0-1.25x faster, and
two whole runs with it scored lower than plain ones, within the spread between runs (its gradients are as
near the fp32 ones as the plain bf16-frozen gradients are: docs/precision.md).
"""

from __future__ import annotations

import os
import shutil

import torch
from torch import nn


def cxx_compiler() -> str | None:
    """The C++ compiler TorchInductor would build CPU kernels with ($CXX, else g++ or clang++), if any."""
    return shutil.which(os.environ.get("CXX") or "g++") or shutil.which("clang++")


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The language model's blocks: the longest `nn.ModuleList` of the model's LM (the whole model when it
    has none apart) whose modules are all of one class."""
    lm = getattr(model, "language_model", None) or model
    lists = [m for m in lm.modules() if isinstance(m, nn.ModuleList) and len(m) > 1 and len({type(b) for b in m}) == 1]
    return list(max(lists, key=len)) if lists else []


class CompiledBlocks:
    """`model`'s repeated blocks, each running a compiled forward from construction until `restore()`."""

    def __init__(self, model: nn.Module):
        self.blocks = repeated_blocks(model)
        for block in self.blocks:
            block.forward = torch.compile(block.forward)

    def restore(self) -> None:
        """The blocks' own forward again (twice is harmless)."""
        for block in self.blocks:
            vars(block).pop("forward", None)
        self.blocks = []
