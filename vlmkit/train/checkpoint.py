"""Resumable checkpoints and the final model folder, both written atomically.

A checkpoint is one file, `checkpoint/state.pt`: the trainable weights (by name), optimizer, scheduler,
RNG states, step and loss history. It is written to a temporary file and renamed over the old one, so a
run killed mid-write still has the previous checkpoint intact.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from vlmkit.errors import VlmkitError

STATE = "state.pt"


def save_checkpoint(folder: Path, model, optimizer, scheduler, step: int, history: list, rng: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    state = {
        "trainable": {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "step": step,
        "history": history,
        "rng": rng,
    }
    tmp = folder / f".{STATE}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, folder / STATE)


def load_checkpoint(folder: Path, model, optimizer, scheduler, restore_rng) -> tuple[int, list]:
    path = folder / STATE
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError) as e:
        raise VlmkitError(f"{path}: cannot read the checkpoint ({e}); delete it to start over") from None
    params = dict(model.named_parameters())
    unknown = [n for n in state["trainable"] if n not in params]
    if unknown:
        raise VlmkitError(f"{path}: checkpoint does not match this model/config (e.g. {unknown[0]})")
    with torch.no_grad():
        for name, value in state["trainable"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    restore_rng(state["rng"])
    return state["step"], state["history"]


def save_model_atomic(model, processor, folder: Path, state_dict: dict | None = None) -> None:
    """save_pretrained into a temporary folder, then swap it into place. `state_dict` replaces the
    model's own tensors (a sharded model's weights, gathered)."""

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, state_dict=state_dict)
        processor.save_pretrained(tmp)

    write_folder_atomic(folder, write)


def write_folder_atomic(folder: Path, write) -> None:
    """`write(tmp)` fills a fresh temporary folder, which then replaces `folder` in one rename: a crash
    leaves either the old folder or the new one, never a half-written one."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write(tmp)
    old = folder.with_name(f".{folder.name}.old")
    if folder.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(folder, old)
    os.replace(tmp, folder)
    if old.exists():
        shutil.rmtree(old)
