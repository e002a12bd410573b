"""Device and training precision, resolved once per run and passed down explicitly.

`precision=auto` picks per device, from measurements (docs/precision.md):
- CUDA: bf16 autocast where the GPU supports it (every recent NVIDIA GPU), as is standard.
- CPU: fp32, also on CPUs with native bf16 units (AVX512-BF16, AMX). There bf16 autocast made the
  quickstart's held-out accuracy lower over seeds, and its steps 1.34x faster on an AMD EPYC with
  AVX512-BF16 but no faster on an Intel Xeon with AMX (docs/precision.md has the figures); on CPUs
  without those units bf16 is emulated and slower than fp32. `precision=bf16` still asks for it.

`VLMKIT_CPU_BF16=1` / `=0` overrides what the CPU is detected to have (tests force either path with it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from vlmkit.errors import VlmkitError

CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


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


def cpu_has_bf16() -> bool:
    """Native bf16 units on this CPU; `VLMKIT_CPU_BF16=1|0` overrides the detection."""
    forced = os.environ.get("VLMKIT_CPU_BF16")
    if forced is not None:
        if forced not in ("0", "1"):
            raise VlmkitError(f"VLMKIT_CPU_BF16={forced!r}: set it to 1 (the CPU has bf16 units) or 0 (it has none)")
        return forced == "1"
    return bool(cpu_bf16_flags())


@dataclass(frozen=True)
class Precision:
    """What a run computes in: bf16 autocast or fp32, and why (printed in the run's log and summary)."""

    bf16: bool
    reason: str

    @property
    def name(self) -> str:
        return "bf16" if self.bf16 else "fp32"

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float32


def training_precision(precision: str, device: torch.device) -> Precision:
    """Resolve the `precision` key (auto | fp32 | bf16) for `device`."""
    if precision != "auto":
        return Precision(precision == "bf16", f"precision={precision} was asked for")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Precision(True, "auto: this GPU supports bf16")
        return Precision(False, "auto: this GPU has no bf16 support")
    if cpu_has_bf16():
        return Precision(False, "auto: on CPU fp32 even with bf16 units (bf16 was less accurate, and faster on some such CPUs only: docs/precision.md)")
    return Precision(False, "auto: this CPU has no bf16 units (bf16 would be emulated, slower than fp32)")
