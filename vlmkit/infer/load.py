"""`vlmkit.load(...)`: one object for any model folder, with generate / caption / ask / stream.

Today this loads vlmkit's own composed models (a folder written by `train`, `quickstart` or
`save_pretrained`); pretrained transformers VLMs plug in here through the same `VLM` interface.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from vlmkit.errors import VlmkitError

CAPTION_PROMPT = "Describe the image."


@dataclass
class VLM:
    model: object
    processor: object

    @property
    def engine(self):
        from vlmkit.infer.engine import Engine

        if not hasattr(self, "_engine"):
            self._engine = Engine(self.model, self.processor)
        return self._engine

    def generate(self, messages: list[dict], images: list | None = None, **kwargs) -> str:
        """Reply to one conversation (chat messages with {"type": "image"} parts; images in order)."""
        return self.engine.generate([messages], [images or []], **kwargs)[0]

    def stream(self, messages: list[dict], images: list | None = None, **kwargs) -> Iterator[str]:
        return self.engine.stream(messages, images, **kwargs)

    def ask(self, image, question: str, **kwargs) -> str:
        return self.generate(_user_turn(question, 1), [image], **kwargs)

    def caption(self, images: list, prompt: str = CAPTION_PROMPT, batch_size: int = 8, **kwargs) -> list[str]:
        conversations = [_user_turn(prompt, 1) for _ in images]
        return self.engine.generate(conversations, [[i] for i in images], batch_size=batch_size, **kwargs)


def _user_turn(text: str, n_images: int) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}]


def load(path: str, device: str | None = None, dtype: torch.dtype = torch.float32) -> VLM:
    """Load a model folder; the device defaults to CUDA when available."""
    from vlmkit.model.build import is_vlmkit_dir, load_model

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not Path(path).exists():
        raise VlmkitError(f"model {path!r} not found: give a folder written by `vlmkit train` or `vlmkit quickstart`")
    if is_vlmkit_dir(path):
        model, processor = load_model(path, dtype=dtype, device=device)
        return VLM(model, processor)
    raise VlmkitError(
        f"{path}: not a vlmkit model folder; give a folder written by `vlmkit train` or `vlmkit quickstart`"
    )
