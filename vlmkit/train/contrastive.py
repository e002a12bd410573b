"""`vlmkit train objective=contrastive`: train a dual encoder (image and text towers + projection heads).

The phases read top to bottom, as in `loop.py`:
1. the run folder and config (`loop.check_run_folder`), the pairs (`data/captions.py`; bad rows fail before
   any model loads) and the held-out probe (`probe.py`: `eval_data`, else images set aside from `data`);
2. the model (`model/dual_encoder.py`: new from `vision` + `text`, or `model=` a saved one), what trains
   (heads, logit scale and SigLIP's bias always; `train_vision`, `train_text`, or LoRA on the towers named
   by `lora_towers` when `lora_r` > 0), and the frozen towers' pooled features cached once (images through `features.ImageSource`,
   captions here);
3. the steps: a batch of pairs -> embeddings -> `model.loss` with every pair sharing an image or a caption
   counted positive -> AdamW, cosine schedule; the probe scored every `eval_every` steps (default: ten
   times a run) with a warning when its recall falls while the loss falls; checkpoints every `save_every`;
4. finish: the model folder, `history.jsonl`, the loss plot and `train_summary.json`.

Batches are a function of (seed, epoch) (`batches.py`) and a checkpoint holds the trainable weights,
optimizer, scheduler, RNG and history, so `--resume` ends with the weights of an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from vlmkit.config import TrainConfig
from vlmkit.data.captions import caption_key, read_pairs
from vlmkit.device import resolve_device, training_precision
from vlmkit.errors import VlmkitError
from vlmkit.io import atomic_write_text
from vlmkit.model.contrastive import positive_pairs, siglip_bias_init
from vlmkit.model.dual_encoder import create_dual_encoder, load_dual_encoder
from vlmkit.recipe import PAIR_MIN_STEPS, Choice
from vlmkit.train.batches import batches_from
from vlmkit.train.budget import steps_for
from vlmkit.train.checkpoint import capture_rng, load_checkpoint, restore_rng, save_checkpoint
from vlmkit.train.distributed import setup
from vlmkit.train.features import ImageSource
from vlmkit.train.finish import write_history
from vlmkit.train.loop import CHECKPOINT, MODEL, check_run_folder, cosine_schedule, log
from vlmkit.train.probe import Probe, RecallWatch, first_images, hold_out

BATCH_SIZE = 64  # contrastive losses need negatives: a batch of 4 (the VLM recipe's CPU default) has 3
TEXT_LR_FULL, TEXT_LR_LORA = 1e-5, 5e-4
TIMED_STEPS = 5
# attention projections: BERT, Llama-style, GPT-2, transformers and timm ViTs
LORA_TARGETS = {"query", "key", "value", "q_proj", "k_proj", "v_proj", "c_attn", "qkv_proj", "Wqkv", "qkv"}


def train_contrastive(cfg: TrainConfig, resume: bool = False, stop_after: int | None = None) -> dict:
    """Train a dual encoder per `cfg`; returns the summary. `stop_after` stops with a checkpoint (tests)."""
    out, pairs, probe, choices = prepare(cfg, resume, stop_after)
    log(f"loading the dual encoder ({cfg.model or f'{cfg.vision} + {cfg.text}'})")
    if cfg.model:
        model, processor = load_dual_encoder(cfg.model)
    else:
        model, processor = create_dual_encoder(cfg.vision, cfg.text, cfg.embed_dim, cfg.loss, cfg.image_size, cfg.logit_bias)
    groups = set_trainable(model, cfg)

    def save(folder: Path) -> None:
        if cfg.lora_r > 0:
            from vlmkit.model.lora import merge_lora

            merge_lora(model)
        model.config["logit_bias"] = model.logit_bias.item()
        model.save(folder, processor)

    return run_contrastive(Run(cfg, out, model, processor, groups, pairs, probe, save), choices, resume, stop_after)


def prepare(cfg: TrainConfig, resume: bool, stop_after: int | None) -> tuple:
    """The run folder, the training pairs and the probe, before any model loads: (out, pairs, probe or None,
    the choices made for keys left unset: the batch size, SigLIP's starting bias)."""
    dist = setup()
    if dist.active:
        raise VlmkitError("contrastive training runs in one process; run it without torchrun/accelerate")
    choices = []
    if cfg.batch_size is None:
        cfg.batch_size = BATCH_SIZE
        choices.append(Choice("batch_size", BATCH_SIZE, "contrastive: every other pair of a batch is a negative"))
    if cfg.batch_size < 2:
        raise VlmkitError("config field `batch_size`: a contrastive batch needs at least 2 pairs")
    if cfg.loss == "siglip" and cfg.logit_bias is None and not cfg.model:
        cfg.logit_bias = round(siglip_bias_init(cfg.batch_size), 4)
        choices.append(Choice("logit_bias", cfg.logit_bias, f"log((1/B)/(1-1/B)) for batch size B={cfg.batch_size}"))
    out = check_run_folder(cfg, dist, resume, stop_after)
    pairs = read_pairs(cfg.data)
    if cfg.eval_data:
        train_pairs, probe_pairs = pairs, first_images(read_pairs(cfg.eval_data), cfg.probe_size)
    else:
        train_pairs, probe_pairs = hold_out(pairs, cfg.probe_size, cfg.seed)
    if len(train_pairs) < cfg.batch_size:
        raise VlmkitError(f"{cfg.data}: {len(train_pairs)} training pairs, fewer than batch_size={cfg.batch_size}; "
                          "give more data or a smaller batch_size")
    torch.manual_seed(cfg.seed)
    return out, train_pairs, Probe(probe_pairs) if probe_pairs else None, choices


def run_contrastive(run: "Run", choices: list, resume: bool, stop_after: int | None) -> dict:
    """Cache, fix the step count, train and finish `run`; the summary, or {"stopped_at"} with a checkpoint."""
    run.warm()
    total = run.total_steps(choices)
    if choices:
        log("chosen for this run: " + "; ".join(map(str, choices)))
    if not run.steps(total, resume, stop_after):
        return {"stopped_at": stop_after}
    return run.finish(choices)


def set_trainable(model, cfg: TrainConfig) -> list[dict]:
    """Freeze all, then unfreeze by the config; returns AdamW's parameter groups, one learning rate each."""
    model.requires_grad_(False)
    heads = [*model.vision_head.parameters(), *model.text_head.parameters(), model.logit_scale]
    if cfg.loss == "siglip":
        heads.append(model.logit_bias)
    groups = [{"params": heads, "lr": cfg.projector_lr, "name": "heads"}]
    lora = lora_towers(cfg)
    if "vision" in lora:
        groups.append({"params": add_tower_lora(model.vision_tower, cfg, "vision tower"), "lr": cfg.vision_lr,
                       "name": "vision_lora"})
    elif cfg.train_vision:
        groups.append({"params": list(model.vision_tower.parameters()), "lr": cfg.vision_lr, "name": "vision"})
    if "text" in lora:
        groups.append({"params": add_tower_lora(model.text_encoder.model, cfg, "text encoder"),
                       "lr": cfg.lr or TEXT_LR_LORA, "name": "text_lora"})
    elif cfg.train_text:
        groups.append({"params": list(model.text_encoder.parameters()), "lr": cfg.lr or TEXT_LR_FULL, "name": "text"})
    for group in groups:
        for p in group["params"]:
            p.requires_grad_(True)
    return groups


def lora_towers(cfg: TrainConfig) -> set[str]:
    """The towers that get LoRA: none unless lora_r > 0."""
    return set(cfg.lora_towers.split("+")) if cfg.lora_r > 0 else set()


def add_tower_lora(tower, cfg: TrainConfig, what: str) -> list:
    """LoRA adapters on a tower's attention projections; returns their parameters. Merged into the weights
    when the model is saved. A CNN has none: tune it in full (`train_vision`)."""
    from peft import LoraConfig, inject_adapter_in_model
    from torch import nn

    names = {n.rsplit(".", 1)[-1] for n, m in tower.named_modules() if isinstance(m, nn.Linear)}
    targets = sorted(names & LORA_TARGETS)
    if not targets:
        raise VlmkitError(f"LoRA: the {what} has no attention projections to adapt (a CNN?); tune it in full "
                          "instead (train_vision=true / train_text=true) or give lora_towers without it")
    inject_adapter_in_model(LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                       target_modules=targets), tower)
    return [p for n, p in tower.named_parameters() if "lora_" in n]


