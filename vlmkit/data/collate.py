"""Samples -> tokenized examples -> padded batches, for either kind of model, through one interface.

A renderer turns a conversation into an `Example` (ids + labels, -100 where nothing is trained), cuts
one that is too long when it can, and pads a list of examples into the model's batch:
- `ComposedRenderer` (here): vlmkit's own processor, which renders token by token; images enter the
  batch as pixel values or, while the tower is frozen, as cached features (`caches_features`);
- `vlmkit.data.template.TemplateRenderer`: a pretrained model's processor and chat template.
`renderer_for` picks one from the processor, once; nothing downstream asks which it has.

`tokenize` enforces the max length: a sample that cannot be cut (its image tokens, or a pretrained
processor's image structure, would be) is an error naming its file and line, or, with `skip_too_long`,
dropped and counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmkit.data.processor import IGNORE_INDEX, VlmkitProcessor
from vlmkit.data.schema import Sample
from vlmkit.errors import VlmkitError


NOTHING_TRAINED = "no assistant tokens to train on"  # `fit`'s reason for a sample no length can fix


@dataclass(frozen=True)
class Example:
    """One tokenized conversation."""

    input_ids: list[int]
    labels: list[int]
    images: tuple  # image paths, in order of appearance
    where: str  # file:line, for errors
    text: str | None = None  # pretrained processors: the rendered conversation they tokenize in a batch
    suffix: str | None = None  # PaliGemma: the answer, given to the processor as `suffix`
    completion: tuple = ()  # templates that are not token-aligned: the answer's ids, appended after `text`'s
    reply_start: int = 0  # train_prompt: labels before this index are the first question's, not a reply's

    @property
    def length(self) -> int:
        """Tokens in the batch row (what `group_by_length` sorts by)."""
        return len(self.input_ids)

    @property
    def trains_nothing(self) -> bool:
        """No reply token is trained (a question's words alone do not make a sample)."""
        return all(label == IGNORE_INDEX for label in self.labels[self.reply_start :])


class ComposedRenderer:
    """vlmkit's processor: `VlmkitProcessor.render`, right padding, images from an image source."""

    caches_features = True  # the model takes pooled tower features in place of pixels

    def __init__(self, processor: VlmkitProcessor, train_prompt: bool = False):
        self.processor, self.train_prompt = processor, train_prompt
        self.pad_id = processor.tokenizer.pad_token_id

    def render(self, messages: list[dict], images, where: str) -> Example:
        """Untrained tokens after the last trained or image token (the template's closing newline) are
        dropped: under causal attention they cannot change the loss, only the cost of a step."""
        ids, labels = self.processor.render(messages)
        reply_start = 0
        if self.train_prompt:
            reply_start = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
            ids, labels = self.processor.render(messages, train_prompt=True)
        image_id = self.processor.image_token_id
        keep = [i for i, t in enumerate(ids) if labels[i] != IGNORE_INDEX or t == image_id]
        end = 1 + keep[-1] if keep else len(ids)
        return Example(ids[:end], labels[:end], tuple(str(p) for p in images), where, reply_start=reply_start)

    def cut(self, example: Example, max_length: int) -> tuple[Example | None, str]:
        """Text past the last image token may be cut; image tokens may not."""
        ids = example.input_ids
        last_image = max((i for i, t in enumerate(ids) if t == self.processor.image_token_id), default=-1)
        if last_image >= max_length:
            return None, (
                f"{len(ids)} tokens, and max_length={max_length} would cut its image tokens; raise max_length, shorten "
                "the conversation, or pass skip_too_long=true to skip such samples"
            )
        cut = Example(ids[:max_length], example.labels[:max_length], example.images, example.where,
                      reply_start=example.reply_start)
        return cut, ""

    def collate(self, examples: list[Example], image_source) -> dict:
        """Right-pad ids with the pad token and labels with -100; `image_source(paths)` gives pixel values
        or cached features for every image, in order of appearance (the order the model fills them)."""
        width = max(e.length for e in examples)
        ids = torch.full((len(examples), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for row, e in enumerate(examples):
            ids[row, : e.length] = torch.tensor(e.input_ids)
            labels[row, : e.length] = torch.tensor(e.labels)
            mask[row, : e.length] = 1
        batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        paths = [p for e in examples for p in e.images]
        if paths:
            batch.update(image_source(paths))
        return batch


def renderer_for(processor, model_type: str, train_prompt: bool = False):
    """The renderer for a model's processor: vlmkit's own, or the pretrained model's chat template (which
    trains the replies only: `train_prompt` is refused there by the config)."""
    if isinstance(processor, VlmkitProcessor):
        return ComposedRenderer(processor, train_prompt)
    from vlmkit.data.template import TemplateRenderer
    from vlmkit.model.families import family_of

    return TemplateRenderer(processor, family_of(model_type))


def fit(renderer, example: Example, max_length: int) -> tuple[Example | None, str]:
    """`example` within `max_length` (cut by the renderer's rule), or (None, why it cannot be)."""
    if example.trains_nothing:
        return None, NOTHING_TRAINED
    if example.length > max_length:
        example, why = renderer.cut(example, max_length)
        if example is None:
            return None, why
        if example.trains_nothing:
            return None, f"no assistant tokens left to train on within max_length={max_length}"
    return example, ""


def tokenize(samples: list[Sample], renderer, max_length: int, skip_too_long: bool = False) -> tuple[list[Example], int]:
    """(examples, n_skipped): every sample rendered once and fitted to `max_length`."""
    import sys

    from tqdm.auto import tqdm

    examples, skipped = [], 0
    for sample in tqdm(samples, desc="tokenizing", unit="sample", file=sys.stderr, disable=len(samples) < 500):
        example, why = fit(renderer, renderer.render(sample.messages, list(sample.images), sample.where), max_length)
        if example is None:
            if skip_too_long and why != NOTHING_TRAINED:  # a data problem, not a length: never skipped
                skipped += 1
                continue
            raise VlmkitError(f"{sample.where}: {why}")
        examples.append(example)
    return examples, skipped
