"""Device and training precision, resolved once per run and passed down explicitly.

`precision=auto` picks per device, from measurements (docs/precision.md):
- CUDA: bf16 autocast where the GPU supports it (every recent NVIDIA GPU), as is standard.
- CPU with bf16 units (AMX, or AVX512-BF16 alone): `bf16-frozen`, fp32 but the frozen weights' products in
  bf16 (vlmkit.model.frozen_bf16): its steps were 1.3x faster than fp32 on an Intel Xeon with AMX, 1.5x on an
  AMD EPYC with AVX512-BF16, with the quickstart's held-out accuracy kept; bf16 autocast was no faster on the
  first and less accurate on the second.
- CPUs without bf16 units: fp32 (bf16 is emulated there, slower than fp32). `precision=int8-frozen` multiplies
  the frozen weights in int8 instead (vlmkit.model.frozen_int8, fbgemm's x86 kernels), 1.2-1.5x the steps of
  fp32 in the same minutes on an AMD EPYC with AVX2 alone, but at equal steps its gradients learned less: the
  quickstart's three seeds scored 0.10-0.21 lower after 800 steps, so it is not `auto`'s pick.
  `precision=bf16` or `fp32` still asks for either. docs/precision.md has the figures.

`VLMKIT_CPU_BF16=amx` / `=1` / `=0` overrides what the CPU is detected to have (tests force each path with it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from vlmkit.errors import VlmkitError

CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# each kind of bf16 units: its name, and how much faster bf16-frozen's quickstart steps were than fp32's (docs/precision.md)
BF16_UNITS = {"amx": ("AMX", "1.3x"), "avx512": ("AVX512-BF16", "1.5x")}


def resolve_device(device: str | None = None) -> torch.device:
    """`device` as given, else the GPU when there is one, else the CPU."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def cpu_bf16_flags() -> list[str]:
    """The CPU's bf16 instruction sets found in /proc/cpuinfo (empty where there are none or no such file)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return []
    return [f for f in CPU_BF16_FLAGS if f in flags]


def cpu_bf16_units() -> str:
    """This CPU's native bf16 units: `amx` (AMX tiles, whose products of bf16 matrices run several times
    faster than fp32 ones), `avx512` (AVX512-BF16 alone) or `none`. `VLMKIT_CPU_BF16=amx|1|0` overrides the
    detection (1: bf16 units without AMX)."""
    forced = os.environ.get("VLMKIT_CPU_BF16")
    if forced is not None:
        if forced not in ("0", "1", "amx"):
            raise VlmkitError(f"VLMKIT_CPU_BF16={forced!r}: set it to amx (the CPU has AMX), 1 (bf16 units without AMX) "
                              "or 0 (none)")
        return {"0": "none", "1": "avx512", "amx": "amx"}[forced]
    flags = cpu_bf16_flags()
    return "amx" if "amx_bf16" in flags else "avx512" if flags else "none"


def cpu_has_bf16() -> bool:
    """Native bf16 units on this CPU (AVX512-BF16 or AMX); `VLMKIT_CPU_BF16` overrides the detection."""
    return cpu_bf16_units() != "none"


def cpu_int8_products() -> bool:
    """Whether this torch build has fbgemm's int8 kernels for CPUs (x86 builds do), which `int8-frozen` uses."""
    return "fbgemm" in torch.backends.quantized.supported_engines


@dataclass(frozen=True)
class Precision:
    """What a run computes in: bf16 autocast, fp32, or fp32 with the frozen weights' products in bf16 or int8,
    and why (printed in the run's log and summary)."""

    bf16: bool
    reason: str
    frozen_bf16: bool = False  # fp32, but the frozen weights' products in bf16 (vlmkit.model.frozen_bf16)
    frozen_int8: bool = False  # fp32, but the frozen weights' products in int8 (vlmkit.model.frozen_int8)

    @property
    def name(self) -> str:
        return "bf16" if self.bf16 else "bf16-frozen" if self.frozen_bf16 else "int8-frozen" if self.frozen_int8 else "fp32"

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float32


def training_precision(precision: str, device: torch.device) -> Precision:
    """Resolve the `precision` key (auto | fp32 | bf16 | bf16-frozen | int8-frozen) for `device`."""
    if precision == "int8-frozen" and (device.type != "cpu" or not cpu_int8_products()):
        where = "this torch build has no fbgemm int8 kernels" if device.type == "cpu" else f"it runs on the CPU, not {device}"
        raise VlmkitError(f"precision=int8-frozen: {where}; set precision=auto")
    if precision != "auto":
        return Precision(precision == "bf16", f"precision={precision} was asked for", precision == "bf16-frozen",
                         precision == "int8-frozen")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Precision(True, "auto: this GPU supports bf16")
        return Precision(False, "auto: this GPU has no bf16 support")
    units = cpu_bf16_units()
    if units in BF16_UNITS:
        name, speedup = BF16_UNITS[units]
        return Precision(False, f"auto: this CPU has {name}: the frozen weights' products in bf16, the rest in fp32 "
                         f"({speedup} faster steps than fp32: docs/precision.md)", frozen_bf16=True)
    return Precision(False, "auto: this CPU has no bf16 units (bf16 would be emulated, slower than fp32; int8-frozen's "
                     "faster steps learned less: docs/precision.md)")
