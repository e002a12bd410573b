"""Vision towers: any image encoder as a grid of feature vectors.

Every tower maps pixel values (B, 3, H, W) to a feature grid (B, h, w, D), whatever it is inside: a ViT's
patch tokens (the CLS and register tokens dropped) or a CNN's last feature map. The connector (pooling +
projector, in `vlm.py`) only ever sees that grid, so any tower works with any projector.

A tower is described by a small JSON-able `spec` saved in the model config, so a saved model rebuilds
its tower without downloading anything:
    {"kind": "efficientnet_lite0", "feature_layer": -1}  (-1: the head's 1280 channels; -2: the last block's 320;
                                                         -3 to -6: the blocks before it, 192)
    {"kind": "hf", "config": {...a transformers vision config...}, "feature_layer": -2}
    {"kind": "timm", "name": "resnet18"}
`load_vision(name)` turns what a user typed (a built-in name, a local folder, a hub id, `timm:NAME`, or a
dual encoder's run folder: its trained tower, `model/dual_encoder.py`) into
a spec, the tower with its pretrained weights, and the matching image processor
(`timm:NAME@FILE` takes timm's weights from a local file).
"""

from __future__ import annotations

import math
import os

import torch
from torch import nn

from vlmkit.errors import VlmkitError, first_line
from vlmkit.registry import Registry

VISION_TOWERS = Registry("vision tower kind")
BUILTIN_VISION = {"efficientnet-lite0", "efficientnet_lite0"}
BUILTIN_SIZE, BUILTIN_STRIDE = 224, 32  # the built-in CNN's default input size and its feature map's stride
BUILTIN_FEATURE_LAYER = -1  # the built-in CNN's head: its layer when none is asked for, and a spec without the key


class EfficientNetTower(nn.Module):
    """The bundled ImageNet EfficientNet-Lite0: a map at stride 32, of its head's 1280 channels
    (`feature_layer` -1, the default, and what a spec without the key means), of its last block's 320
    (-2: before the 1x1 head convolution, as a transformers tower's -2 is the layer before the last), or
    of one of the four blocks before that (-3 to -6, 192 channels)."""

    def __init__(self, spec: dict):
        super().__init__()
        from vlmkit.model.efficientnet_lite import HEAD_CHANNELS, OUT_CHANNELS, EfficientNetLite0

        self.net = EfficientNetLite0()
        self.layer = self.feature_layer(spec)
        self.hidden_size = HEAD_CHANNELS if self.layer == -1 else OUT_CHANNELS[len(OUT_CHANNELS) + 1 + self.layer]

    @staticmethod
    def feature_layer(spec: dict) -> int:
        """The layer `spec` reads: -1 (the head) to -2 - STRIDE32_BLOCKS + 1; any other is an error."""
        from vlmkit.model.efficientnet_lite import STRIDE32_BLOCKS

        layer = spec.get("feature_layer", BUILTIN_FEATURE_LAYER)
        deepest = -1 - STRIDE32_BLOCKS
        if not isinstance(layer, int) or not deepest <= layer <= -1:
            raise VlmkitError(f"vision_feature_layer={layer}: the built-in EfficientNet-Lite0 offers -1 (its head), "
                              f"-2 (its last block, before the head) or -3 to {deepest} (the blocks before that, at "
                              "the same stride)")
        return layer

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.net(pixel_values, layer=self.layer).permute(0, 2, 3, 1)  # (B, C, h, w) -> (B, h, w, C)


class HFTower(nn.Module):
    """A transformers vision model (CLIP, SigLIP, ViT, DINOv2...), built from its config."""

    def __init__(self, spec: dict):
        super().__init__()
        self.model, config = model_from_config(spec["config"])
        self.feature_layer = spec.get("feature_layer", -2)
        self.patch_size = config.patch_size
        self.hidden_size = config.hidden_size

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixel_values, output_hidden_states=True)
        tokens = out.hidden_states[self.feature_layer]  # (B, N, D), N may include CLS/register tokens
        h, w = pixel_values.shape[-2] // self.patch_size, pixel_values.shape[-1] // self.patch_size
        return tokens[:, -h * w :].reshape(tokens.shape[0], h, w, tokens.shape[-1])


def model_from_config(values: dict):
    """(a random transformers model, its config) from a config saved as a dict (with its `model_type`)."""
    from transformers import AutoConfig, AutoModel

    values = dict(values)
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    return AutoModel.from_config(config), config


class TimmTower(nn.Module):
    """A timm model: CNNs give a feature map, ViTs give tokens; both become a grid."""

    def __init__(self, spec: dict, pretrained: bool = False, weights_file: str | None = None):
        super().__init__()
        timm = _import_timm()
        overlay = {"file": weights_file} if weights_file else None
        try:
            self.model = timm.create_model(
                spec["name"], pretrained=pretrained, num_classes=0, pretrained_cfg_overlay=overlay
            )
        except RuntimeError as e:  # unknown model name
            raise VlmkitError(f"timm vision tower {spec['name']!r}: {first_line(e)}") from None
        except OSError as e:  # weights not downloadable (offline) or file unreadable
            raise VlmkitError(
                f"timm vision tower {spec['name']!r}: cannot get its pretrained weights ({first_line(e)[:100]}); "
                "offline, name a local weights file as timm:NAME@/path/weights.safetensors"
            ) from None
        self.hidden_size = self.model.num_features
        self.prefix_tokens = getattr(self.model, "num_prefix_tokens", 0)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        feats = self.model.forward_features(pixel_values)
        if feats.ndim == 4:  # CNN: (B, C, h, w)
            return feats.permute(0, 2, 3, 1)
        tokens = feats[:, self.prefix_tokens :]  # ViT: (B, N, D)
        side = math.isqrt(tokens.shape[1])
        return tokens.reshape(tokens.shape[0], side, side, tokens.shape[-1])


