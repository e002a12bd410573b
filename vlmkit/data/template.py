"""Training examples for pretrained VLMs: their own chat template and processor, exact loss masks.

A pretrained model's processor expands image tokens its own way (SmolVLM's tiles, Qwen2-VL's grids),
so the tokens of a conversation come from the processor, not from vlmkit's `render`. The loss mask is
still built turn by turn: for each assistant turn, the conversation up to that turn is rendered with the
generation prompt (everything the model sees before it answers) and again with the answer; the tokens
between the two lengths are the answer's. Each prefix must tokenize to a prefix of the whole
conversation — checked, never assumed.

Some templates are not token-aligned that way: one whose generation prompt ends with a space
("ASSISTANT: ", as LLaVA-1.5-style templates do) renders the prompt's last space as its own token, while
the whole conversation merges it into the answer's first word. For those, the example is what inference
sees (TRL's prompt-completion layout): the prompt rendered with the generation prompt, as the processor
tokenizes it, then the final answer's tokens; earlier answers are context, not trained.

PaliGemma has no chat template: its processor's own `suffix` argument builds the labels (one turn).
"""

from __future__ import annotations

import torch

from vlmkit.data.collate import Example
from vlmkit.data.images import load_image
from vlmkit.data.messages import chat_text, normalise_messages
from vlmkit.data.processor import IGNORE_INDEX
from vlmkit.errors import VlmkitError
from vlmkit.model.families import Family


class TemplateRenderer:
    """Conversation -> Example for one pretrained model's processor and family (see `collate.py`)."""

    caches_features = False  # the processor makes the model's image inputs

    def __init__(self, processor, family: Family):
        self.processor, self.family = processor, family

    def _text(self, messages: list[dict], generation_prompt: bool, where: str = "") -> str:
        return chat_text(self.processor, self.family, messages, generation_prompt, where)

    def _ids(self, text: str, images: list, suffix: str | None = None) -> dict:
        kwargs = {}
        if images:
            kwargs["images"] = [images] if self.family.nested_images else images
        if suffix is not None:
            kwargs["suffix"] = suffix
        return self.processor(text=[text], return_tensors="pt", **kwargs)

    def render(self, messages: list[dict], image_paths, where: str) -> Example:
        messages = normalise_messages(messages)
        images = [load_image(p) for p in image_paths]
        paths = tuple(str(p) for p in image_paths)
        if not self.family.chat_template:
            return self._render_plain(messages, images, paths, where)
        full_text = self._text(messages, False, where)
        ids = self._ids(full_text, images)["input_ids"][0].tolist()
        labels = [IGNORE_INDEX] * len(ids)
        for a, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            n_images = sum(1 for m in messages[:a] for p in m["content"] if p["type"] == "image")
            before = self._ids(self._text(messages[:a], True), images[:n_images])["input_ids"][0].tolist()
            through = self._ids(self._text(messages[: a + 1], False), images[:n_images])["input_ids"][0].tolist()
            if ids[: len(through)] != through or through[: len(before)] != before:
                return self._render_completion(messages, images, paths, where)
            labels[len(before) : len(through)] = through[len(before) :]
        return Example(ids, labels, paths, where, full_text)

    def _render_completion(self, messages: list[dict], images: list, paths: tuple, where: str) -> Example:
        """The prompt (through the final answer's generation prompt) as the processor tokenizes it, then the
        answer's own tokens: what the model sees when it generates that answer."""
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompt_text = self._text(messages[:last], True)
        answer_text = self._text(messages[: last + 1], False)
        if not answer_text.startswith(prompt_text):
            raise VlmkitError(
                f"{where}: the model's chat template renders the conversation so that its prompt is not a prefix of "
                "it, so the answer cannot be located; this template cannot be trained on"
            )
        prompt = self._ids(prompt_text, images)["input_ids"][0].tolist()
        answer = self.processor.tokenizer(answer_text[len(prompt_text) :], add_special_tokens=False)["input_ids"]
        return Example(prompt + answer, [IGNORE_INDEX] * len(prompt) + answer, paths, where, prompt_text,
                       completion=tuple(answer))

    def _render_plain(self, messages, images, paths, where) -> Example:
        roles = [m["role"] for m in messages if m["role"] != "system"]
        if roles != ["user", "assistant"]:
            raise VlmkitError(f"{where}: {self.family.name} models train on one user turn and one answer")
        user, answer = (" ".join(p["text"] for p in m["content"] if p["type"] == "text").strip() for m in messages[-2:])
        text = getattr(self.processor, "image_token", "<image>") * len(images) + user
        out = self._ids(text, images, suffix=answer)
        return Example(out["input_ids"][0].tolist(), out["labels"][0].tolist(), paths, where, text, answer)

    def cut(self, example: Example, max_length: int) -> tuple[Example | None, str]:
        """Never: cutting would break the processor's image structure."""
        return None, (
            f"{example.length} tokens with this model's processor, over max_length={max_length}; raise max_length, "
            "shorten the sample, or pass skip_too_long=true"
        )

    def collate(self, examples: list[Example], image_source=None) -> dict:
        """Right-padded model inputs from the processor, with the examples' labels laid over them (and
        completions appended, for templates that are not token-aligned). `image_source` is unused: the
        processor makes the image inputs."""
        processor = self.processor
        processor.tokenizer.padding_side = "right"
        images = [[load_image(p) for p in e.images] for e in examples]
        kwargs = {}
        if any(images):
            kwargs["images"] = images if self.family.nested_images else [i for group in images for i in group]
        if examples[0].suffix is not None:
            kwargs["suffix"] = [e.suffix for e in examples]
        batch = dict(processor(text=[e.text for e in examples], padding=True, return_tensors="pt", **kwargs))
        if any(e.completion for e in examples):
            batch = _append_completions(batch, examples, processor.tokenizer.pad_token_id)
        ids = batch["input_ids"]
        labels = torch.full_like(ids, IGNORE_INDEX)
        for row, e in enumerate(examples):
            if ids[row, : e.length].tolist() != e.input_ids:
                raise VlmkitError(f"{e.where}: the processor tokenized this sample differently in a batch; use batch_size=1")
            labels[row, : e.length] = torch.tensor(e.labels)
        batch["labels"] = labels
        return batch


def _append_completions(batch: dict, examples: list[Example], pad_id: int) -> dict:
    """Each row's completion ids after its prompt tokens; every (B, T) tensor widened to fit (attention
    1 over the completion, 0 for other per-token inputs such as token types)."""
    ids = batch["input_ids"]
    width = max(e.length for e in examples)
    out = dict(batch)
    for key, value in batch.items():
        if torch.is_tensor(value) and value.shape[:2] == ids.shape:
            fill = pad_id if key == "input_ids" else 0
            wide = torch.full((ids.shape[0], width, *value.shape[2:]), fill, dtype=value.dtype)
            for row, e in enumerate(examples):
                n_prompt = e.length - len(e.completion)
                wide[row, :n_prompt] = value[row, :n_prompt]
                if key == "input_ids":
                    wide[row, n_prompt : e.length] = torch.tensor(e.completion)
                elif key == "attention_mask":
                    wide[row, n_prompt : e.length] = 1
            out[key] = wide
    return out

