"""The dual encoder: a vision tower and a text encoder, each with a projection head into one embedding space.

    image -> tower (any of vision.py's) -> mean over the grid (B, Dv) -> head -> L2-normalised (B, E)
    caption -> text encoder (text_encoder.py) -> mean over tokens (B, Dt) -> head -> L2-normalised (B, E)

A head is LayerNorm + Linear: the norm puts a frozen tower's features (EfficientNet's are ReLU6 outputs,
all positive) on one scale, so the heads train well at one learning rate. The logit scale (and SigLIP's
bias) are parameters here, trained with the heads; `loss` calls the pure functions of `contrastive.py`.
The pooled tower outputs (`image_features`, `text_features`) are what training caches while a tower is frozen.
A VLM can take a trained dual encoder's tower as its own (`vision=RUN`: `dual_encoder_vision`).

Saved as a folder (`save` / `load_dual_encoder`), loadable without the original parts:

    dual_encoder.json   {"kind": "dual_encoder", "vision": tower spec, "text": encoder spec, "embed_dim",
                         "loss", "vision_name", "text_name"}
    model.safetensors   every weight (towers, heads, logit_scale, logit_bias)
    image_processor/    the tower's image processor (transformers save_pretrained)
    tokenizer/          the text encoder's tokenizer
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.errors import VlmkitError, first_line
from vlmkit.io import atomic_write_folder
from vlmkit.model.contrastive import ScoredPairs, scale_and_bias
from vlmkit.model.text_encoder import TextEncoder, load_text_encoder, prepare_tokenizer, tokenize
from vlmkit.model.vision import build_vision_tower, load_vision

CONFIG_FILE = "dual_encoder.json"
WEIGHTS_FILE = "model.safetensors"


def head(inputs: int, outputs: int) -> nn.Module:
    return nn.Sequential(nn.LayerNorm(inputs), nn.Linear(inputs, outputs))


class DualProcessor:
    """Images -> pixel values with the tower's image processor; captions -> token ids with the tokenizer."""

    def __init__(self, image_processor, tokenizer):
        self.image_processor, self.tokenizer = image_processor, tokenizer
        prepare_tokenizer(tokenizer)

    def pixel_values(self, images) -> torch.Tensor:
        """A list of PIL images -> (N, 3, H, W)."""
        return self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]

    def tokenize(self, texts: list[str], device=None) -> dict:
        return tokenize(self.tokenizer, texts, device)

    def save_pretrained(self, folder: Path) -> None:
        self.image_processor.save_pretrained(folder / "image_processor")
        self.tokenizer.save_pretrained(folder / "tokenizer")


class DualEncoder(ScoredPairs, nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        self.config = dict(config)
        self.vision_tower = build_vision_tower(config["vision"])
        self.text_encoder = TextEncoder(config["text"])
        dim = config["embed_dim"]
        self.vision_head = head(self.vision_tower.hidden_size, dim)
        self.text_head = head(self.text_encoder.hidden_size, dim)
        self.logit_scale, self.logit_bias = scale_and_bias(config["loss"], config.get("logit_bias"))

    # -- the towers: what can be cached while they are frozen -------------------------------------------
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> the tower's grid mean-pooled (B, Dv)."""
        return self.vision_tower(pixel_values).mean(dim=(1, 2))

    encode_images = image_features  # the name train/features.ImageSource calls

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> mean-pooled hidden states (B, Dt)."""
        return self.text_encoder(input_ids, attention_mask)

    # -- the heads -------------------------------------------------------------------------------------
    def embed_images(self, pixel_values: torch.Tensor | None = None, features: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised image embeddings (B, E), from pixels or from cached pooled features."""
        if features is None:
            features = self.image_features(pixel_values)
        return F.normalize(self.vision_head(features.float()), dim=-1)

    def embed_texts(self, input_ids=None, attention_mask=None, features: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised caption embeddings (B, E), from token ids or from cached pooled features."""
        if features is None:
            features = self.text_features(input_ids, attention_mask)
        return F.normalize(self.text_head(features.float()), dim=-1)

    # -- saving ----------------------------------------------------------------------------------------
    def save(self, folder: str | Path, processor: DualProcessor) -> Path:
        from safetensors.torch import save_file

        def write(tmp: Path) -> None:
            state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
            save_file(state, str(tmp / WEIGHTS_FILE))
            (tmp / CONFIG_FILE).write_text(json.dumps({"kind": "dual_encoder", **self.config}, indent=2) + "\n")
            processor.save_pretrained(tmp)

        return atomic_write_folder(folder, write)


def create_dual_encoder(vision: str, text: str, embed_dim: int = 256, loss: str = "clip",
                        image_size: int | None = None, logit_bias: float | None = None) -> tuple[DualEncoder, DualProcessor]:
    """A new dual encoder from pretrained parts (by the names users give) and fresh heads."""
    vision_spec, tower, image_processor = load_vision(vision, image_size=image_size)
    text_spec, encoder, tokenizer = load_text_encoder(text)
    config = {"vision": vision_spec, "text": text_spec, "embed_dim": embed_dim, "loss": loss,
              "vision_name": vision, "text_name": text, "logit_bias": logit_bias}
    model = DualEncoder(config)
    model.vision_tower.load_state_dict(tower.state_dict())
    model.text_encoder.load_state_dict(encoder.state_dict())
    return model.eval(), DualProcessor(image_processor, tokenizer)


def is_dual_encoder(path: str | Path) -> bool:
    path = Path(path)
    return (path / CONFIG_FILE).is_file() or (path / "model" / CONFIG_FILE).is_file()


def model_folder(path: str | Path) -> Path:
    """The dual encoder's own folder: `path`, or `path/model` for a run folder."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file() and (path / "model" / CONFIG_FILE).is_file():
        path = path / "model"
    if not (path / CONFIG_FILE).is_file():
        raise VlmkitError(f"{path}: not a dual encoder (no {CONFIG_FILE}); give the folder `vlmkit train "
                          "objective=contrastive` wrote (its run folder or run/model)")
    return path


def tower_name(vision: str) -> str:
    """The name the tower of a dual encoder run was built from (what the VLM recipe decides by); other names as given."""
    if not is_dual_encoder(vision):
        return vision
    return json.loads((model_folder(vision) / CONFIG_FILE).read_text()).get("vision_name", vision)


def dual_encoder_vision(path: str | Path):
    """`vision=RUN`: (tower spec, the tower with the run's trained weights, its image processor)."""
    from safetensors.torch import load_file
    from transformers import AutoImageProcessor

    path = model_folder(path)
    config = json.loads((path / CONFIG_FILE).read_text())
    tower = build_vision_tower(config["vision"])
    state = load_file(str(path / WEIGHTS_FILE))
    prefix = "vision_tower."
    tower.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    return config["vision"], tower.eval(), AutoImageProcessor.from_pretrained(path / "image_processor")


def load_dual_encoder(path: str | Path, device="cpu") -> tuple[DualEncoder, DualProcessor]:
    """A saved dual encoder folder (or a run folder holding one in `model/`), in eval mode on `device`."""
    from safetensors.torch import load_file
    from transformers import AutoImageProcessor, AutoTokenizer

    path = model_folder(path)
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
        model = DualEncoder(config)
        model.load_state_dict(load_file(str(path / WEIGHTS_FILE)))
        processor = DualProcessor(AutoImageProcessor.from_pretrained(path / "image_processor"),
                                  AutoTokenizer.from_pretrained(path / "tokenizer"))
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise VlmkitError(f"{path}: cannot load the dual encoder ({first_line(e)[:160]}); re-save or retrain it") from None
    return model.to(device).eval(), processor
