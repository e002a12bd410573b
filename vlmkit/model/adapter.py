"""LoRA adapters of pretrained VLMs: saved small, loaded onto their base, merged into a standalone model.

A LoRA run of a pretrained model (`model=M method=lora`) writes `OUTPUT/model` as an adapter folder:
`vlmkit_adapter.json` (the base model and the LoRA settings), `adapter.safetensors` (every trained
tensor: the LoRA matrices and the projector, which trains in full) and the processor files. It is a few
megabytes where the base is gigabytes. `vlmkit.load(folder)` (and `--model folder`) loads the base,
adds the adapters and merges them; `vlmkit merge` writes that merged model as a standalone
transformers checkpoint that loads without peft or vlmkit.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch

from vlmkit.errors import VlmkitError
from vlmkit.io import atomic_write_folder, save_pretrained_atomic

ADAPTER_CONFIG = "vlmkit_adapter.json"
ADAPTER_WEIGHTS = "adapter.safetensors"


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def save_adapter(model, processor, cfg, folder: Path, state_dict: dict | None = None) -> None:
    """Write the trained tensors of a LoRA run and how to rebuild the model around them (from
    `state_dict` when given: a sharded model's tensors, gathered)."""
    from safetensors.torch import save_file

    from vlmkit.model.lora import language_model

    base = str(Path(cfg.model).expanduser().resolve()) if Path(cfg.model).expanduser().exists() else cfg.model
    meta = {
        "base_model": base,
        "model_type": model.config.model_type,
        "lora_r": cfg.lora_r,
        "lora_alpha": cfg.lora_alpha,
        "lora_dropout": cfg.lora_dropout,
        "target_modules": lm_target_modules_of_base(language_model(model)),
    }
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    source = state_dict if state_dict is not None else dict(model.named_parameters())
    tensors = {n: source[n].detach().cpu().contiguous() for n in trained}

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS))
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
        processor.save_pretrained(tmp)

    atomic_write_folder(folder, write)


def lm_target_modules_of_base(lm) -> list[str]:
    """The projection names LoRA wrapped (the base layer names, as `add_lora` chose them)."""
    from peft.tuners.lora import LoraLayer

    return sorted({name.rsplit(".", 1)[-1] for name, m in lm.named_modules() if isinstance(m, LoraLayer)})


def load_adapter(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, merge: bool = True):
    """(model, processor): the base model with the adapter's tensors in place (merged by default)."""
    from safetensors.torch import load_file
    from transformers import AutoProcessor

    from vlmkit.model.pretrained import load_pretrained
    from vlmkit.model.lora import add_lora, merge_lora

    path = Path(path)
    meta = json.loads((path / ADAPTER_CONFIG).read_text())
    model, _ = load_pretrained(meta["base_model"], dtype=dtype or torch.float32, device="cpu")
    if model.config.model_type != meta["model_type"]:
        raise VlmkitError(f"{path}: the adapter was trained on a {meta['model_type']} model, but its base "
                          f"{meta['base_model']} is now {model.config.model_type}")
    add_lora(model, SimpleNamespace(lora_r=meta["lora_r"], lora_alpha=meta["lora_alpha"], lora_dropout=meta["lora_dropout"],
                                    lora_targets=",".join(meta["target_modules"])))
    tensors = load_file(str(path / ADAPTER_WEIGHTS))
    params = dict(model.named_parameters())
    unknown = [n for n in tensors if n not in params]
    if unknown:
        raise VlmkitError(f"{path}: adapter tensor {unknown[0]} has no place in {meta['base_model']}")
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)
    if merge:
        merge_lora(model)
    processor = AutoProcessor.from_pretrained(path)
    return model.to(device).eval(), processor


def merge_to_folder(adapter: str | Path, out: str | Path) -> Path:
    """`vlmkit merge`: the adapter merged into its base, saved as a standalone transformers model."""
    adapter = Path(adapter)
    if not is_adapter_dir(adapter) and is_adapter_dir(adapter / "model"):
        adapter = adapter / "model"  # the run folder was given
    if not is_adapter_dir(adapter):
        raise VlmkitError(
            f"{adapter}: not a LoRA adapter folder (no {ADAPTER_CONFIG}); give the run folder of a "
            "`vlmkit train model=... method=lora` run (runs of composed models are saved merged already)"
        )
    model, processor = load_adapter(adapter)
    model.requires_grad_(False)
    save_pretrained_atomic(model, processor, Path(out))
    return Path(out)
