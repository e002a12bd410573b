"""The teacher that writes the replies: a model loaded here (anything `vlmkit generate --model` accepts) or
a model behind an OpenAI-compatible chat-completions API (`vlmkit serve`, vLLM, OpenAI).

Both take a list of `Request`s (one image, one prompt, a temperature and a seed) and return one reply
each, in order. The local teacher batches them through the generation engine; the API teacher sends
them concurrently (a batching server such as `vlmkit serve` decodes them together). Each says who it is
(`id`) and with which settings (`params`), which the manifest records beside every reply.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from vlmkit.data.messages import user_turn
from vlmkit.errors import VlmkitError, first_line
from vlmkit.model.families import CAPTION, OCR


@dataclass(frozen=True)
class Request:
    image: object  # a path or a decoded PIL image
    task: str  # caption / qa / ocr / propose
    prompt: str
    temperature: float = 0.0
    seed: int = 0
    sample: int = 0  # which of the prompt's samples


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 128
    top_p: float = 1.0


class LocalTeacher:
    """A model in this process (`vlmkit.load`): requests go through `Engine.generate` in batches. The
    built-in caption and OCR prompts and the QA questions are put in the model family's own words."""

    def __init__(self, vlm, name: str, sampling: Sampling = Sampling(), batch_size: int = 8):
        self.vlm, self.sampling, self.batch_size = vlm, sampling, batch_size
        self.id = name

    @classmethod
    def load(cls, model: str, sampling: Sampling = Sampling(), batch_size: int = 8, decode: str = "auto") -> "LocalTeacher":
        from vlmkit.infer.load import load

        return cls(load(model, decode=decode), model, sampling, batch_size)

    @property
    def params(self) -> dict:
        return {"kind": "local", "family": self.vlm.family.name, "max_new_tokens": self.sampling.max_new_tokens,
                "top_p": self.sampling.top_p}

    def text(self, request: Request) -> str:
        family = self.vlm.family
        if request.task == "qa":
            return family.ask_prompt.format(question=request.prompt)
        if request.task == "caption" and request.prompt == CAPTION:
            return family.caption_prompt
        if request.task == "ocr" and request.prompt == OCR:
            return family.ocr_prompt
        return request.prompt

    def reply(self, requests: list[Request]) -> list[str]:
        import torch

        replies: list[str | None] = [None] * len(requests)
        by_temperature: dict[float, list[int]] = {}
        for i, r in enumerate(requests):
            by_temperature.setdefault(r.temperature, []).append(i)
        for temperature, index in by_temperature.items():
            if temperature > 0:
                torch.manual_seed(requests[index[0]].seed)  # sampling draws from the global generator
            out = self.vlm.engine.generate(
                [user_turn(self.text(requests[i])) for i in index], [[requests[i].image] for i in index],
                max_new_tokens=self.sampling.max_new_tokens, temperature=temperature, top_p=self.sampling.top_p,
                batch_size=self.batch_size,
            )
            for i, text in zip(index, out):
                replies[i] = text
        return replies  # type: ignore[return-value]


class ApiTeacher:
    """A model behind an OpenAI-compatible API, through the `openai` client; the key comes from the
    environment variable `key_env` (none needed by a local `vlmkit serve` without --api-key)."""

    def __init__(self, base_url: str, model: str | None = None, key_env: str = "OPENAI_API_KEY",
                 sampling: Sampling = Sampling(), concurrency: int = 8, timeout: float = 600.0):
        try:
            import openai
        except ImportError:
            raise VlmkitError("--teacher-api needs the openai client: pip install openai (or 'vlmkit[ui]')") from None

        key = os.environ.get(key_env) or "none"
        self.base_url, self.sampling, self.concurrency = base_url, sampling, max(1, concurrency)
        self.client = openai.OpenAI(base_url=base_url, api_key=key, timeout=timeout, max_retries=2)
        from vlmkit.ui.backends import first_model

        self.model = model or first_model(self.client, base_url, ("--teacher-api", "--teacher-model"))
        self.id = f"{self.model} at {base_url}"

    @property
    def params(self) -> dict:
        return {"kind": "api", "max_new_tokens": self.sampling.max_new_tokens, "top_p": self.sampling.top_p}

    def _one(self, request: Request) -> str:
        import openai

        from vlmkit.ui.backends import data_url

        content = [{"type": "image_url", "image_url": {"url": data_url(request.image)}},
                   {"type": "text", "text": request.prompt}]
        extra = {"seed": request.seed, "top_p": self.sampling.top_p} if request.temperature > 0 else {}
        try:
            response = self.client.chat.completions.create(
                model=self.model, messages=[{"role": "user", "content": content}], max_tokens=self.sampling.max_new_tokens,
                temperature=request.temperature, **extra,
            )
        except openai.OpenAIError as e:
            raise VlmkitError(f"the teacher at {self.base_url} failed: {first_line(e)}") from None
        return (response.choices[0].message.content or "").strip()

    def reply(self, requests: list[Request]) -> list[str]:
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(self._one, requests))
