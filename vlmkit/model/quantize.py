"""QLoRA support: the language model's linear layers in 4-bit NF4 (bitsandbytes), everything else as it was.

Only the LM's projections are quantised: the vision tower, the projector (which trains in full) and lm_head
stay in their float dtype, so the image path and the logits keep full precision. The 4-bit weights use NF4
with double quantisation (the quantisation constants are themselves quantised) and compute in bf16 by default:
each forward dequantises a layer's weight to the compute dtype and multiplies, then returns the input's dtype.

Three ways in:
- `load_pretrained_4bit(name, device)`: a transformers VLM, quantised while its weights load;
- `quantize_language_model_4bit(model)`: vlmkit's composed model, quantised in place from its fp32 weights;
- `merge_and_dequantize(model)`: after training, LoRA folded into dequantised fp32 weights, so the saved
  model is a plain float checkpoint that `load_model`/`load_pretrained` read as before.

bitsandbytes is optional: it is imported here only, and `qlora_available()` says in one line why 4-bit cannot
run when it cannot.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn

from vlmkit.device import resolve_device
from vlmkit.errors import VlmkitError, first_line

COMPUTE_DTYPE = torch.bfloat16
QUANT_TYPE = "nf4"
DOUBLE_QUANT = True
INSTALL = "pip install bitsandbytes==0.50.2"


# -- can 4-bit run here? -----------------------------------------------------------------------------------
@functools.cache
def _check(device_type: str) -> str | None:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return f"QLoRA needs bitsandbytes, which is not installed: {INSTALL}"
    except Exception as e:  # a broken install (missing native library, CUDA mismatch...) fails on import
        return f"bitsandbytes failed to import ({first_line(e)}); reinstall it: {INSTALL}"
    supported = getattr(bnb, "supported_torch_devices", set())
    if device_type not in supported:
        return (
            f"bitsandbytes {bnb.__version__} has no {device_type} backend (it supports {', '.join(sorted(supported)) or 'none'}); "
            f"{INSTALL} or newer"
        )
    # The backend list says what the build claims; a quantised layer running says what works.
    try:
        torch.manual_seed(0)
        dense = nn.Linear(64, 64).to(device_type)
        # bitsandbytes' documented recipe, independent of `linear_to_4bit`: a bug of ours must not read as
        # "unavailable" (and skip the tests that would catch it)
        layer = bnb.nn.Linear4bit(64, 64, compute_dtype=COMPUTE_DTYPE, compress_statistics=DOUBLE_QUANT, quant_type=QUANT_TYPE)
        layer.load_state_dict(dense.state_dict())
        layer = layer.to(device_type)  # quantises
        x = torch.randn(4, 64, device=device_type)
        with torch.no_grad():
            error = (layer(x) - dense(x)).abs().max() / dense(x).abs().max()
    except Exception as e:
        return f"bitsandbytes {bnb.__version__} cannot run 4-bit layers on {device_type} ({first_line(e)})"
    if not error < 0.25:  # NF4 + bf16 gives ~0.05 here; garbage gives ~1
        return f"bitsandbytes {bnb.__version__} 4-bit layers give wrong results on {device_type} (relative error {float(error):.2f})"
    return None


def quiet_bitsandbytes() -> None:
    """Silence the warning bitsandbytes logs on import on CPUs with AVX512-BF16, about an optional `kernels`
    package vlmkit does not use (4-bit layers work without it). peft imports bitsandbytes whenever it is
    installed, so every LoRA run would print it."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def qlora_available(device: str | torch.device | None = None) -> str | None:
    """None when 4-bit NF4 layers run on `device` (default: cuda if present, else cpu), else a one-line reason."""
    return _check(resolve_device(device).type)


def require_qlora(device: str | torch.device | None = None) -> None:
    """Raise `VlmkitError` with the reason when 4-bit cannot run on `device`."""
    reason = qlora_available(device)
    if reason is not None:
        raise VlmkitError(f"method=qlora: {reason}; use method=lora instead")


