"""Samples -> tokenized examples -> padded batches.

`tokenize_samples` renders every conversation once with the processor (ids + labels, images expanded)
and enforces the max length: a sample whose image tokens would be cut is an error naming its file and
line, or, with `skip_too_long`, dropped and counted. Text-only overflow past the last image is cut, and so
are untrained tokens at the end (the chat template's closing newline): under causal attention they cannot
change the loss, only the cost of a step.
`collate` right-pads ids with the pad token and labels with -100, and stacks either pixel values or
cached image features in order of appearance (the order the model's masked_scatter fills them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmkit.data.processor import IGNORE_INDEX
from vlmkit.data.schema import Sample
from vlmkit.errors import VlmkitError


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]
    images: tuple  # image paths, in order of appearance
    where: str

    @property
    def length(self) -> int:
        """Tokens in the batch row (what `group_by_length` sorts by)."""
        return len(self.input_ids)


def tokenize_samples(samples: list[Sample], processor, max_length: int, skip_too_long: bool = False):
    """Returns (examples, n_skipped)."""
    image_id = processor.image_token_id
    examples, skipped = [], 0
    for sample in samples:
        ids, labels = processor.render(sample.messages)
        if len(ids) > max_length:
            last_image = max((i for i, t in enumerate(ids) if t == image_id), default=-1)
            if last_image >= max_length:
                if skip_too_long:
                    skipped += 1
                    continue
                raise VlmkitError(
                    f"{sample.where}: {len(ids)} tokens, and max_length={max_length} would cut its image tokens; "
                    "raise max_length, shorten the conversation, or pass skip_too_long=true to skip such samples"
                )
            ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE_INDEX for label in labels):
            if skip_too_long:
                skipped += 1
                continue
            raise VlmkitError(f"{sample.where}: no assistant tokens left to train on within max_length={max_length}")
        end = 1 + max(i for i, t in enumerate(ids) if labels[i] != IGNORE_INDEX or t == image_id)
        ids, labels = ids[:end], labels[:end]
        examples.append(Example(ids, labels, tuple(str(p) for p in sample.images), sample.where))
    return examples, skipped


def collate(examples: list[Example], pad_id: int, image_source) -> dict:
    """Pad a list of examples; `image_source(paths)` gives pixel values or cached features for them."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    paths = [p for e in examples for p in e.images]
    if paths:
        batch.update(image_source(paths))
    return batch
