"""Pretrained transformers VLMs (SmolVLM, Idefics3, Llava, LLaVA-NeXT, Qwen2-VL, PaliGemma, ...).

A hub id or a local folder -> (model, processor), loaded with the Auto classes and the model's own
processor and chat template, so vlmkit runs them exactly as transformers would. What differs between
families after loading lives in `vlmkit.model.families`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from vlmkit.errors import VlmkitError, first_line


def is_local(name: str) -> bool:
    return Path(name).expanduser().exists()


def read_config(name: str):
    """The transformers config of a folder or hub id (reads only config.json)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name)
    except OSError as e:
        raise VlmkitError(_not_found(name, e)) from None
    except ValueError as e:  # an unknown model_type, or a config without one
        raise VlmkitError(f"{name}: transformers {_version()} cannot read its config.json ({first_line(e)})") from None


def model_type_of(name: str) -> str:
    return read_config(name).model_type


def load_pretrained(name: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu", **load_kwargs):
    """(model, processor) of a pretrained image-text-to-text model, in eval mode on `device`.

    `load_kwargs` go to `from_pretrained` (QLoRA passes `quantization_config` and `device_map`, which
    places the model itself)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    device = torch.device(device)
    if dtype is None:  # bf16 where the hardware runs it natively, else fp32
        dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    try:
        processor = AutoProcessor.from_pretrained(name)
        model = AutoModelForImageTextToText.from_pretrained(name, dtype=dtype, **load_kwargs)
    except OSError as e:
        raise VlmkitError(_not_found(name, e)) from None
    except ValueError as e:
        raise VlmkitError(
            f"{name}: not an image-text-to-text model transformers {_version()} can load ({first_line(e)}); "
            "give a VLM such as HuggingFaceTB/SmolVLM-256M-Instruct or a folder written by `vlmkit train`"
        ) from None
    if not hasattr(processor, "tokenizer") or not hasattr(processor, "image_processor"):
        raise VlmkitError(f"{name}: its processor ({type(processor).__name__}) has no image processor; is it a VLM?")
    if "device_map" not in load_kwargs:
        model = model.to(device)
    return model.eval(), processor


def _not_found(name: str, error: Exception) -> str:
    if is_local(name):
        return f"{name}: cannot load the model from this folder ({first_line(error)})"
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    why = "HF_HUB_OFFLINE is set" if offline else "the hub could not be reached or has no such model"
    return (
        f"model {name!r} is not a local folder and could not be downloaded ({why}); "
        "give a local model folder, or a hub id on a machine with internet access"
    )



def _version() -> str:
    import transformers

    return transformers.__version__
