"""The end of a run: the trained model saved (merged, or as an adapter of a pretrained base), the loss
history as JSONL and a plot, and the summary, all written atomically."""

from __future__ import annotations

import json
from pathlib import Path

from vlmkit.config import TrainConfig
from vlmkit.io import atomic_write, atomic_write_text, save_pretrained_atomic
from vlmkit.model.adapter import save_adapter


def save_trained(model, processor, cfg: TrainConfig, folder: Path, state: dict | None = None) -> None:
    """LoRA on a pretrained base (not a vlmkit model): a small adapter, merged on
    load or by `vlmkit merge`. Anything else: the whole model, LoRA merged in (QLoRA's 4-bit base
    dequantised first: peft's merge would re-quantise and round the update away). `state`: a sharded
    model's tensors, gathered."""
    if cfg.uses_lora and getattr(model.config, "model_type", "") != "vlmkit":
        save_adapter(model, processor, cfg, folder, state)
        return
    if cfg.method == "qlora":
        from vlmkit.model.quantize import merge_and_dequantize

        merge_and_dequantize(model)
    elif cfg.uses_lora:
        from vlmkit.model.lora import merge_lora

        merge_lora(model)
    model.requires_grad_(False)
    save_pretrained_atomic(model, processor, folder, state)


def write_history(history: list[dict], out: Path) -> None:
    atomic_write_text(out / "history.jsonl", "".join(json.dumps(r) + "\n" for r in history))
    plot_history(history, out / "loss.png")


def plot_history(history: list[dict], path: Path) -> None:
    """Training (and eval) loss against step, as a PNG beside the run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in history], [r["loss"] for r in history], label="train loss", lw=1)
    evals = [r for r in history if "eval_loss" in r]
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100))
    plt.close(fig)
