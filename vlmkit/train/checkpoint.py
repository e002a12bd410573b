"""Resumable checkpoints and the final model folder, both written atomically.

A checkpoint is one file, `checkpoint/state.pt`: the trainable weights (by name), optimizer, scheduler,
RNG states, step and loss history, and the weights' moving average when `ema` keeps one. It is written
to a temporary file and renamed over the old one, so a run killed mid-write still has the previous
checkpoint intact.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from vlmkit.errors import VlmkitError
from vlmkit.io import atomic_write

STATE = "state.pt"


def save_checkpoint(folder: Path, model, optimizer, scheduler, step: int, history: list, rng: dict, average=None,
                    replan=None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    state = {
        "trainable": {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "step": step,
        "history": history,
        "rng": rng,
        **({"average": average.state_dict()} if average is not None else {}),
        **({"replan": replan.state_dict()} if replan is not None else {}),
    }
    atomic_write(folder / STATE, lambda tmp: torch.save(state, tmp))


def load_checkpoint(folder: Path, model, optimizer, scheduler, average=None, replan=None) -> tuple[int, list, bool]:
    """Put the saved state back; returns (step, history, whether it held `replan`'s state: a time
    budget's checks still to come)."""
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
    if average is not None:
        if "average" not in state:
            raise VlmkitError(f"{path}: the checkpoint holds no weight average (`ema`); resume with the run's own config.yaml")
        average.load_state_dict(state["average"])
    restore_rng(state["rng"])
    if replan is not None and "replan" in state:
        replan.load_state_dict(state["replan"])
    return state["step"], state["history"], "replan" in state


def capture_rng() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
