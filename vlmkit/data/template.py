"""Training examples for pretrained VLMs: their own chat template and processor, exact loss masks.

A pretrained model's processor expands image tokens its own way (SmolVLM's tiles, Qwen2-VL's grids),
so the tokens of a conversation come from the processor, not from vlmkit's `render`. The loss mask is
still built turn by turn: for each assistant turn, the conversation up to that turn is rendered with the
generation prompt (everything the model sees before it answers) and again with the answer; the tokens
between the two lengths are the answer's. Each prefix must tokenize to a prefix of the whole
conversation — checked, so a template for which that fails is an error, never a silently wrong mask.

PaliGemma has no chat template: its processor's own `suffix` argument builds the labels (one turn).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmkit.data.images import load_image
from vlmkit.data.processor import IGNORE_INDEX
from vlmkit.errors import VlmkitError
from vlmkit.infer.families import Family, fold_system, normalise_messages


@dataclass(frozen=True)
class TemplateExample:
    input_ids: list[int]
    labels: list[int]
    images: tuple  # image paths, in order of appearance
    where: str
    text: str  # the rendered conversation the processor tokenizes
    suffix: str | None = None  # PaliGemma: the answer, given to the processor as `suffix`

    @property
    def length(self) -> int:
        return len(self.input_ids)


class TemplateRenderer:
    """Conversation -> TemplateExample for one pretrained model's processor and family."""

    def __init__(self, processor, family: Family):
        self.processor, self.family = processor, family

    def _text(self, messages: list[dict], generation_prompt: bool) -> str:
        if not self.family.system_turn:
            messages = fold_system(messages)
        return self.processor.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)

    def _ids(self, text: str, images: list, suffix: str | None = None) -> dict:
        kwargs = {}
        if images:
            kwargs["images"] = [images] if self.family.nested_images else images
        if suffix is not None:
            kwargs["suffix"] = suffix
        return self.processor(text=[text], return_tensors="pt", **kwargs)

    def render(self, messages: list[dict], image_paths: list, where: str) -> TemplateExample:
        messages = normalise_messages(messages)
        images = [load_image(p) for p in image_paths]
        if not self.family.chat_template:
            return self._render_plain(messages, images, image_paths, where)
        full_text = self._text(messages, False)
        ids = self._ids(full_text, images)["input_ids"][0].tolist()
        labels = [IGNORE_INDEX] * len(ids)
        for a, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            n_images = sum(1 for m in messages[:a] for p in m["content"] if p["type"] == "image")
            before = self._ids(self._text(messages[:a], True), images[:n_images])["input_ids"][0].tolist()
            through = self._ids(self._text(messages[: a + 1], False), images[:n_images])["input_ids"][0].tolist()
            if ids[: len(through)] != through or through[: len(before)] != before:
                raise VlmkitError(
                    f"{where}: the model's chat template does not render turn {a + 1} as a prefix of the whole "
                    "conversation, so its answer tokens cannot be located; train on single-turn samples"
                )
            labels[len(before) : len(through)] = through[len(before) :]
        return TemplateExample(ids, labels, tuple(str(p) for p in image_paths), where, full_text)

    def _render_plain(self, messages, images, image_paths, where) -> TemplateExample:
        roles = [m["role"] for m in messages if m["role"] != "system"]
        if roles != ["user", "assistant"]:
            raise VlmkitError(f"{where}: {self.family.name} models train on one user turn and one answer")
        user, answer = (" ".join(p["text"] for p in m["content"] if p["type"] == "text").strip() for m in messages[-2:])
        text = getattr(self.processor, "image_token", "<image>") * len(images) + user
        out = self._ids(text, images, suffix=answer)
        return TemplateExample(
            out["input_ids"][0].tolist(), out["labels"][0].tolist(), tuple(str(p) for p in image_paths), where, text, answer
        )


def tokenize_with_template(samples, processor, family: Family, max_length: int, skip_too_long: bool = False):
    """(examples, n_skipped): like `collate.tokenize_samples`, through the model's own processor."""
    from tqdm.auto import tqdm
    import sys

    renderer = TemplateRenderer(processor, family)
    examples, skipped = [], 0
    for sample in tqdm(samples, desc="tokenizing", unit="sample", file=sys.stderr, disable=len(samples) < 50):
        example = renderer.render(sample.messages, list(sample.images), sample.where)
        if len(example.input_ids) > max_length:  # cutting would break the processor's image structure
            if skip_too_long:
                skipped += 1
                continue
            raise VlmkitError(
                f"{sample.where}: {len(example.input_ids)} tokens with this model's processor, over max_length="
                f"{max_length}; raise max_length, shorten the sample, or pass skip_too_long=true"
            )
        if all(label == IGNORE_INDEX for label in example.labels):
            raise VlmkitError(f"{sample.where}: no assistant tokens to train on")
        examples.append(example)
    return examples, skipped


def collate_with_template(examples: list[TemplateExample], processor, family: Family) -> dict:
    """Right-padded model inputs from the processor, with the examples' labels laid over them."""
    processor.tokenizer.padding_side = "right"
    images = [[load_image(p) for p in e.images] for e in examples]
    kwargs = {}
    if any(images):
        kwargs["images"] = images if family.nested_images else [i for group in images for i in group]
    if examples[0].suffix is not None:
        kwargs["suffix"] = [e.suffix for e in examples]
    batch = dict(processor(text=[e.text for e in examples], padding=True, return_tensors="pt", **kwargs))
    ids = batch["input_ids"]
    labels = torch.full_like(ids, IGNORE_INDEX)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        if ids[row, :n].tolist() != e.input_ids:
            raise VlmkitError(f"{e.where}: the processor tokenized this sample differently in a batch; use batch_size=1")
        labels[row, :n] = torch.tensor(e.labels)
    batch["labels"] = labels
    return batch
