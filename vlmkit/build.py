"""The one place a model and its processor are made together: (model, processor) for every source.

- `compose`: a new VLM from a vision tower and a language model (`vlmkit.model.vision`, `.llm`), a fresh
  projector and vlmkit's processor;
- `load`: a saved vlmkit model, a LoRA adapter run of a pretrained VLM, or a pretrained VLM (folder or
  hub id), for inference;
- `for_training`: what `vlmkit train` starts from, per its config (QLoRA loads the LM in 4 bit);
- `sample_renderer`: a dataset sample rendered as training would tokenize it, with no weights loaded.

This layer sits above `model` and `data` (it joins the two) and below `train` and `infer`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vlmkit.config import TrainConfig
from vlmkit.data.check import SampleRenderer
from vlmkit.data.processor import IMAGE_TOKEN, TURN_END, VlmkitProcessor, ensure_special_tokens, grid_column_words
from vlmkit.data.template import TemplateRenderer
from vlmkit.device import resolve_device, training_precision
from vlmkit.errors import VlmkitError, first_line
from vlmkit.model.adapter import is_adapter_dir, load_adapter
from vlmkit.model.families import family_of
from vlmkit.model.llm import DEFAULT_LLM, add_token_rows, llm_source, load_llm
from vlmkit.model.pretrained import load_pretrained, model_type_of, read_config
from vlmkit.model.projector import grid_side
from vlmkit.model.vision import load_vision
from vlmkit.model.vlm import VlmkitConfig, VlmkitForConditionalGeneration, is_vlmkit_dir
from vlmkit.recipe import choose_layout

DEFAULTS = TrainConfig()  # the one source of default model settings


def compose(
    vision: str = DEFAULTS.vision,
    llm: str = DEFAULTS.llm,
    projector: str = DEFAULTS.projector,
    image_tokens: int | None = DEFAULTS.image_tokens,
    image_size: int | None = DEFAULTS.image_size,
    pixel_shuffle_factor: int = 2,
    vision_feature_layer: int | None = DEFAULTS.vision_feature_layer,
    norm_image_embeds: bool = DEFAULTS.norm_image_embeds,
    image_positions: bool | None = DEFAULTS.image_positions,
    column_words: bool | None = DEFAULTS.column_words,
    seed: int = DEFAULTS.seed,
):
    """A new VLM from pretrained parts and a fresh projector: returns (model, processor). The defaults
    are `TrainConfig`'s, so `compose()` builds what `vlmkit train` builds.

    `image_tokens` / `image_size` left at None are chosen as `vlmkit train` chooses them (vlmkit/recipe.py).
    `column_words`: each image is laid out column by column, each column after the LM's word for it
    (" left", " right"; " left", " middle", " right" for a 3x3 grid), as SmolVLM's processor writes
    `<row_1_col_1>` before each tile, but in words the LM already knows."""
    layout = {c.key: c.value for c in choose_layout(vision, image_size, image_tokens, image_positions, column_words,
                                                    vision_feature_layer)}
    vision_feature_layer = layout.get("vision_feature_layer", vision_feature_layer)
    image_size = layout.get("image_size", image_size)
    image_tokens = layout.get("image_tokens", image_tokens)
    image_positions = layout.get("image_positions", image_positions)
    column_words = layout.get("column_words", column_words)
    spec, tower, image_processor = load_vision(vision, image_size=image_size, feature_layer=vision_feature_layer)
    lm, tokenizer = load_llm(llm)
    if ensure_special_tokens(tokenizer):
        add_token_rows(lm, len(tokenizer))
    text_norm = lm.get_input_embeddings().weight.detach().norm(dim=-1).mean().item()
    config = VlmkitConfig(
        vision=spec,
        image_embed_norm=round(text_norm, 4) if norm_image_embeds else 0.0,
        text_config=lm.config,
        projector=projector,
        image_tokens=image_tokens,
        image_positions=image_positions,
        image_column_major=column_words,
        pixel_shuffle_factor=pixel_shuffle_factor,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_hidden_size=tower.hidden_size,
        eos_token_id=tokenizer.convert_tokens_to_ids(TURN_END),
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)  # the projector's initialisation
    model = VlmkitForConditionalGeneration(config)
    model.vision_tower.load_state_dict(tower.state_dict())
    model.language_model.load_state_dict(lm.state_dict())
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    model.eval()
    words = grid_column_words(grid_side(image_tokens)) if column_words else None
    processor = VlmkitProcessor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_len=image_tokens, column_words=words
    )
    return model, processor


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """A saved vlmkit model folder -> (model, processor)."""
    path = Path(path)
    if not path.exists():
        raise VlmkitError(f"model {str(path)!r} not found: give a folder written by `vlmkit train` or `vlmkit quickstart`")
    if not is_vlmkit_dir(path):
        raise VlmkitError(f"{path}: not a vlmkit model folder (no config.json with model_type 'vlmkit')")
    model = VlmkitForConditionalGeneration.from_pretrained(path, dtype=dtype).to(device).eval()
    processor = VlmkitProcessor.from_pretrained(path)
    return model, processor


def model_folder(name: str | Path) -> str:
    """A run folder (it holds `train_summary.json`) names its `model/`; anything else is itself."""
    return str(Path(name) / "model") if (Path(name) / "train_summary.json").is_file() else str(name)


def load(name: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
    """(model, processor) for inference from a vlmkit model or run folder, a LoRA adapter run of a
    pretrained VLM (merged on load), or a pretrained VLM's folder or hub id; on CUDA when available."""
    name = model_folder(name)
    device = resolve_device(device)
    if is_vlmkit_dir(name):
        return load_model(name, dtype=dtype or torch.float32, device=device)
    if is_adapter_dir(name):
        return load_adapter(name, device=device, dtype=dtype)
    return load_pretrained(name, dtype=dtype, device=device)


