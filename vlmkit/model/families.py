"""Model families: what differs between VLMs once they are loaded, in one table.

Every model — vlmkit's own compositions and pretrained transformers VLMs (SmolVLM, Idefics3, Llava,
LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL, PaliGemma) — goes through the same engine. What the engine needs to
know about a family is small and lives here, looked up by the config's `model_type` (a registry, not
name sniffing): the task prompts that work well with it, whether its chat template accepts a system
turn, whether it has a chat template at all, and how it takes video (its own video processor, or
frames as images).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vlmkit.registry import Registry

CAPTION = "Describe this image in one or two sentences."
OCR = "Read all the text in this image. Reply with the text only, keeping its line breaks."


@dataclass(frozen=True)
class Family:
    name: str
    caption_prompt: str = CAPTION
    ocr_prompt: str = OCR
    ask_prompt: str = "{question}"  # how a question is put to the model
    chat_template: bool = True  # False: a plain-text prompt (PaliGemma)
    system_turn: bool = True  # False: a system message is prefixed to the first user text instead
    native_video: bool = False  # True: frames go to the processor's own video processor
    # processor(images=...) wants one list of images per prompt (SmolVLM, Idefics3) rather than a flat list
    nested_images: bool = False
    model_types: tuple[str, ...] = field(default=())


FAMILIES: Registry = Registry("model family")


def _register(family: Family) -> None:
    for model_type in family.model_types:
        FAMILIES.register(model_type, family)


_register(Family("vlmkit", model_types=("vlmkit",)))
_register(Family("smolvlm", native_video=True, nested_images=True, model_types=("smolvlm",)))
_register(Family("idefics3", nested_images=True, model_types=("idefics3",)))
_register(Family("llava", model_types=("llava",)))
_register(Family("llava-next", model_types=("llava_next",)))
_register(Family("qwen2-vl", native_video=True, model_types=("qwen2_vl", "qwen2_5_vl")))
_register(
    Family(
        "paligemma",
        caption_prompt="caption en",
        ocr_prompt="ocr",
        ask_prompt="answer en {question}",
        chat_template=False,
        system_turn=False,
        nested_images=True,
        model_types=("paligemma",),
    )
)
GENERIC = Family("generic")  # any other image-text-to-text model: its own chat template, flat images


def family_of(model_type: str) -> Family:
    return FAMILIES.get(model_type) if model_type in FAMILIES else GENERIC
