"""`vlmkit distill --scorer R`: image-text similarity of each reply with a retrieval dual encoder (one
`vlmkit train objective=contrastive` made), so that replies unrelated to their image can be dropped.

A caption or an OCR reply is scored as it is; a QA reply as the question and the answer together
("What colour is it? red"), since a bare answer ("red", "yes") says little about the image alone. The
score is the cosine of the two normalised embeddings, rounded to 4 decimals (the value recorded in the
manifest is the one compared with the threshold). Per batch of images, the images are embedded once and
all the batch's replies at once.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vlmkit.device import resolve_device
from vlmkit.errors import VlmkitError
from vlmkit.model.dual_encoder import load_dual_encoder, model_folder
from vlmkit.retrieval.encode import embed_images, embed_texts

MIN_SIMILARITY = 0.2  # an absolute cosine: what suits depends on the encoder (docs/distill.md)


def scored_text(task: str, prompt: str, reply: str) -> str | None:
    """What is compared with the image: the reply, or the question and the answer for QA; None for a
    blank reply (nothing to score; the `empty` filter drops it)."""
    if not reply.strip():
        return None
    return f"{prompt} {reply}" if task == "qa" else reply


class Scorer:
    """A dual encoder that scores (image, text) pairs; `id` (its folder) and `min_similarity` are part of a
    distillation's settings."""

    def __init__(self, path: str, min_similarity: float = MIN_SIMILARITY, device=None):
        if not -1 <= min_similarity <= 1:
            raise VlmkitError(f"--min-similarity {min_similarity}: give a cosine similarity from -1 to 1 (e.g. {MIN_SIMILARITY})")
        if not Path(path).expanduser().is_dir():
            raise VlmkitError(f"--scorer {path}: no such folder; give a dual encoder: the run folder of "
                              "`vlmkit train objective=contrastive` (or its model/ folder)")
        try:
            folder = model_folder(Path(path).expanduser())
            self.model, self.processor = load_dual_encoder(folder, resolve_device(device))
        except VlmkitError as e:
            raise VlmkitError(f"--scorer {e}") from None
        self.id = str(folder.resolve())
        self.min_similarity = float(min_similarity)

    def settings(self) -> dict:
        return {"scorer": self.id, "min_similarity": self.min_similarity}

    def similarities(self, images: list, pairs: list[tuple[int, str]]) -> list[float]:
        """Cosine similarity of each (index into `images` (PIL images), text), rounded to 4 decimals."""
        if not pairs:
            return []
        image_emb, _, _ = embed_images(self.model, self.processor, images)  # (M, E), normalised
        text_emb = embed_texts(self.model, self.processor, [text for _, text in pairs])  # (N, E), normalised
        which = torch.tensor([k for k, _ in pairs])
        cosine = (image_emb[which] * text_emb).sum(-1)  # (N,)
        return [round(float(c), 4) for c in cosine]
