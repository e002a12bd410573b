"""Image inputs for training: pixel values, or pooled tower features cached once per image.

While the vision tower is frozen its pooled features are computed once per image and reused every
epoch: on CPU that removes the tower from the step entirely.
"""

from __future__ import annotations

import sys

import torch
from tqdm.auto import tqdm

from vlmkit.data.images import load_image


class ImageSource:
    """Pixel values for a list of image paths, or cached pooled features when the tower is frozen."""

    def __init__(self, model, processor, device, cache: bool, batch_size: int = 32):
        self.model, self.processor, self.device = model, processor, device
        self.cache: dict[str, torch.Tensor] | None = {} if cache else None
        self.batch_size = batch_size

    def warm(self, paths: list[str], desc: str) -> None:
        """Encode every image once (progress bar); a no-op without caching."""
        if self.cache is None:
            return
        todo = [p for p in dict.fromkeys(paths) if p not in self.cache]
        with torch.inference_mode():
            for i in tqdm(range(0, len(todo), self.batch_size), desc=desc, unit="batch", file=sys.stderr):
                chunk = todo[i : i + self.batch_size]
                pixels = self.processor.pixel_values([load_image(p) for p in chunk]).to(self.device)
                feats = self.model.encode_images(pixels).float().cpu()
                self.cache.update(zip(chunk, feats))

    def __call__(self, paths: list[str]) -> dict:
        if self.cache is not None:
            missing = [p for p in paths if p not in self.cache]
            if missing:
                self.warm(missing, "encoding images")
            return {"image_features": torch.stack([self.cache[p] for p in paths]).to(self.device)}
        pixels = self.processor.pixel_values([load_image(p) for p in paths])
        return {"pixel_values": pixels.to(self.device)}


def features_for(model, images: ImageSource, paths: list[str], chunk: int = 256) -> torch.Tensor:
    """Pooled tower features (N, g, g, D) for `paths`: from the cache, or through the tower."""
    parts = []
    with torch.no_grad():
        for k in range(0, len(paths), chunk):
            batch = images(paths[k : k + chunk])
            features = batch.get("image_features")
            parts.append(model.encode_images(batch["pixel_values"]) if features is None else features)
    return torch.cat(parts).float()
