"""Embedding images and captions with a dual encoder, in batches, with a progress bar.

`embed_images` either fails on the first unreadable image (evaluation: the data must be whole) or, with
`skip_bad`, leaves it out and returns why (indexing a folder of photos: one broken file must not stop it).
"""

from __future__ import annotations

import sys

import torch
from tqdm.auto import tqdm

from vlmkit.data.images import load_image
from vlmkit.errors import VlmkitError

BATCH = 32


def embed_texts(model, processor, texts: list[str], batch_size: int = BATCH, device=None, progress: bool = False) -> torch.Tensor:
    """Normalised caption embeddings (N, E) on the CPU."""
    device = device or next(model.parameters()).device
    for k, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise VlmkitError(f"text query {k + 1}: empty; give the words to search for")
    parts = []
    with torch.inference_mode():
        for s in tqdm(range(0, len(texts), batch_size), desc="embedding captions", unit="batch", file=sys.stderr,
                      disable=not progress):
            parts.append(model.embed_texts(**processor.tokenize(texts[s : s + batch_size], device)).float().cpu())
    return torch.cat(parts) if parts else torch.empty(0, model.config["embed_dim"])


def embed_images(model, processor, images: list, batch_size: int = BATCH, device=None, progress: bool = False,
                 skip_bad: bool = False) -> tuple[torch.Tensor, list[int], list[tuple[int, str]]]:
    """(normalised embeddings (M, E) on the CPU, indices of the embedded images, [(index, why)] skipped).

    `images` are paths or PIL images. Without `skip_bad` an unreadable image raises its `VlmkitError`."""
    device = device or next(model.parameters()).device
    parts, kept, bad = [], [], []
    with torch.inference_mode():
        for s in tqdm(range(0, len(images), batch_size), desc="embedding images", unit="batch", file=sys.stderr,
                      disable=not progress):
            loaded, where = [], []
            for k in range(s, min(s + batch_size, len(images))):
                try:
                    loaded.append(load_image(images[k]))
                except VlmkitError as e:
                    if not skip_bad:
                        raise
                    bad.append((k, str(e)))
                    continue
                where.append(k)
            if loaded:
                pixels = processor.pixel_values(loaded).to(device)
                parts.append(model.embed_images(pixels).float().cpu())
                kept += where
    emb = torch.cat(parts) if parts else torch.empty(0, model.config["embed_dim"])
    return emb, kept, bad
