"""The two contrastive losses, as pure functions of a batch's embeddings: CLIP's InfoNCE and SigLIP's sigmoid.

Row i of a batch is one (image, caption) pair. Both losses take the L2-normalised embeddings (B, E), the
logit scale (the temperature's inverse, already exponentiated) and a (B, B) boolean `positives` matrix:
`positives[i, j]` is True when pair i's caption belongs with pair j's image. By default only the diagonal;
`positive_pairs` marks every pair that shares the image or the caption as positive, so that a batch holding
two captions of one image, or one caption ("a red circle") of two images, does not push them apart.

- `clip_loss`: the mean of the caption->image and image->caption cross-entropies over the logits
  `scale * text @ image.T`, with soft targets: a query's target spreads evenly over its positives. With
  the diagonal alone it is exactly CLIP's loss (transformers `CLIPModel(return_loss=True)`).
- `siglip_loss`: every (caption, image) cell is a binary decision, label +1 for positives and -1 otherwise,
  `-sum(log sigmoid(label * (scale * text @ image.T + bias))) / B` (transformers `SiglipModel`).
- `siglip_bias_init`: the starting bias `log((1/B) / (1 - 1/B))`, the log-odds of the positive share of a
  batch of B with one positive per row: the sigmoid starts at the right base rate for that batch size.
  SigLIP's published -10 is this value for B of about 22,000 (it trained with 32k) and far too negative
  for a batch of 64, where it makes the first steps learn nothing but the bias.
"""

from __future__ import annotations

import math
from typing import Hashable, Sequence

import torch
import torch.nn.functional as F

CLIP_SCALE_INIT = 1 / 0.07  # CLIP's starting temperature
MAX_SCALE = 100.0  # CLIP clamps the learned scale here
SIGLIP_SCALE_INIT = 10.0


def positive_pairs(image_keys: Sequence[Hashable], text_keys: Sequence[Hashable]) -> torch.Tensor:
    """(B, B) bool: `[i, j]` when pairs i and j share their image or their caption (the diagonal always)."""
    images = _ids(image_keys)
    texts = _ids(text_keys)
    return (images[:, None] == images[None, :]) | (texts[:, None] == texts[None, :])


def _ids(keys: Sequence[Hashable]) -> torch.Tensor:
    table: dict = {}
    return torch.tensor([table.setdefault(k, len(table)) for k in keys])


def clip_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor | float,
              positives: torch.Tensor | None = None) -> torch.Tensor:
    """CLIP's symmetric InfoNCE on normalised embeddings (B, E); soft targets over `positives` (B, B)."""
    logits = scale * text @ image.T  # (B texts, B images)
    if positives is None:
        target = torch.arange(len(logits), device=logits.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    weights = positives.to(logits.device, logits.dtype)
    per_text = -(weights / weights.sum(1, keepdim=True) * F.log_softmax(logits, dim=1)).sum(1)
    per_image = -(weights.T / weights.T.sum(1, keepdim=True) * F.log_softmax(logits.T, dim=1)).sum(1)
    return (per_text.mean() + per_image.mean()) / 2


def siglip_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor | float, bias: torch.Tensor | float,
                positives: torch.Tensor | None = None) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss on normalised embeddings (B, E), summed over cells and divided by B."""
    logits = scale * text @ image.T + bias  # (B texts, B images)
    if positives is None:
        positives = torch.eye(len(logits), dtype=torch.bool, device=logits.device)
    labels = 2 * positives.to(logits.device, logits.dtype) - 1
    return -F.logsigmoid(labels * logits).sum(1).mean()


class ScoredPairs:
    """For a module with `logit_scale`, `logit_bias` and `config["loss"]`: the scale and the loss."""

    def scale(self) -> torch.Tensor:
        """exp(logit_scale), clamped at MAX_SCALE as CLIP does."""
        return self.logit_scale.exp().clamp(max=MAX_SCALE)

    def loss(self, image: torch.Tensor, text: torch.Tensor, positives: torch.Tensor | None = None) -> torch.Tensor:
        if self.config["loss"] == "siglip":
            return siglip_loss(image, text, self.scale(), self.logit_bias, positives)
        return clip_loss(image, text, self.scale(), positives)


def scale_and_bias(loss: str, bias: float | None) -> tuple[torch.nn.Parameter, torch.nn.Parameter]:
    """The learned log-scale (CLIP: log 1/0.07; SigLIP: log 10) and bias (trained with SigLIP only)."""
    siglip = loss == "siglip"
    scale = torch.nn.Parameter(torch.tensor(math.log(SIGLIP_SCALE_INIT if siglip else CLIP_SCALE_INIT)))
    return scale, torch.nn.Parameter(torch.tensor(float(bias or 0.0)), requires_grad=siglip)


def siglip_bias_init(batch_size: int) -> float:
    """log((1/B) / (1 - 1/B)) = -log(B - 1): the sigmoid starts at 1/B, the share of positive cells."""
    if batch_size < 2:
        raise ValueError("a contrastive batch needs at least 2 pairs")
    p = 1 / batch_size
    return math.log(p / (1 - p))