# -- one layer -----------------------------------------------------------------------------------------------
def linear_to_4bit(linear: nn.Linear, compute_dtype: torch.dtype = COMPUTE_DTYPE) -> nn.Module:
    """A `bnb.nn.Linear4bit` (NF4, double quant, `compute_dtype`) holding `linear`'s weight, quantised on its device."""
    import bitsandbytes as bnb

    device = linear.weight.device
    # built on meta: no throw-away fp32 weight; the real one is set just below
    layer = bnb.nn.Linear4bit(
        linear.in_features, linear.out_features, bias=linear.bias is not None, compute_dtype=compute_dtype,
        compress_statistics=DOUBLE_QUANT, quant_type=QUANT_TYPE, device="meta",
    )
    weight = bnb.nn.Params4bit(
        linear.weight.detach().clone(), requires_grad=False, compress_statistics=DOUBLE_QUANT,
        quant_type=QUANT_TYPE, module=layer,
    )
    layer.weight = weight.to(device)  # quantises
    if linear.bias is not None:
        # a copy: Linear4bit.forward casts its bias to the compute dtype in place
        layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    layer.train(linear.training)
    return layer


def is_4bit(module: nn.Module) -> bool:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    return isinstance(module, bnb.nn.Linear4bit)


# -- vlmkit's composed model -------------------------------------------------------------------------------------
def quantize_language_model_4bit(model, compute_dtype: torch.dtype = COMPUTE_DTYPE) -> list[str]:
    """Replace the LM's nn.Linear layers (not lm_head) of a composed vlmkit model with 4-bit ones, in place,
    then prepare the model for k-bit training. Returns the quantised layers' names (relative to the LM).
    `compute_dtype`: see `load_pretrained_4bit`."""
    lm = getattr(model, "language_model", None)
    if lm is None:
        raise VlmkitError(f"quantize_language_model_4bit: {type(model).__name__} has no .language_model")
    require_qlora(next(lm.parameters()).device)
    head = lm.get_output_embeddings()
    names = [
        name for name, m in lm.named_modules()
        if type(m) is nn.Linear and m is not head  # type(): not a subclass already quantised or wrapped
    ]
    if not names:
        raise VlmkitError(f"quantize_language_model_4bit: no linear layers to quantise in {type(lm).__name__}")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = lm.get_submodule(parent_name)
        setattr(parent, child, linear_to_4bit(getattr(parent, child), compute_dtype))
    mark_4bit(lm)
    prepare_for_kbit_training(model)
    return names


def mark_4bit(lm: nn.Module) -> None:
    """Flag the module LoRA is injected into as 4-bit, as transformers flags a model it quantised: peft reads
    the flag to wrap `Linear4bit` layers in its 4-bit LoRA class (a dense LoRA class would work, but its
    `merge` would add a float update to the packed uint8 weight)."""
    lm.is_loaded_in_4bit = True


# -- pretrained transformers VLMs --------------------------------------------------------------------------------
def skip_modules(config) -> list[str]:
    """Full dotted names of the vision tower, the projector and lm_head of the model `config` describes: the
    modules `BitsAndBytesConfig(llm_int8_skip_modules=...)` must leave in float. Found on a weightless (meta)
    copy with the same `vlmkit.model.parts` table training uses, so the names match the loaded model exactly."""
    from transformers import AutoModelForImageTextToText

    from vlmkit.model.parts import find_part

    with torch.device("meta"):
        skeleton = AutoModelForImageTextToText.from_config(config)
    found = {part: find_part(skeleton, part) for part in ("vision", "projector", "language")}
    missing = [part for part, hit in found.items() if hit is None]
    if missing:
        raise VlmkitError(
            f"{type(skeleton).__name__}: no {' or '.join(missing)} module found, so 4-bit cannot be limited to the "
            "language model; use method=lora"
        )
    names = [found["vision"][0], found["projector"][0]]
    head = skeleton.get_output_embeddings()
    names += [n for n, m in skeleton.named_modules() if head is not None and m is head] or ["lm_head"]
    return list(dict.fromkeys(names))


def bnb_config(skip: list[str], compute_dtype: torch.dtype = COMPUTE_DTYPE):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=QUANT_TYPE,
        bnb_4bit_use_double_quant=DOUBLE_QUANT,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=skip,
    )


