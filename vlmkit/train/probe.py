"""The held-out probe of a contrastive run: recall@K, embedding spread and the logit scale, as training goes.

A contrastive loss can keep falling while retrieval gets worse (open_clip#742: the embeddings collapse, or
the temperature runs away); nothing in the loss shows it. So a fixed set of held-out images and their
captions is embedded every few steps and scored (`retrieval.metrics`), and `RecallWatch` warns, once per
episode, when the probe's recall has stayed well below its best while the training loss kept falling.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vlmkit.data.captions import Pair, caption_key
from vlmkit.retrieval.metrics import embedding_variance, ranks, summarize

# a fall of the probe's mean R@5 from its best worth a warning: a fifth of the best, at least 0.05. Smaller
# dips come and go on a probe of a few hundred images (measured: 0.53 -> 0.45 -> 0.49 on MNIST, loss falling)
RECALL_DROP, RECALL_DROP_SHARE = 0.05, 0.2


def hold_out(pairs: list[Pair], size: int, seed: int) -> tuple[list[Pair], list[Pair]]:
    """(training pairs, probe pairs): `size` images, with all their captions, set aside at random (seeded);
    at most a tenth of the images, and none when there are fewer than 20."""
    images = sorted({p.image for p in pairs})
    n = min(size, len(images) // 10)
    if n < 2:
        return pairs, []
    g = torch.Generator().manual_seed(seed)
    probe = {images[i] for i in torch.randperm(len(images), generator=g)[:n].tolist()}
    return [p for p in pairs if p.image not in probe], [p for p in pairs if p.image in probe]


def first_images(pairs: list[Pair], size: int) -> list[Pair]:
    """The pairs of the first `size` distinct images (a held-out file used as the probe)."""
    keep = list(dict.fromkeys(p.image for p in pairs))[:size]
    chosen = set(keep)
    return [p for p in pairs if p.image in chosen]


@dataclass
class Probe:
    """The probe's images and captions, as the indices `metrics.ranks` takes."""

    pairs: list[Pair]
    images: list[str] = field(init=False)
    captions: list[str] = field(init=False)
    text_image: list[int] = field(init=False)
    text_group: list[int] = field(init=False)

    def __post_init__(self):
        self.images = list(dict.fromkeys(p.image for p in self.pairs))
        where = {image: i for i, image in enumerate(self.images)}
        groups: dict[str, int] = {}
        self.captions = [p.caption for p in self.pairs]
        self.text_image = [where[p.image] for p in self.pairs]
        self.text_group = [groups.setdefault(caption_key(p.caption), len(groups)) for p in self.pairs]

    def score(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> dict:
        """probe R@1 / R@5 both ways (identical captions count as one), embedding spread."""
        t2i, i2t = ranks(image_emb, text_emb, self.text_image, self.text_group)
        a, b = summarize(t2i, (1, 5)), summarize(i2t, (1, 5))
        return {"probe_t2i_R@1": a["R@1"], "probe_t2i_R@5": a["R@5"], "probe_i2t_R@1": b["R@1"],
                "probe_i2t_R@5": b["R@5"], "image_embedding_variance": embedding_variance(image_emb),
                "text_embedding_variance": embedding_variance(text_emb)}


class RecallWatch:
    """Warns when the probe's mean R@5 has lost a fifth of its best (at least RECALL_DROP) at two probes in a
    row (one low probe is often noise) while the training loss (the mean over the steps since the previous
    probe) is below what it was at that best."""

    def __init__(self):
        self.best_recall, self.loss_at_best, self.low, self.warned = -1.0, float("inf"), 0, False

    def check(self, recall: float, loss: float) -> str | None:
        if recall > self.best_recall:
            self.best_recall, self.loss_at_best, self.low, self.warned = recall, loss, 0, False
            return None
        drop = max(RECALL_DROP, RECALL_DROP_SHARE * self.best_recall)
        falling = recall < self.best_recall - drop and loss < self.loss_at_best
        self.low = self.low + 1 if falling else 0
        if self.low >= 2 and not self.warned:
            self.warned = True
            return (f"probe recall is falling while the loss falls (mean R@5 {recall:.3f}, best {self.best_recall:.3f}; "
                    f"loss {loss:.4f}, {self.loss_at_best:.4f} then): the embeddings may be collapsing or overfitting; "
                    "check image/text_embedding_variance and logit_scale in history.jsonl, lower the learning rates, "
                    "or keep the model from the best probe step")
        return None