def for_training(cfg: TrainConfig):
    """(model, processor) that `vlmkit train` starts from: `cfg.model` (a vlmkit run, an adapter run merged
    into its base, a pretrained VLM, in 4 bit for QLoRA), else a new composition of `cfg`'s parts."""
    if not cfg.model:
        model, processor = compose(
            vision=cfg.vision, llm=cfg.llm, projector=cfg.projector, image_tokens=cfg.image_tokens,
            image_size=cfg.image_size, norm_image_embeds=cfg.norm_image_embeds, image_positions=cfg.image_positions,
            column_words=cfg.column_words, vision_feature_layer=cfg.vision_feature_layer, seed=cfg.seed,
        )
        if cfg.method == "qlora":  # the new LM's linear layers in 4-bit NF4
            from vlmkit.model.quantize import quantize_language_model_4bit, require_qlora

            device = resolve_device()
            require_qlora(device)
            quantize_language_model_4bit(model.to(device), training_precision(cfg.precision, device).dtype)
        return model, processor
    name = model_folder(cfg.model)
    if is_vlmkit_dir(name):
        return load_model(name)
    if is_adapter_dir(name):  # continue from a LoRA run: its adapter merged into the base
        return load_adapter(name)
    if cfg.method == "qlora":  # the LM's linear layers in 4-bit NF4 as they load
        from vlmkit.model.quantize import load_pretrained_4bit

        device = resolve_device()
        return load_pretrained_4bit(name, device, compute_dtype=training_precision(cfg.precision, device).dtype)
    return load_pretrained(name, dtype=torch.float32)


def sample_renderer(model: str | None = None) -> SampleRenderer:
    """How `vlmkit train` would tokenize a sample, with no weights loaded: a vlmkit model folder's
    processor, a pretrained VLM's processor and chat template, or (no model) the default composition's
    tokenizer."""
    if model is None:
        processor = default_processor()
        return SampleRenderer.composed(
            processor, f"the default tokenizer ({DEFAULT_LLM}, {processor.image_seq_len} tokens per image)"
        )
    name = model_folder(model)
    if is_vlmkit_dir(name):
        return SampleRenderer.composed(VlmkitProcessor.from_pretrained(name), f"the processor of {model}")
    from transformers import AutoProcessor

    family = family_of(model_type_of(name))
    try:
        processor = AutoProcessor.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise VlmkitError(f"--model {model}: cannot load its processor ({first_line(e)})") from None
    config = read_config(name)
    return SampleRenderer.template(
        TemplateRenderer(processor, family),
        image_id=getattr(config, "image_token_id", None) or getattr(config, "image_token_index", None),
        per_image=getattr(processor, "image_seq_len", None) or getattr(processor, "image_seq_length", None),
        source=f"the processor and chat template of {model} ({family.name})",
    )


def default_processor() -> VlmkitProcessor:
    """The processor `compose()` builds with the default parts, from the tokenizer alone (no weights)."""
    from transformers import AutoTokenizer

    from vlmkit.model.efficientnet_lite import IMAGE_MEAN, IMAGE_STD
    from vlmkit.model.vision import fixed_size_processor

    path, kwargs = llm_source(DEFAULT_LLM)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise VlmkitError(
            f"default tokenizer ({DEFAULT_LLM}): could not load ({first_line(e)}); pass --model FOLDER or --no-sample"
        ) from None
    ensure_special_tokens(tokenizer)
    # never used to render text; the default tower's, for completeness
    layout = {c.key: c.value for c in choose_layout(DEFAULTS.vision, None, None, None, None)}
    tokens = layout["image_tokens"]
    image_processor = fixed_size_processor(layout["image_size"] or 224, IMAGE_MEAN, IMAGE_STD)
    words = grid_column_words(grid_side(tokens)) if layout["column_words"] else None
    return VlmkitProcessor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=tokens, column_words=words)
