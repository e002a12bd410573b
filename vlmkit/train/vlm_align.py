"""`vlmkit train stage=contrastive`: align a composed VLM's tower + projector to its LM's words, contrastively.

An optional first stage before `stage=align` / `sft`, on image-caption data. An image's embedding is the mean
of its projected image tokens (what the LM would read, (B, T, H) -> (B, H)); a caption's is the mean of the
LM's own input embeddings of its tokens (the space the projector writes into). The CLIP (or SigLIP) loss with
a learned temperature pulls each image towards its captions' words and away from the other captions of the
batch, duplicates counted as positives, as for dual encoders (`contrastive.py`, whose loop, probe and
checkpoints this reuses). The projector trains (and the tower with `train_vision`); the LM is frozen.

The result is a vlmkit model folder: continue with `vlmkit train model=RUN stage=sft ...`.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.build import for_training
from vlmkit.config import REPLY_INITS, TrainConfig
from vlmkit.errors import VlmkitError
from vlmkit.io import save_pretrained_atomic
from vlmkit.model.contrastive import ScoredPairs, scale_and_bias
from vlmkit.model.text_encoder import MAX_TOKENS
from vlmkit.model.vlm import VlmkitForConditionalGeneration
from vlmkit.train.contrastive import Run, prepare, run_contrastive
from vlmkit.train.initialise import initialise_from_data
from vlmkit.train.loop import log
from vlmkit.train.stages import set_trainable


class Aligner(ScoredPairs, nn.Module):
    """A composed VLM seen as a dual encoder: projected image tokens vs. the LM's word embeddings."""

    def __init__(self, vlm: VlmkitForConditionalGeneration, loss: str, bias: float | None):
        super().__init__()
        self.vlm = vlm
        self.config = {"loss": loss}
        self.logit_scale, self.logit_bias = scale_and_bias(loss, bias)

    @property
    def vision_tower(self) -> nn.Module:
        return self.vlm.vision_tower

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vlm.encode_images(pixel_values)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        embeds = self.vlm.get_input_embeddings()(input_ids)  # (B, T, H)
        mask = attention_mask.unsqueeze(-1).to(embeds.dtype)
        return (embeds * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def embed_images(self, pixel_values=None, features=None) -> torch.Tensor:
        if features is None:
            features = self.encode_images(pixel_values)
        return F.normalize(self.vlm.project(features).float().mean(1), dim=-1)  # (B, T, H) -> (B, H)

    def embed_texts(self, input_ids=None, attention_mask=None, features=None) -> torch.Tensor:
        if features is None:
            features = self.text_features(input_ids, attention_mask)
        return F.normalize(features.float(), dim=-1)


class Captions:
    """The VLM processor's images, and captions as the LM's tokens (no special tokens), right-padded."""

    def __init__(self, processor):
        self.processor = processor

    def pixel_values(self, images) -> torch.Tensor:
        return self.processor.pixel_values(images)

    def tokenize(self, texts: list[str], device=None) -> dict:
        rows = [self.processor.tokenizer(t, add_special_tokens=False).input_ids[:MAX_TOKENS] or [0] for t in texts]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def align_contrastive(cfg: TrainConfig, resume: bool = False, stop_after: int | None = None) -> dict:
    """Contrastive alignment of a composed VLM (`cfg.model` a vlmkit model, or a new composition of
    `vision` + `llm`); returns the summary. `stop_after` stops with a checkpoint (tests)."""
    if cfg.projector_init in REPLY_INITS:
        raise VlmkitError(f"projector_init={cfg.projector_init} fits the projector to replies; stage=contrastive aligns "
                          "it from captions: leave projector_init unset")
    out, pairs, probe, choices = prepare(cfg, resume, stop_after)
    log(f"loading the model ({cfg.model or f'{cfg.vision} + {cfg.llm}'})")
    vlm, processor = for_training(cfg)
    if not isinstance(vlm, VlmkitForConditionalGeneration):
        raise VlmkitError(f"stage=contrastive aligns a composed vlmkit model; {cfg.model} is a pretrained "
                          f"{type(vlm).__name__}. Give vision= and llm= (or a vlmkit model)")
    groups = set_trainable(vlm, cfg)  # the projector (and the tower with train_vision); never the LM
    model = Aligner(vlm, cfg.loss, cfg.logit_bias)
    scale = [model.logit_scale] + ([model.logit_bias] if cfg.loss == "siglip" else [])
    groups.append({"params": scale, "lr": cfg.projector_lr, "name": "logit_scale"})
    for p in scale:
        p.requires_grad_(True)

    def save(folder: Path) -> None:
        vlm.requires_grad_(False)
        save_pretrained_atomic(vlm, processor, folder)

    run = Run(cfg, out, model, Captions(processor), groups, pairs, probe, save)
    examples = [SimpleNamespace(images=[p]) for p in dict.fromkeys(p.image for p in pairs)]
    run.images.warm([e.images[0] for e in examples], "caching image features")
    initialise_from_data(vlm, processor.tokenizer, cfg, examples, run.images, log)
    return run_contrastive(run, choices, resume, stop_after)
