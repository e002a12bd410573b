"""`vlmkit.load(...)`: one object for any model, with generate / ask / caption / ocr / stream.

A model is a folder written by `vlmkit train` or `quickstart` (vlmkit's own composition), or any
pretrained transformers VLM by hub id or local folder (SmolVLM, Idefics3, Llava, LLaVA-NeXT, Qwen2-VL,
PaliGemma...). Both come back as the same `VLM`, so everything downstream treats them alike; task
prompts come from the model's family (`vlmkit.model.families`) and can be overridden.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch

from vlmkit.data.messages import user_turn
from vlmkit.model.families import Family, family_of


@dataclass
class VLM:
    model: object
    processor: object
    family: Family = field(default=None)  # type: ignore[assignment]
    name: str = ""
    decode: str = "auto"  # the engine's decode path (vlmkit.infer.engine.DECODE_CHOICES)

    def __post_init__(self):
        if self.family is None:
            self.family = family_of(getattr(self.model.config, "model_type", ""))

    @property
    def engine(self):
        from vlmkit.infer.engine import Engine

        if not hasattr(self, "_engine"):
            self._engine = Engine(self.model, self.processor, family=self.family, decode=self.decode)
        return self._engine

    def generate(self, messages: list[dict], images: list | None = None, **kwargs) -> str:
        """Reply to one conversation (chat messages with image/video parts; `images` = their media in order)."""
        return self.engine.generate([messages], [images or []], **kwargs)[0]

    def stream(self, messages: list[dict], images: list | None = None, **kwargs) -> Iterator[str]:
        """The reply to one conversation, piece by piece as it is generated."""
        return self.engine.stream(messages, images, **kwargs)

    def ask(self, image, question: str, **kwargs) -> str:
        return self.generate(user_turn(self.family.ask_prompt.format(question=question), 1), [image], **kwargs)

    def caption(self, images: list, prompt: str | None = None, batch_size: int = 8, **kwargs) -> list[str]:
        return self._each(images, prompt or self.family.caption_prompt, batch_size, **kwargs)

    def ocr(self, images: list, prompt: str | None = None, batch_size: int = 8, **kwargs) -> list[str]:
        kwargs.setdefault("max_new_tokens", 512)
        return self._each(images, prompt or self.family.ocr_prompt, batch_size, **kwargs)

    def _each(self, images: list, prompt: str, batch_size: int, **kwargs) -> list[str]:
        conversations = [user_turn(prompt, 1) for _ in images]
        return self.engine.generate(conversations, [[i] for i in images], batch_size=batch_size, **kwargs)


def load(name: str, device: str | None = None, dtype: torch.dtype | None = None, decode: str = "auto") -> VLM:
    """Load a model by folder (a vlmkit run, a LoRA adapter run, a transformers VLM) or hub id; the device
    defaults to CUDA when available. `decode`: how replies are decoded (`auto`, `transformers`, or a
    precision of vlmkit's decoder: `fp32`, `bf16`, `int8`; docs/decode.md)."""
    from vlmkit.build import load as build, model_folder
    from vlmkit.infer.engine import check_decode

    check_decode(decode)  # before the model loads
    model, processor = build(name, device=device, dtype=dtype)
    return VLM(model, processor, name=model_folder(name), decode=decode)
