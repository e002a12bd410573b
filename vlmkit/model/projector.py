"""The connector between a vision tower and a language model: pool the grid, then project.

A tower gives a feature grid (B, h, w, D). The connector average-pools it to the grid that yields
`image_tokens` tokens and maps each cell to the LM's hidden size:
    linear         one Linear(D, H)                                   (LLaVA-1)
    mlp            Linear(D, H) -> GELU -> Linear(H, H)               (LLaVA-1.5 "mlp2x_gelu")
    ln_mlp         LayerNorm(D) -> mlp                                (InternVL's mlp1; features of any
                   scale, e.g. a CNN's ReLU6 maps, enter the MLP standardised)
    pixel_shuffle  r x r neighbours concatenated, then Linear(D*r*r, H) (SmolVLM / Idefics3)
    shuffle_mlp    r x r neighbours concatenated, then ln_mlp: each token keeps its cells apart
                   instead of averaging them, through the same standardising MLP
Pooling is parameter-free, so features can be cached after it while the tower is frozen.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.errors import VlmkitError
from vlmkit.registry import Registry

PROJECTORS = Registry("projector")


def grid_side(image_tokens: int) -> int:
    side = math.isqrt(image_tokens)
    if side * side != image_tokens:
        raise VlmkitError(f"image_tokens={image_tokens} must be a square number (1, 4, 9, 16, 64...)")
    return side


class Projector(nn.Module):
    """A connector ends in one Linear, `head`; `head_input` is what it reads. Split so that the head
    can be fitted in closed form (`VlmkitForConditionalGeneration.fit_projector_head`)."""

    pool_factor = 1
    head: nn.Linear

    def head_input(self, grid: torch.Tensor) -> torch.Tensor:  # (B, g, g, D) -> (B, g*g, F)
        raise NotImplementedError

    def forward(self, grid: torch.Tensor) -> torch.Tensor:  # (B, g, g, D) -> (B, g*g, H)
        return self.head(self.head_input(grid))


class LinearProjector(Projector):
    def __init__(self, in_dim: int, out_dim: int, shuffle: int = 1):
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)

    @property
    def head(self) -> nn.Linear:
        return self.proj

    def head_input(self, grid: torch.Tensor) -> torch.Tensor:
        return grid.flatten(1, 2)


class MLPProjector(Projector):
    def __init__(self, in_dim: int, out_dim: int, shuffle: int = 1):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)

    @property
    def head(self) -> nn.Linear:
        return self.fc2

    def head_input(self, grid: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.fc1(grid.flatten(1, 2)))


class LayerNormMLPProjector(MLPProjector):
    def __init__(self, in_dim: int, out_dim: int, shuffle: int = 1):
        super().__init__(in_dim, out_dim)
        self.norm = nn.LayerNorm(in_dim)

    def head_input(self, grid: torch.Tensor) -> torch.Tensor:
        return super().head_input(self.norm(grid))


class PixelShuffleProjector(Projector):
    """Trade spatial resolution for channels: (B, g*r, g*r, D) -> (B, g*g, D*r*r) -> Linear."""

    def __init__(self, in_dim: int, out_dim: int, shuffle: int = 2):
        super().__init__()
        self.pool_factor = shuffle
        self.proj = nn.Linear(in_dim * shuffle * shuffle, out_dim, bias=False)

    @property
    def head(self) -> nn.Linear:
        return self.proj

    def head_input(self, grid: torch.Tensor) -> torch.Tensor:
        return shuffle_cells(grid, self.pool_factor).flatten(1, 2)


class ShuffleMLPProjector(LayerNormMLPProjector):
    """`pixel_shuffle`'s r x r neighbours concatenated, read by `ln_mlp`: (B, g*r, g*r, D) -> (B, g*g, H)."""

    def __init__(self, in_dim: int, out_dim: int, shuffle: int = 2):
        super().__init__(in_dim * shuffle * shuffle, out_dim)
        self.pool_factor = shuffle

    def head_input(self, grid: torch.Tensor) -> torch.Tensor:
        return super().head_input(shuffle_cells(grid, self.pool_factor))


def shuffle_cells(grid: torch.Tensor, r: int) -> torch.Tensor:
    """(B, g*r, g*r, D) -> (B, g, g, r*r*D): each r x r block of cells concatenated into one."""
    b, h, w, d = grid.shape
    x = grid.reshape(b, h // r, r, w // r, r, d).permute(0, 1, 3, 2, 4, 5)  # (B, g, g, r, r, D)
    return x.reshape(b, h // r, w // r, r * r * d)


PROJECTORS.register("linear", LinearProjector)
PROJECTORS.register("mlp", MLPProjector)
PROJECTORS.register("ln_mlp", LayerNormMLPProjector)
PROJECTORS.register("pixel_shuffle", PixelShuffleProjector)
PROJECTORS.register("shuffle_mlp", ShuffleMLPProjector)


def pool_grid(grid: torch.Tensor, side: int) -> torch.Tensor:
    """Average-pool a (B, h, w, D) grid to (B, side, side, D); a no-op when it already fits."""
    if grid.shape[1] == side and grid.shape[2] == side:
        return grid
    pooled = F.adaptive_avg_pool2d(grid.permute(0, 3, 1, 2).float(), side)
    return pooled.to(grid.dtype).permute(0, 2, 3, 1)
