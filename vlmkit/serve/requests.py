"""A chat-completions request body -> vlmkit messages, images and sampling settings, or a 400 naming the field.

OpenAI messages (`{"role", "content"}`, content a string or a list of `{"type": "text"}` and
`{"type": "image_url", "image_url": {"url"}}` parts) become vlmkit's messages
(`{"role", "content": [{"type": "text", "text"}, {"type": "image"}]}`) plus the images in order of
appearance, exactly what `Engine.generate` takes. The image count is checked before any image is
fetched; the images are then loaded under the server's `MediaPolicy`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from vlmkit.serve import media
from vlmkit.serve.errors import bad_request

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOPS = 4


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The body of POST /v1/chat/completions. Fields OpenAI defines that change nothing here (`user`,
    `metadata`, ...) are accepted and ignored; those that would change the reply are refused."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None


# Fields that would change the reply and that this server does not implement: refused, never ignored.
UNSUPPORTED = {
    "tools": "tool calling", "functions": "function calling", "tool_choice": "tool calling",
    "function_call": "function calling", "logprobs": "logprobs", "top_logprobs": "logprobs",
    "logit_bias": "logit_bias", "response_format": "response_format", "frequency_penalty": "frequency_penalty",
    "presence_penalty": "presence_penalty", "audio": "audio output", "prediction": "predicted outputs",
}


@dataclass
class Sampling:
    max_tokens: int | None  # None: the server's default, bounded by the context left
    temperature: float = 0.0  # 0 = greedy, as `vlmkit generate`
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    n: int = 1


@dataclass
class Chat:
    messages: list[dict]
    images: list[Image.Image]
    sampling: Sampling
    stream: bool = False
    include_usage: bool = False


def parse_chat(body: ChatCompletionRequest, policy: media.MediaPolicy, max_images: int, max_n: int) -> Chat:
    """The request as vlmkit's messages, loaded images and settings; `ApiError` (400) if anything is off."""
    extra = body.model_extra or {}
    for key, what in UNSUPPORTED.items():
        value = extra.get(key)
        if value not in (None, False, 0, {}, []) and not (key == "response_format" and value == {"type": "text"}):
            raise bad_request(f"{key}: {what} is not supported by this server", param=key, code="unsupported_parameter")
    if body.n > max_n:
        raise bad_request(f"n: at most {max_n} choices per request on this server (--max-batch)", param="n")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > MAX_STOPS or any(not s for s in stop):
        raise bad_request(f"stop: up to {MAX_STOPS} non-empty strings", param="stop")
    messages, refs = convert_messages(body.messages)
    if len(refs) > max_images:
        raise bad_request(
            f"messages: the conversation has {len(refs)} images; this server takes at most {max_images} per request (--max-images)",
            param="messages", code="too_many_images",
        )
    images = [media.load(url, policy, where) for url, where in refs]
    sampling = Sampling(
        max_tokens=body.max_completion_tokens or body.max_tokens,
        temperature=0.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        stop=stop, seed=body.seed, n=body.n,
    )
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return Chat(messages, images, sampling, stream=body.stream, include_usage=include_usage)


def convert_messages(raw: list[dict]) -> tuple[list[dict], list[tuple[str, str]]]:
    """(vlmkit messages, [(image url, where it is)]); nothing is fetched here."""
    messages, refs = [], []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        role = m.get("role")
        if role not in ROLES:
            raise bad_request(f"{where}.role: {role!r} is not one of system, developer, user, assistant", param=f"{where}.role")
        if role == "assistant" and (m.get("tool_calls") or m.get("function_call")):
            raise bad_request(f"{where}: tool calls are not supported by this server", param=where, code="unsupported_parameter")
        content = m.get("content")
        if isinstance(content, str):
            parts = [{"type": "text", "text": content}]
        elif isinstance(content, list):
            parts = [_part(p, f"{where}.content[{j}]", role, refs) for j, p in enumerate(content)]
        else:
            raise bad_request(f"{where}.content: must be a string or a list of content parts", param=f"{where}.content")
        messages.append({"role": ROLES[role], "content": parts})
    return messages, refs


def _part(p: Any, where: str, role: str, refs: list) -> dict:
    kind = p.get("type") if isinstance(p, dict) else None
    if kind == "text" and isinstance(p.get("text"), str):
        return {"type": "text", "text": p["text"]}
    if kind == "image_url":
        if role != "user":
            raise bad_request(f"{where}: images are taken in user messages only", param=where)
        image = p.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image
        if not isinstance(url, str) or not url:
            raise bad_request(f"{where}.image_url.url: give the image as a URL string", param=f"{where}.image_url.url")
        refs.append((url, where))
        return {"type": "image"}
    raise bad_request(
        f"{where}: a content part is {{\"type\": \"text\", \"text\": ...}} or {{\"type\": \"image_url\", \"image_url\": {{\"url\": ...}}}}",
        param=where,
    )


# -- the prompt's size against the model's context --------------------------------------------------
DEFAULT_MAX_TOKENS = 256  # when a request gives no max_tokens (and the context leaves room)


@dataclass
class Budget:
    prompt_tokens: int  # text + image tokens, as the model sees them
    image_tokens: int
    max_tokens: int  # the completion tokens this request may use


def context_length(model) -> int | None:
    """The model's context in tokens (its language model's position limit), or None when it names none."""
    config = model.config
    for cfg in (getattr(config, "text_config", None), config):
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            value = getattr(cfg, key, None) if cfg is not None else None
            if isinstance(value, int) and value > 0:
                return value
    return None


def image_token_ids(model, processor) -> set[int]:
    """The ids of the tokens that stand for image embeddings (the placeholders the processor expands)."""
    ids = {getattr(model.config, "image_token_id", None), getattr(model.config, "image_token_index", None),
           getattr(processor, "image_token_id", None)}
    token = getattr(processor, "image_token", None)
    if isinstance(token, str):
        ids.add(processor.tokenizer.convert_tokens_to_ids(token))
    return {i for i in ids if isinstance(i, int) and i >= 0 and i != processor.tokenizer.unk_token_id}


def budget(input_ids, image_ids: set[int], context: int | None, max_tokens: int | None) -> Budget:
    """Count the prompt's tokens (`input_ids`: the one prompt as the processor made it) and check that the
    prompt, and the prompt plus `max_tokens`, fit the context; a 400 giving the counts otherwise."""
    prompt = int(input_ids.numel())
    images = int(sum(int((input_ids == i).sum()) for i in image_ids))
    counts = f"{prompt} tokens ({prompt - images} text + {images} image)"
    if context is None:
        return Budget(prompt, images, max_tokens or DEFAULT_MAX_TOKENS)
    if prompt >= context:
        raise bad_request(
            f"messages: the prompt is {counts}, over the model's context of {context} tokens; "
            "shorten the conversation or send fewer images", param="messages", code="context_length_exceeded",
        )
    room = context - prompt
    if max_tokens is None:
        return Budget(prompt, images, min(DEFAULT_MAX_TOKENS, room))
    if max_tokens > room:
        raise bad_request(
            f"max_tokens: the prompt is {counts} and max_tokens is {max_tokens}, together over the model's "
            f"context of {context} tokens; ask for at most {room}", param="max_tokens", code="context_length_exceeded",
        )
    return Budget(prompt, images, max_tokens)
