"""What the model sees: the last turn's conversation as the processor hands it to the model.

For each image, the pictures the processor made of it (resized, cropped, tiled; its pixel values turned
back into pixels) and the number of image tokens it costs; for the whole prompt, its tokens against the
model's context. Everything is measured by running the model's own processor, as `vlmkit inspect` does,
so the panel cannot drift from what generation receives.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from vlmkit.data.images import load_image
from vlmkit.data.messages import user_turn

MAX_VIEWS = 16  # pictures shown per image (a tiled image can have more)


@dataclass
class SeenImage:
    size: tuple[int, int]  # (width, height) as uploaded
    tokens: int  # image tokens this image costs in the prompt
    views: list[Image.Image] = field(default_factory=list)  # what the processor made of it
    note: str = ""

    def caption(self, k: int) -> str:
        w, h = self.views[0].size if self.views else self.size
        tiles = f", {len(self.views)} views" if len(self.views) > 1 else ""
        return f"image {k}: {self.size[0]}x{self.size[1]} -> {w}x{h}{tiles}, {self.tokens} tokens"


@dataclass
class Seen:
    images: list[SeenImage]
    prompt_tokens: int  # the whole prompt, image tokens included
    image_tokens: int
    context: int | None  # the model's context length, when its config says
    prompt: str  # the prompt text before image tokens are expanded

    def summary(self) -> str:
        """Markdown: the numbers a person checks first."""
        n = len(self.images)
        lines = [f"**{n} image{'s' if n != 1 else ''}** in the conversation, in order."]
        context = f" of the model's {self.context:,}-token context" if self.context else ""
        share = f" ({100 * self.prompt_tokens / self.context:.0f}%)" if self.context else ""
        lines.append(f"**Prompt: {self.prompt_tokens:,} tokens**{context}{share}, {self.image_tokens:,} of them image tokens.")
        for k, image in enumerate(self.images, start=1):
            note = f" ({image.note})" if image.note else ""
            lines.append(f"- {image.caption(k)}{note}")
        return "\n".join(lines)

    def gallery(self) -> list[tuple[Image.Image, str]]:
        """(picture, caption) for every view of every image; small views are enlarged pixel for pixel, so
        the browser shows the processor's pixels rather than a blur of them."""
        out = []
        for k, image in enumerate(self.images, start=1):
            for v, view in enumerate(image.views, start=1):
                which = f" view {v}/{len(image.views)}" if len(image.views) > 1 else ""
                out.append((_enlarged(view), f"image {k}{which}: {view.width}x{view.height}, {image.tokens} tokens"))
        return out


def _enlarged(view: Image.Image, side: int = 256) -> Image.Image:
    factor = side // max(view.size)
    return view.resize((view.width * factor, view.height * factor), Image.NEAREST) if factor > 1 else view


def what_the_model_sees(vlm, messages: list[dict], images: list) -> Seen:
    """Run the processor on the conversation (and on each image alone) and report what it produced."""
    engine = vlm.engine
    prepared, loaded, _ = engine.prepare(messages, images)
    prompt = engine.prompt(prepared)
    ids = engine.inputs([messages], [images])["input_ids"][0].tolist()
    token = image_token_id(vlm)
    seen = [_one_image(vlm, picture, token) for picture in loaded]
    return Seen(
        images=seen,
        prompt_tokens=len(ids),
        image_tokens=sum(1 for i in ids if i == token),
        context=context_length(vlm.model, vlm.processor),
        prompt=prompt,
    )


def _one_image(vlm, picture: Image.Image, token: int | None) -> SeenImage:
    """The processor's output for a prompt holding this image alone: its views and its token count."""
    inputs = vlm.engine.inputs([user_turn("", 1)], [[picture]])
    ids = inputs["input_ids"][0].tolist()
    views, note = processed_views(inputs, vlm.processor.image_processor, picture)
    return SeenImage(size=picture.size, tokens=sum(1 for i in ids if i == token), views=views, note=note)


def image_token_id(vlm) -> int | None:
    config = vlm.model.config
    for key in ("image_token_id", "image_token_index"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    name = getattr(vlm.processor, "image_token", None)
    return vlm.processor.tokenizer.convert_tokens_to_ids(name) if name else None


def processed_views(inputs: dict, image_processor, picture: Image.Image) -> tuple[list[Image.Image], str]:
    """The pixel values of one image turned back into pictures: (views, note).

    (N, 3, H, W) and (1, N, 3, H, W) are views (a resized image, or tiles and a global view); processors
    that pack patches into rows (Qwen2-VL) give a grid instead, shown as the image resized to it."""
    pixels = inputs.get("pixel_values")
    grid = inputs.get("image_grid_thw")
    if grid is not None:
        _, h, w = (int(x) for x in grid[0])
        patch = int(getattr(image_processor, "patch_size", 14) or 14)
        size = (w * patch, h * patch)
        return [load_image(picture).resize(size)], f"packed into a {h}x{w} grid of {patch}px patches"
    if not torch.is_tensor(pixels):
        return [], "no pixel values to show"
    pixels = pixels.detach().float().cpu()
    if pixels.ndim == 5:  # (B, N, 3, H, W)
        pixels = pixels[0]
    if pixels.ndim != 4 or pixels.shape[1] not in (1, 3):
        return [], f"pixel values of shape {tuple(pixels.shape)}"
    views = [_to_picture(view, image_processor) for view in pixels[:MAX_VIEWS]]
    views = [v for v in views if v is not None]  # padding views (all zeros) are dropped
    more = f"; the first {MAX_VIEWS} of {pixels.shape[0]} shown" if pixels.shape[0] > MAX_VIEWS else ""
    return views, more.lstrip("; ")


def _to_picture(view: torch.Tensor, image_processor) -> Image.Image | None:
    """(3, H, W) normalised pixel values -> the RGB picture they encode."""
    if not view.any():
        return None
    mean = getattr(image_processor, "image_mean", None)
    std = getattr(image_processor, "image_std", None)
    array = view.numpy()
    if getattr(image_processor, "do_normalize", True) and mean is not None and std is not None:
        array = array * np.asarray(std, dtype=np.float32)[:, None, None] + np.asarray(mean, dtype=np.float32)[:, None, None]
        array = array * 255.0 if getattr(image_processor, "do_rescale", True) else array
    else:  # unknown scaling: stretch to the full range
        array = (array - array.min()) / max(float(array.max() - array.min()), 1e-6) * 255.0
    array = np.clip(np.rint(array), 0, 255).astype(np.uint8).transpose(1, 2, 0)
    if array.shape[2] == 1:
        array = array[:, :, 0]
    return Image.fromarray(array).convert("RGB")


def context_length(model, processor) -> int | None:
    """The most tokens the language model takes, from its config (or the tokenizer's limit)."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for source in (text, config):
        for key in ("max_position_embeddings", "n_positions", "seq_length"):
            value = getattr(source, key, None)
            if isinstance(value, int) and value > 0:
                return value
    limit = getattr(processor.tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and limit < 10**7 else None