VISION_TOWERS.register("efficientnet_lite0", EfficientNetTower)
VISION_TOWERS.register("hf", HFTower)
VISION_TOWERS.register("timm", TimmTower)


def build_vision_tower(spec: dict) -> nn.Module:
    """A randomly initialised tower from its spec (weights come from the checkpoint)."""
    return VISION_TOWERS.get(spec["kind"])(spec)


def _import_timm():
    try:
        import timm
    except ImportError:
        raise VlmkitError("timm vision towers need the timm package: pip install 'vlmkit[timm]'") from None
    return timm


def fixed_size_processor(size: int, mean, std):
    """Resize to size x size, scale to 0-1, normalise: what CNN towers want."""
    from transformers import ViTImageProcessor

    return ViTImageProcessor(
        size={"height": size, "width": size}, image_mean=list(mean), image_std=list(std), do_resize=True
    )


def _hf_vision_config(name: str):
    """The vision part of a transformers config at `name` (a CLIP/SigLIP config holds a vision_config)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
        where = "a local folder without a readable config.json" if os.path.isdir(name) else "no such local folder"
        raise VlmkitError(
            f"unknown vision tower {name!r}: not a built-in name ({', '.join(sorted(BUILTIN_VISION))}), not "
            f"`timm:NAME`, {where}, and not loadable as a hub id ({first_line(e)[:120]})"
        ) from None
    return getattr(config, "vision_config", None) or config


def load_vision(name: str, image_size: int | None = None, feature_layer: int | None = None, pretrained: bool = True):
    """Resolve a user's vision name: returns (spec, tower with pretrained weights, image processor).
    `feature_layer`: which layer's features (None: the tower's default, -1 for the built-in CNN's head,
    -2 for a transformers tower, as LLaVA reads CLIP's second-to-last layer; a new VLM's composition asks
    the built-in CNN for -3, its block before its last: `vlmkit.recipe.choose_feature_layer`)."""
    if name in BUILTIN_VISION:
        from vlmkit.model.efficientnet_lite import IMAGE_MEAN, IMAGE_STD, load_efficientnet_lite0

        spec = {"kind": "efficientnet_lite0", "feature_layer": BUILTIN_FEATURE_LAYER if feature_layer is None else feature_layer}
        tower = EfficientNetTower(spec)
        if pretrained:
            tower.net = load_efficientnet_lite0()
        return spec, tower, fixed_size_processor(image_size or BUILTIN_SIZE, IMAGE_MEAN, IMAGE_STD)

    if name.startswith("timm:"):
        _own_features_only(name, feature_layer)
        model_name, _, weights_file = name[len("timm:") :].partition("@")
        spec = {"kind": "timm", "name": model_name}
        tower = TimmTower(spec, pretrained=pretrained, weights_file=weights_file or None)
        data_cfg = _import_timm().data.resolve_data_config({}, model=tower.model)
        size = image_size or data_cfg["input_size"][-1]
        return spec, tower, fixed_size_processor(size, data_cfg["mean"], data_cfg["std"])

    from vlmkit.model.dual_encoder import dual_encoder_vision, is_dual_encoder

    if is_dual_encoder(name):  # vision=RUN: the tower a contrastive run trained
        _own_features_only(name, feature_layer)
        spec, tower, processor = dual_encoder_vision(name)
        return spec, tower, resized(processor, image_size)

    from transformers import AutoImageProcessor

    vision_config = _hf_vision_config(name)
    config_dict = vision_config.to_dict()
    spec = {"kind": "hf", "config": config_dict, "feature_layer": -2 if feature_layer is None else feature_layer}
    tower = HFTower(spec)
    if pretrained:
        weights = type(tower.model).from_pretrained(name, config=vision_config)
        tower.model.load_state_dict(weights.state_dict())
    try:
        processor = AutoImageProcessor.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise VlmkitError(f"vision tower {name!r}: no image processor beside it ({first_line(e)})") from None
    return spec, tower, resized(processor, image_size)


def _own_features_only(name: str, feature_layer: int | None) -> None:
    if feature_layer is not None:
        raise VlmkitError(f"vision_feature_layer={feature_layer}: vision={name!r} gives its own features only (a timm "
                          "tower its last map, a contrastive run the layer it was trained on); leave the key unset")


def resized(processor, image_size: int | None):
    """The image processor set to resize (and crop) to image_size x image_size, when one is given."""
    if image_size is not None:
        processor.size = {"height": image_size, "width": image_size}
        if getattr(processor, "crop_size", None):
            processor.crop_size = {"height": image_size, "width": image_size}
    return processor
