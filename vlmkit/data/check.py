"""`vlmkit data check`: validate a dataset in one pass, then show exactly what one sample trains on.

Every row is parsed and every image decoded (`read_samples(..., check_images=True)`); every problem is
printed, one line each with file and line, followed by a summary. A clean dataset then has its first
sample rendered as training tokenizes it (a `SampleRenderer`, which `vlmkit.build.sample_renderer`
makes for a model, with no weights loaded), with the trained tokens (label != -100) marked, so a wrong
loss mask is seen before a GPU-hour is spent on it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, TextIO

from vlmkit.data.processor import IGNORE_INDEX
from vlmkit.data.schema import Sample, read_samples

# ANSI colours for a terminal; [[...]] brackets otherwise (e.g. piped to a file or a test)
_GREEN, _CYAN, _RESET = "\033[32m", "\033[36m", "\033[0m"


@dataclass(frozen=True)
class SampleRenderer:
    """A sample -> (input_ids, labels) as training makes them, with what is needed to show them."""

    render: Callable[[Sample], tuple[list[int], list[int]]]
    tokenizer: object
    image_id: int | None
    per_image: int | None  # tokens per image, when fixed
    source: str  # "the processor of ...", for the report

    @classmethod
    def composed(cls, processor, source: str) -> "SampleRenderer":
        """vlmkit's own processor (`VlmkitProcessor.render`)."""
        return cls(lambda s: processor.render(s.messages), processor.tokenizer, processor.image_token_id,
                   processor.image_seq_len, source)

    @classmethod
    def template(cls, renderer, image_id: int | None, per_image: int | None, source: str) -> "SampleRenderer":
        """A pretrained model's processor and chat template (`vlmkit.data.template.TemplateRenderer`)."""

        def render(sample: Sample) -> tuple[list[int], list[int]]:
            example = renderer.render(sample.messages, list(sample.images), sample.where)
            return example.input_ids, example.labels

        return cls(render, renderer.processor.tokenizer, image_id, per_image, source)


def check(path, renderer: Callable[[], SampleRenderer] | None = None, out: TextIO | None = None) -> bool:
    """Print every problem in the dataset at `path` and a summary; True if there are none.

    With `renderer` (called only once the data is clean, as it may load a tokenizer), the first sample is
    shown as it trains.
    """
    out = out or sys.stdout
    samples, problems = read_samples(path, check_images=True)
    for problem in problems:
        print(problem, file=out)
    n_images = len({image for s in samples for image in s.images})
    print(f"{len(samples)} samples, {n_images} images, {len(problems)} problems", file=out)
    if problems:
        return False
    if renderer is not None and samples:
        sample, r = samples[0], renderer()
        ids, labels = r.render(sample)
        colour = out.isatty() if hasattr(out, "isatty") else False
        print(f"\nsample {sample.where}, rendered with {r.source}", file=out)
        print("trained tokens " + ("in green" if colour else "in [[...]]") + ":\n", file=out)
        print(mark_trained(ids, labels, r.tokenizer, r.image_id, r.per_image, colour=colour).rstrip("\n"), file=out)
        n_trained = sum(label != IGNORE_INDEX for label in labels)
        n_image = sum(t == r.image_id for t in ids)
        print(f"\n{len(ids)} tokens, {n_trained} trained, {n_image} image tokens", file=out)
    return True


def mark_trained(ids: list[int], labels: list[int], tokenizer, image_id: int | None, per_image: int | None = None,
                 colour: bool = False) -> str:
    """Decode `ids` with trained spans marked and each run of image tokens collapsed to `<image xN>`
    (one marker per image when `per_image` tokens make an image)."""
    pieces: list[str] = []
    run: list[int] = []
    run_kind: tuple[bool, bool] | None = None  # (is image, is trained)

    def flush() -> None:
        if not run:
            return
        is_image, trained = run_kind
        if is_image:
            # back-to-back images make one run; show one marker per image
            size = per_image if per_image and len(run) % per_image == 0 else len(run)
            text = f"<image x{size}>" * (len(run) // size)
            pieces.append(f"{_CYAN}{text}{_RESET}" if colour else text)
        else:
            text = tokenizer.decode(run, skip_special_tokens=False)
            if trained:
                text = f"{_GREEN}{text}{_RESET}" if colour else f"[[{text}]]"
            pieces.append(text)

    for token, label in zip(ids, labels):
        kind = (token == image_id, label != IGNORE_INDEX)
        if kind != run_kind:
            flush()
            run, run_kind = [], kind
        run.append(token)
    flush()
    return "".join(pieces)
