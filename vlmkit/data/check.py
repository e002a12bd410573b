"""`vlmkit data check`: validate a dataset in one pass, then show exactly what one sample trains on.

Every row is parsed and every image decoded (`read_samples(..., check_images=True)`); every problem is
printed, one line each with file and line, followed by a summary. A clean dataset then has its first
sample rendered by the processor, with the trained tokens (label != -100) marked, so a wrong loss mask
is seen before a GPU-hour is spent on it. Only a tokenizer is loaded, never model weights.
"""

from __future__ import annotations

import sys
from typing import TextIO

from vlmkit.data.processor import IGNORE_INDEX
from vlmkit.data.schema import read_samples
from vlmkit.errors import VlmkitError
from vlmkit.model.build import DEFAULT_LLM

DEFAULT_IMAGE_SEQ_LEN = 9  # the default composition's tokens per image (`compose(image_tokens=9)`)

# ANSI colours for a terminal; [[...]] brackets otherwise (e.g. piped to a file or a test)
_GREEN, _CYAN, _RESET = "\033[32m", "\033[36m", "\033[0m"


def check(path, model: str | None = None, show: bool = True, out: TextIO | None = None) -> bool:
    """Print every problem in the dataset at `path` and a summary; True if there are none.

    With `show`, a clean dataset's first sample is rendered with `model`'s processor (a vlmkit model
    folder), or with the default language model's tokenizer when no model is given.
    """
    out = out or sys.stdout
    samples, problems = read_samples(path, check_images=True)
    for problem in problems:
        print(problem, file=out)
    n_images = len({image for s in samples for image in s.images})
    print(f"{len(samples)} samples, {n_images} images, {len(problems)} problems", file=out)
    if problems:
        return False
    if show and samples:
        sample = samples[0]
        if model is not None and not _is_vlmkit(model):  # a pretrained VLM: its own processor and template
            ids, labels, tokenizer, image_id, per_image, source = _render_pretrained(model, sample)
        else:
            processor, source = load_processor(model)
            ids, labels = processor.render(sample.messages)
            tokenizer, image_id, per_image = processor.tokenizer, processor.image_token_id, processor.image_seq_len
        colour = out.isatty() if hasattr(out, "isatty") else False
        print(f"\nsample {sample.where}, rendered with {source}", file=out)
        print("trained tokens " + ("in green" if colour else "in [[...]]") + ":\n", file=out)
        print(mark_trained(ids, labels, tokenizer, image_id, per_image, colour=colour).rstrip("\n"), file=out)
        n_trained = sum(label != IGNORE_INDEX for label in labels)
        n_image = sum(t == image_id for t in ids)
        print(f"\n{len(ids)} tokens, {n_trained} trained, {n_image} image tokens", file=out)
    return True


def _is_vlmkit(model: str) -> bool:
    from vlmkit.model.build import is_vlmkit_dir

    return is_vlmkit_dir(model)


def _render_pretrained(model: str, sample):
    """(ids, labels, tokenizer, image token id, tokens per image or None, description): the sample as
    `vlmkit train model=MODEL` would tokenize it (no weights loaded)."""
    from transformers import AutoConfig, AutoProcessor

    from vlmkit.data.template import TemplateRenderer
    from vlmkit.infer.families import family_of
    from vlmkit.model.pretrained import model_type_of

    model_type = model_type_of(model)
    try:
        processor = AutoProcessor.from_pretrained(model)
    except (OSError, ValueError) as e:
        raise VlmkitError(f"--model {model}: cannot load its processor ({str(e).splitlines()[0]})") from None
    config = AutoConfig.from_pretrained(model)
    family = family_of(model_type)
    example = TemplateRenderer(processor, family).render(sample.messages, list(sample.images), sample.where)
    image_id = getattr(config, "image_token_id", None) or getattr(config, "image_token_index", None)
    per_image = getattr(processor, "image_seq_len", None) or getattr(processor, "image_seq_length", None)
    source = f"the processor and chat template of {model} ({family.name})"
    return example.input_ids, example.labels, processor.tokenizer, image_id, per_image, source


def load_processor(model: str | None = None):
    """(processor, description): a model folder's processor, or the default LM's tokenizer. No weights."""
    from vlmkit.data.processor import VlmkitProcessor

    if model is not None:
        from vlmkit.model.build import is_vlmkit_dir

        if not is_vlmkit_dir(model):
            raise VlmkitError(f"--model {model}: not a vlmkit model folder (no config.json with model_type 'vlmkit')")
        return VlmkitProcessor.from_pretrained(model), f"the processor of {model}"
    return _default_processor(), f"the default tokenizer ({DEFAULT_LLM}, {DEFAULT_IMAGE_SEQ_LEN} tokens per image)"


def _default_processor():
    """The processor `compose()` would build with the default parts, from the tokenizer alone."""
    from transformers import AutoTokenizer

    from vlmkit.data.processor import VlmkitProcessor, ensure_special_tokens
    from vlmkit.model.build import llm_source
    from vlmkit.model.efficientnet_lite import IMAGE_MEAN, IMAGE_STD
    from vlmkit.model.vision import _fixed_size_processor

    path, kwargs = llm_source(DEFAULT_LLM)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise VlmkitError(
            f"default tokenizer ({DEFAULT_LLM}): could not load ({str(e).splitlines()[0]}); "
            "pass --model FOLDER or --no-sample"
        ) from None
    ensure_special_tokens(tokenizer)
    # The image processor is never used to render text; it is the default tower's, for completeness.
    image_processor = _fixed_size_processor(224, IMAGE_MEAN, IMAGE_STD)
    return VlmkitProcessor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=DEFAULT_IMAGE_SEQ_LEN)


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