class Run:
    """One contrastive run's state: the model, the cached features, the batches, the history.

    `model` embeds and scores (a `DualEncoder`, or `vlm_align.Aligner` around a VLM): `encode_images`,
    `text_features`, `embed_images`, `embed_texts`, `loss`, `scale`, `logit_bias`, `vision_tower`; `processor`
    has `pixel_values` and `tokenize`; `save(folder)` writes the trained model."""

    def __init__(self, cfg, out: Path, model, processor, groups, pairs, probe: Probe | None, save):
        self.device = resolve_device()
        self.cfg, self.out, self.model, self.processor = cfg, out, model.to(self.device), processor
        self.groups, self.pairs, self.probe, self.save = groups, pairs, probe, save
        self.precision = training_precision(cfg.precision, self.device)
        lora = lora_towers(cfg)
        self.tune_text = cfg.train_text or "text" in lora
        tune_vision = cfg.train_vision or "vision" in lora
        self.images = ImageSource(model, processor, self.device, cfg.cache_features and not tune_vision)
        self.text_cache: dict[str, torch.Tensor] | None = None if self.tune_text or not cfg.cache_features else {}
        self.history: list[dict] = []
        self.watch = RecallWatch()
        self.warnings: list[str] = []
        self.train_seconds = 0.0

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision.bf16)

    def train_mode(self) -> None:
        """Frozen towers stay in eval mode (no dropout, BatchNorm statistics kept)."""
        self.model.eval()
        self.model.vision_tower.train(self.cfg.train_vision)
        if hasattr(self.model, "text_encoder"):
            self.model.text_encoder.train(self.tune_text)

    def warm(self) -> None:
        """Cache the frozen towers' pooled features of every training and probe image and caption."""
        probe = self.probe.pairs if self.probe else []
        self.images.warm([p.image for p in self.pairs + probe], "caching image features")
        if self.text_cache is not None:
            self.text_features(list(dict.fromkeys(p.caption for p in self.pairs + probe)), progress=True)

    def text_features(self, captions: list[str], progress: bool = False) -> torch.Tensor:
        todo = [c for c in dict.fromkeys(captions) if c not in self.text_cache]
        with torch.inference_mode(), self.autocast():
            for s in tqdm(range(0, len(todo), 256), desc="caching caption features", unit="batch", file=sys.stderr,
                          disable=not progress):
                chunk = todo[s : s + 256]
                feats = self.model.text_features(**self.processor.tokenize(chunk, self.device)).float().cpu()
                self.text_cache.update(zip(chunk, feats))
        return torch.stack([self.text_cache[c] for c in captions]).to(self.device)

    def embed(self, pairs) -> tuple[torch.Tensor, torch.Tensor]:
        """(image embeddings, caption embeddings) (B, E) of a batch of pairs."""
        inputs = self.images([p.image for p in pairs])
        image = self.model.embed_images(inputs.get("pixel_values"), inputs.get("image_features"))
        captions = [p.caption for p in pairs]
        if self.text_cache is not None:
            text = self.model.embed_texts(features=self.text_features(captions))
        else:
            text = self.model.embed_texts(**self.processor.tokenize(captions, self.device))
        return image, text

    def loss(self, pairs) -> torch.Tensor:
        with self.autocast():
            image, text = self.embed(pairs)
        positives = positive_pairs([p.image for p in pairs], [caption_key(p.caption) for p in pairs])
        return self.model.loss(image.float(), text.float(), positives.to(self.device))

    def total_steps(self, choices: list) -> int:
        cfg, per_epoch = self.cfg, max(1, len(self.pairs) // self.cfg.batch_size)
        if cfg.max_steps:
            return cfg.max_steps
        if cfg.max_minutes > 0:
            seconds = self.time_steps()
            cfg.max_steps = steps_for(cfg.max_minutes, seconds)
            choices.append(Choice("max_steps", cfg.max_steps, f"max_minutes={cfg.max_minutes:g} at {seconds:.3f} s a step"))
            cfg.save(self.out / "config.yaml")  # so --resume keeps the count
            return cfg.max_steps
        if cfg.epochs is not None:
            return max(1, math.ceil(cfg.epochs * len(self.pairs) / cfg.batch_size))
        steps = max(PAIR_MIN_STEPS, per_epoch)
        choices.append(Choice("steps", steps, f"{len(self.pairs)} pairs, {cfg.batch_size} a step: at least {PAIR_MIN_STEPS} "
                              "steps and one epoch"))
        return steps

    def time_steps(self) -> float:
        """Seconds per step (forward, backward, an AdamW update at learning rate 0), leaving no trace."""
        rng, params = capture_rng(), [p for g in self.groups for p in g["params"]]
        probe = torch.optim.AdamW([{**g, "lr": 0.0} for g in self.groups])
        batches = batches_from(self.pairs, self.cfg.batch_size, self.cfg.seed + 1, 0)
        self.train_mode()
        elapsed = 0.0
        for k in range(2 + TIMED_STEPS):
            start = time.perf_counter()
            self.loss(next(batches)).backward()
            probe.step()
            elapsed += (time.perf_counter() - start) if k >= 2 else 0.0
            for p in params:
                p.grad = None
        restore_rng(rng)
        return elapsed / TIMED_STEPS

    def score_probe(self) -> dict:
        """The probe's recall and embedding spread, with the model in eval mode."""
        was = {m: m.training for m in self.model.modules()}
        self.model.eval()
        try:
            with torch.no_grad():
                pairs = {p.image: p for p in self.probe.pairs}
                image, _ = self.embed([pairs[i] for i in self.probe.images])
                text = torch.cat([self.embed(self.probe.pairs[s : s + 256])[1] for s in range(0, len(self.probe.pairs), 256)])
            return self.probe.score(image.float().cpu(), text.float().cpu())
        finally:
            for m, mode in was.items():
                m.training = mode

    def steps(self, total: int, resume: bool, stop_after: int | None) -> bool:
        cfg, model = self.cfg, self.model
        trainable = [p for g in self.groups for p in g["params"]]
        optimizer = torch.optim.AdamW(self.groups, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
        scheduler = cosine_schedule(optimizer, total, round(cfg.warmup_ratio * total), cfg.min_lr_ratio)
        step = 0
        if resume:
            step, self.history, _ = load_checkpoint(self.out / CHECKPOINT, model, optimizer, scheduler)
            log(f"resuming at step {step}/{total}")
        every = cfg.eval_every or max(1, total // 10)
        log(f"training {sum(p.numel() for p in trainable):,} of {sum(p.numel() for p in model.parameters()):,} parameters "
            f"({', '.join(g['name'] for g in self.groups)}), loss={cfg.loss}, {len(self.pairs)} pairs, {total} steps of "
            f"{cfg.batch_size}, probe of {len(self.probe.images) if self.probe else 0} images every {every} steps")
        batches = batches_from(self.pairs, cfg.batch_size, cfg.seed, step)
        self.train_mode()
        start, window = time.time(), []
        bar = tqdm(total=total, initial=step, desc="training", unit="step", file=sys.stderr)
        while step < total:
            loss = self.loss(next(batches))
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            window.append(loss.item())
            record = {"step": step, "loss": window[-1], "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                      "logit_scale": model.scale().item()}
            if cfg.loss == "siglip":
                record["logit_bias"] = model.logit_bias.item()
            if self.probe and (step % every == 0 or step == total):
                record.update(self.score_probe())
                recall = (record["probe_t2i_R@5"] + record["probe_i2t_R@5"]) / 2
                warning = self.watch.check(recall, sum(window) / len(window))
                window = []
                if warning:
                    record["warning"] = warning
                    self.warnings.append(f"step {step}: {warning}")
                    log(f"warning: step {step}: {warning}")
            self.history.append(record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}", **({"R@5": f"{record['probe_t2i_R@5']:.2f}"} if "probe_t2i_R@5" in record else {}))
            stopping = stop_after is not None and step >= stop_after
            if stopping or (cfg.save_every and step % cfg.save_every == 0 and step < total):
                save_checkpoint(self.out / CHECKPOINT, model, optimizer, scheduler, step, self.history, capture_rng())
            if stopping:
                bar.close()
                return False
        bar.close()
        self.train_seconds = time.time() - start
        return True

    def finish(self, choices: list) -> dict:
        model, out = self.model, self.out
        self.save(out / MODEL)
        write_history(self.history, out)
        if (out / CHECKPOINT).exists():
            shutil.rmtree(out / CHECKPOINT)
        probes = [r for r in self.history if "probe_t2i_R@5" in r]
        summary = {
            "model": str(out / MODEL),
            "objective": "contrastive" if self.cfg.objective == "contrastive" else "stage=contrastive",
            "loss": self.cfg.loss,
            "steps": len(self.history),
            "train_seconds": round(self.train_seconds, 1),
            "final_loss": self.history[-1]["loss"],
            "logit_scale": model.scale().item(),
            "probe": {k: v for k, v in probes[-1].items() if k.startswith(("probe_", "image_", "text_"))} if probes else None,
            "warnings": self.warnings,
            "recipe": {c.key: {"value": c.value, "reason": c.reason} for c in choices},
        }
        atomic_write_text(out / "train_summary.json", json.dumps(summary, indent=2))
        return summary
