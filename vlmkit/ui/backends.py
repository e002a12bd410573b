"""Where the UI's replies come from: a model loaded in this process, or any OpenAI-compatible server.

Both backends take the same thing, vlmkit chat messages (content = text/image parts) plus the images in
order of appearance, and yield the reply piece by piece. Only the local one can say what the model
receives (`sees`); behind an API the server does the processing.
"""

from __future__ import annotations

import base64
import io
import os
from dataclasses import dataclass
from pathlib import Path
from threading import Event
from typing import Iterator

from PIL import Image

from vlmkit.data.images import load_image
from vlmkit.errors import VlmkitError, first_line


@dataclass(frozen=True)
class Settings:
    """Generation settings, as the settings panel holds them. Temperature 0 is greedy decoding; above it
    the reply is sampled, reproducibly for a given `seed`."""

    system: str = ""
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0

    def __post_init__(self):
        if not 0 <= self.temperature <= 5:
            raise VlmkitError(f"temperature {self.temperature}: give a value from 0 (greedy) to 5")
        if not 0 < self.top_p <= 1:
            raise VlmkitError(f"top-p {self.top_p}: give a value above 0 and at most 1")
        if self.max_new_tokens < 1:
            raise VlmkitError(f"max new tokens {self.max_new_tokens}: give at least 1")

    @classmethod
    def of(cls, system, temperature, top_p, max_new_tokens, seed) -> "Settings":
        """From the panel's widgets (numbers may come as floats or None)."""
        return cls(
            system=(system or "").strip(),
            temperature=float(temperature or 0.0),
            top_p=float(top_p if top_p is not None else 1.0),
            max_new_tokens=int(max_new_tokens or 1),
            seed=int(seed or 0),
        )


class LocalBackend:
    """A model loaded with `vlmkit.load` (anything `vlmkit generate --model` accepts)."""

    local = True

    def __init__(self, vlm, name: str | None = None):
        self.vlm = vlm
        self.name = name or vlm.name or "model"

    @classmethod
    def load(cls, model: str, decode: str = "auto") -> "LocalBackend":
        from vlmkit.infer.load import load

        return cls(load(model, decode=decode), name=model)

    def stream(self, messages: list[dict], images: list, settings: Settings, stop: Event | None = None) -> Iterator[str]:
        import torch

        if settings.temperature > 0:
            torch.manual_seed(settings.seed)  # the generation thread draws from the global generator
        yield from self.vlm.engine.stream(
            messages, images, max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
            top_p=settings.top_p, stop=stop,
        )

    def sees(self, messages: list[dict], images: list):
        from vlmkit.ui.seen import what_the_model_sees

        return what_the_model_sees(self.vlm, messages, images)


class ApiBackend:
    """A model behind an OpenAI-compatible chat completions API (`vlmkit serve`, vLLM, llama.cpp, OpenAI),
    through the official `openai` client. Images travel inline as base64 data URLs."""

    local = False

    def __init__(self, base_url: str, api_key: str | None = None, model: str | None = None, timeout: float = 600.0):
        import openai

        self.base_url = base_url
        key = api_key or os.environ.get("OPENAI_API_KEY") or "none"  # local servers often want no key
        self.client = openai.OpenAI(base_url=base_url, api_key=key, timeout=timeout, max_retries=0)
        self.model = model or first_model(self.client, base_url)
        self.name = f"{self.model} at {base_url}"

    def stream(self, messages: list[dict], images: list, settings: Settings, stop: Event | None = None) -> Iterator[str]:
        import openai

        extra = {"seed": settings.seed, "top_p": settings.top_p} if settings.temperature > 0 else {}
        try:
            response = self.client.chat.completions.create(
                model=self.model, messages=openai_messages(messages, images), stream=True,
                max_tokens=settings.max_new_tokens, temperature=settings.temperature, **extra,
            )
            with response:  # closing it drops the connection, which tells the server to stop
                for chunk in response:
                    if stop is not None and stop.is_set():
                        break
                    if chunk.choices and chunk.choices[0].delta.content:
                        yield chunk.choices[0].delta.content
        except openai.OpenAIError as e:
            raise VlmkitError(f"the server at {self.base_url} failed: {first_line(e)}") from None

    def sees(self, messages: list[dict], images: list):
        return None


def first_model(client, base_url: str, flags: tuple[str, str] = ("--api-base", "--model")) -> str:
    """The first model an OpenAI-compatible server lists; `flags` name the URL's and the model's options in errors."""
    import openai

    try:
        models = list(client.models.list())
    except openai.OpenAIError as e:
        raise VlmkitError(
            f"{flags[0]} {base_url}: could not list the server's models ({first_line(e)}); check the URL "
            f"(it usually ends in /v1) and the key, or name the model with {flags[1]}"
        ) from None
    if not models:
        raise VlmkitError(f"{flags[0]} {base_url}: the server lists no models; name one with {flags[1]}")
    return models[0].id


def openai_messages(messages: list[dict], images: list) -> list[dict]:
    """vlmkit messages + their images -> OpenAI chat messages; each image part becomes an `image_url` part
    holding the image as a data URL, in place."""
    images = list(images)
    out = []
    for m in messages:
        if m["role"] != "user":  # system and assistant turns are plain text
            text = m["content"] if isinstance(m["content"], str) else "".join(p.get("text", "") for p in m["content"])
            out.append({"role": m["role"], "content": text})
            continue
        parts = []
        for p in [{"type": "text", "text": m["content"]}] if isinstance(m["content"], str) else m["content"]:
            if p["type"] == "image":
                parts.append({"type": "image_url", "image_url": {"url": data_url(images.pop(0))}})
            elif p.get("text"):
                parts.append({"type": "text", "text": p["text"]})
        out.append({"role": "user", "content": parts})
    return out


def data_url(image) -> str:
    """An image (path or PIL image) as a `data:` URL: a JPEG or PNG file's own bytes, anything else as PNG."""
    if isinstance(image, (str, os.PathLike)):
        raw = Path(image).read_bytes()
        with Image.open(io.BytesIO(raw)) as im:
            kind = (im.format or "").lower()
        if kind in ("jpeg", "png"):
            return f"data:image/{kind};base64," + base64.b64encode(raw).decode()
    buffer = io.BytesIO()
    load_image(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