def load_pretrained_4bit(
    name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
    compute_dtype: torch.dtype = COMPUTE_DTYPE,
):
    """(model, processor) of a pretrained VLM with its LM's linear layers in 4-bit, ready for LoRA training.

    The unquantised parts (tower, projector, embeddings, norms, lm_head) load in `dtype` (fp32: what k-bit
    training keeps them in). The model is frozen and in eval mode; the caller unfreezes what it trains.
    `compute_dtype` is what each 4-bit layer dequantises to and multiplies in: bf16 (QLoRA's choice) where
    the hardware has bf16 matmul. On a CPU without AVX512-BF16/AMX bf16 matmul is emulated: a LoRA step on a
    512-wide 8-layer Llama took 23x as long as on the fp32 model, against 1.1x with float32 compute (measured).
    """
    from vlmkit.model.parts import find_part
    from vlmkit.model.pretrained import load_pretrained, read_config

    device = torch.device(device)
    require_qlora(device)
    quantization = bnb_config(skip_modules(read_config(name)), compute_dtype)
    place = {"": device.index if device.type == "cuda" and device.index is not None else device.type}
    model, processor = load_pretrained(name, dtype, device, quantization_config=quantization, device_map=place)
    lm = find_part(model, "language")[1]
    if not any(is_4bit(m) for m in lm.modules()):
        raise VlmkitError(f"{name}: loaded, but no layer of its language model was quantised to 4 bit")
    mark_4bit(lm)
    prepare_for_kbit_training(model)
    return model.eval(), processor


def prepare_for_kbit_training(model) -> None:
    """What peft's `prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)` does, plus one fix.

    - every parameter frozen (the loop unfreezes the projector and adds LoRA);
    - fp16/bf16 parameters that are not 4-bit (tower, projector, norms, embeddings, lm_head) upcast to fp32,
      so the trained projector and the adapters' inputs are full precision;
    - gradient checkpointing is NOT turned on here: peft would enable it with reentrant checkpoints (which need
      `enable_input_require_grads`); the loop already enables it, non-reentrant, when the config asks;
    - bitsandbytes' CPU fast path (AVX512-BF16 CPUs only) repacks a weight the first time the layer runs in
      eval mode without grad, and from then on every call, training ones included, takes the packed inference
      kernel instead of the autograd function; turned off, so an eval pass between training steps cannot change
      what a training step computes (not exercised here: this machine's CPU has no AVX512-BF16).
    """
    for param in model.parameters():
        param.requires_grad_(False)
        if param.dtype in (torch.float16, torch.bfloat16) and type(param).__name__ != "Params4bit":
            param.data = param.data.float()
    for module in model.modules():
        if is_4bit(module):
            module.support_avx512bf16_for_cpu = False


def dequantized_weight(layer: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (out, in) float weight a 4-bit layer computes with."""
    import bitsandbytes.functional as bf

    data, state = layer.weight.data, layer.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        data, state = bf._convert_weight_packed_for_cpu_inverse(data, state)
    return bf.dequantize_4bit(data, state).to(dtype)


def merge_and_dequantize(model, dtype: torch.dtype = torch.float32) -> int:
    """Replace every 4-bit layer (bare, or under a LoRA adapter) with an nn.Linear of `dtype` holding the
    dequantised weight plus the LoRA update, in place; drops the model's quantisation config so it saves and
    reloads as a plain float model. Returns the number of layers replaced.

    The adapters are folded into the dequantised weight, not into the 4-bit one (peft's `merge` on a 4-bit
    layer re-quantises the sum, which rounds most of a small LoRA update away).
    """
    from peft.tuners.lora import LoraLayer

    count = 0

    def dense(layer: nn.Module, delta: torch.Tensor | None) -> nn.Linear:
        weight = dequantized_weight(layer, torch.float32)
        if delta is not None:
            weight = weight + delta.float()
        out = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device=weight.device, dtype=dtype)
        with torch.no_grad():
            out.weight.copy_(weight)
            if layer.bias is not None:
                out.bias.copy_(layer.bias.float())
        out.requires_grad_(False)
        return out

    def replace(parent: nn.Module) -> None:
        nonlocal count
        for name, child in parent.named_children():
            if isinstance(child, LoraLayer) and is_4bit(child.get_base_layer()):
                delta = None
                for adapter in child.active_adapters:
                    if adapter in child.lora_A:
                        d = child.get_delta_weight(adapter)
                        delta = d if delta is None else delta + d
                setattr(parent, name, dense(child.get_base_layer(), delta))
                count += 1
            elif is_4bit(child):
                setattr(parent, name, dense(child, None))
                count += 1
            else:
                replace(child)

    replace(model)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    elif hasattr(getattr(model, "config", None), "quantization_config"):
        del model.config.quantization_config
    for module in model.modules():
        for attr in ("is_loaded_in_4bit", "is_quantized"):
            if getattr(module, attr, False):
                setattr(module, attr, False)
    return count
