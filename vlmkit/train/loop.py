"""The training loop: `train(cfg)` reads top to bottom as the run's phases.

1. check the run folder (a new run, or `--resume` of one) and save the config;
2. set up: read the data (bad data fails before the model loads), build the model, choose what trains
   (`stages.py`), tokenize through the model's renderer, cache image features, initialise from data
   (`initialise.py`), DPO's reference log-probs, FSDP sharding;
3. the steps: `grad_accum` micro-batches -> clip -> AdamW -> cosine schedule with warm-up, checkpoints;
4. finish: the final eval loss, the model, the history and the summary (`finish.py`).

The data order is a function of (seed, epoch) only (`batches.py`), and a checkpoint holds the trainable
weights, optimizer, scheduler, RNG states, the step and the weights' moving average (`ema`), so a run
killed at any moment and resumed with `--resume` ends with the same weights as one that never stopped.
Everything is written to a temporary file or folder and renamed into place.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from vlmkit.build import for_training
from vlmkit.config import TrainConfig
from vlmkit.data.collate import renderer_for
from vlmkit.device import Precision, training_precision
from vlmkit.errors import VlmkitError
from vlmkit.io import atomic_write_text
from vlmkit.model.frozen_bf16 import FrozenBf16
from vlmkit.model.frozen_int8 import FrozenInt8
from vlmkit.model.vlm import VlmkitForConditionalGeneration
from vlmkit.recipe import Choice, choose_group_by_length, choose_steps, resolve
from vlmkit.train.average import WeightAverage
from vlmkit.train.batches import batches_from, first_epoch_chunks
from vlmkit.train.budget import TIMED_STEPS, Replan, steps_for, time_steps
from vlmkit.train.checkpoint import capture_rng, load_checkpoint, save_checkpoint
from vlmkit.train.compiled import CompiledBlocks, cxx_compiler
from vlmkit.train.distributed import setup
from vlmkit.train.features import ImageSource
from vlmkit.train.finish import save_trained, write_history
from vlmkit.train.initialise import initialise_from_data
from vlmkit.train.objectives import Dpo, Sft, objective_for
from vlmkit.train.stages import set_trainable, train_mode

CHECKPOINT = "checkpoint"
MODEL = "model"
clock = time.perf_counter  # what a time budget's checks measure steps with


def log(msg: str) -> None:
    tqdm.write(msg, file=sys.stderr)  # on a line of its own, above a progress bar that is running


class Cosine:
    """The learning rate's factor at a step: a linear warm-up, then a cosine down to `min_ratio`. An object
    rather than a closure so that `total` can change as a time budget is re-planned, and so that the
    scheduler's checkpoint keeps it (LambdaLR saves the attributes of callable objects)."""

    def __init__(self, total: int, warmup: int, min_ratio: float):
        self.total, self.warmup, self.min_ratio = total, warmup, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def cosine_schedule(optimizer, total_steps: int, warmup: int, min_ratio: float):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, Cosine(total_steps, warmup, min_ratio))


def run_eval(model, fn):
    """`fn()` with the model in eval mode, every module's train/eval mode restored afterwards (a frozen
    tower stays in eval mode)."""
    was_training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        return fn()
    finally:
        for module, mode in was_training.items():
            module.training = mode


@dataclass
class Run:
    """What the set-up phase hands to the steps and the finish."""

    cfg: TrainConfig
    out: Path
    dist: object  # vlmkit.train.distributed.Dist
    device: torch.device
    precision: Precision
    model: object
    processor: object
    objective: Sft
    groups: list[dict]
    examples: list
    eval_examples: list
    skipped: int
    fsdp: bool
    history: list[dict] = field(default_factory=list)
    writer: object = None  # TensorBoard, on rank 0
    steps: int = 0
    train_seconds: float = 0.0
    trainable_parameters: int = 0
    budget: dict | None = None  # max_minutes: what was timed and the steps chosen
    recipe: list[Choice] = field(default_factory=list)  # the `auto` keys decided for this run, with reasons
    frozen: FrozenBf16 | FrozenInt8 | None = None  # bf16-frozen / int8-frozen: the frozen weights' copies, until the model is saved
    compiled: CompiledBlocks | None = None  # compile: the LM's blocks' compiled forward, until the model is saved

    def release(self) -> None:
        """The model's own layers again: no bf16 or int8 copies, no compiled blocks (twice is harmless)."""
        for held in (self.frozen, self.compiled):
            if held is not None:
                held.restore()

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision.bf16)

    def to_device(self, batch: dict) -> dict:
        return {k: self.to_device(v) if isinstance(v, dict) else v.to(self.device) if torch.is_tensor(v) else v
                for k, v in batch.items()}

    def evaluate(self) -> float:
        # compiled blocks run plain here: no-grad passes would compile graphs of their own, one a block
        with self.autocast(), torch.compiler.set_stance("force_eager") if self.compiled else contextlib.nullcontext():
            return run_eval(self.model, lambda: self.objective.eval(self.model, self.eval_examples, self.cfg.batch_size, self.to_device))

    def say(self, msg: str) -> None:
        if self.dist.main:
            log(msg)


def train(
    cfg: TrainConfig, resume: bool = False, stop_after: int | None = None, model_and_processor=None,
    recipe: list[Choice] | None = None,
) -> dict:
    """Train per `cfg`; returns a summary dict. `stop_after` ends early (tests of resume use it);
    `model_and_processor` trains an already built (model, processor) instead of building one from `cfg`
    (then `cfg` is the resolved config it was built from, and `recipe` the choices `resolve` made)."""
    dist = setup()  # one process, or this rank of a torchrun / accelerate launch
    try:
        cfg, choices = resolve(cfg, dist.device().type)  # the `auto` keys, before anything is saved or built
        out = check_run_folder(cfg, dist, resume, stop_after)
        run = set_up(cfg, out, dist, model_and_processor)
        try:
            run.recipe = list(recipe or []) + choices + run.recipe  # set_up's choices from the data come last
            if not run_steps(run, resume, stop_after):
                return {"stopped_at": stop_after}
            return finish(run)
        finally:
            run.release()  # the model passed in is handed back with its own layers
    finally:
        dist.close()


def check_run_folder(cfg: TrainConfig, dist, resume: bool, stop_after: int | None) -> Path:
    """Refuse what cannot run before anything is loaded; rank 0 then saves the config."""
    out = Path(cfg.output)
    if not cfg.data:
        raise VlmkitError("no training data: pass --data FILE.jsonl (see `vlmkit data check --help` for the format)")
    if resume:
        if not (out / CHECKPOINT).is_dir():
            raise VlmkitError(f"--resume: no checkpoint in {out}/{CHECKPOINT}; start without --resume")
    elif (out / CHECKPOINT).exists():
        raise VlmkitError(f"{out} already holds a run; pass --resume to continue it or choose another --output")
    fsdp = dist.active and cfg.fsdp
    if fsdp and (resume or stop_after is not None):
        raise VlmkitError("fsdp=true runs cannot be checkpointed and resumed yet; run without --resume (or use DDP)")
    if fsdp and cfg.method == "qlora":
        raise VlmkitError("fsdp=true with method=qlora is not supported; use method=lora with fsdp, or qlora without")
    dist.barrier()  # every rank has looked for a checkpoint before rank 0 writes anything
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / "config.yaml")
    return out


def set_up(cfg: TrainConfig, out: Path, dist, model_and_processor) -> Run:
    device = dist.device()
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    reader = Dpo if cfg.method == "dpo" else Sft
    samples = reader.read(cfg.data)  # bad data fails here, before the model loads
    eval_samples = reader.read(cfg.eval_data) if cfg.eval_data else []
    if model_and_processor is None and dist.main:
        log(f"loading the model ({cfg.model or f'{cfg.vision} + {cfg.llm}'})")
    model, processor = model_and_processor or for_training(cfg)
    renderer = renderer_for(processor, getattr(model.config, "model_type", ""), bool(cfg.train_on_prompt))
    groups = set_trainable(model, cfg)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    model.to(device)
    images = ImageSource(model, processor, device, renderer.caches_features and cfg.cache_features and not cfg.train_vision)
    objective = objective_for(cfg, renderer, images)
    examples, skipped = objective.tokenize(samples)
    eval_examples, eval_skipped = objective.tokenize(eval_samples)
    if not examples:
        raise VlmkitError(f"{cfg.data}: no trainable samples")
    images.warm([p for e in examples + eval_examples for p in e.images], "caching image features")
    run = Run(cfg, out, dist, device, training_precision(cfg.precision, device), model, processor, objective, groups,
              examples, eval_examples, skipped + eval_skipped, dist.active and cfg.fsdp)
    if cfg.group_by_length is None:  # decided from the tokenized lengths, and saved so --resume draws the same batches
        run.recipe.append(choose_group_by_length([e.length for e in examples], cfg.batch_size * dist.world))
        cfg.group_by_length = run.recipe[-1].value
        if dist.main:
            cfg.save(out / "config.yaml")
    initialise_from_data(model, processor.tokenizer, cfg, examples, images, run.say)
    if run.precision.frozen_bf16:
        run.frozen = FrozenBf16(model)
        run.say(f"precision={run.precision.name}: bf16 copies of {len(run.frozen.layers)} frozen linear layers "
                f"({run.frozen.bytes / 2**20:.0f} MiB), the rest in fp32")
    elif run.precision.frozen_int8:
        if cfg.compile or run.fsdp:
            raise VlmkitError(f"precision=int8-frozen does not combine with {'compile=true' if cfg.compile else 'fsdp=true'}: "
                              "set precision=auto or fp32 for it")
        run.frozen = FrozenInt8(model)
        run.say(f"precision={run.precision.name}: int8 packs of {len(run.frozen.layers)} frozen linear layers "
                f"({run.frozen.bytes / 2**20:.0f} MiB), the rest in fp32")

    chunks = first_epoch_chunks(examples, cfg.batch_size, dist.world, cfg.seed, cfg.group_by_length)
    if dist.main:  # DPO: the starting model's reference log-probs, written once...
        objective.prepare(model, examples, out, run.to_device, chunks, run.autocast)
    dist.barrier()
    if not dist.main:  # ...and read by the other ranks
        objective.prepare(model, examples, out, run.to_device, chunks, run.autocast)
    if cfg.compile:
        if device.type == "cpu" and cxx_compiler() is None:
            raise VlmkitError("compile=true: TorchInductor builds CPU kernels with a C++ compiler, and none was found "
                              "(g++ or clang++ on PATH, or $CXX); install one or set compile=false")
        run.compiled = CompiledBlocks(model)
        if not run.compiled.blocks:
            raise VlmkitError("compile=true: this model has no repeated blocks (an nn.ModuleList of its LM's layers) to "
                              "compile; set compile=false")
        run.say(f"compile: {len(run.compiled.blocks)} blocks of the LM compiled by torch.compile for the training steps "
                "(the first steps compile them; evaluation passes run them plain)")
    if run.fsdp:
        shard_groups(run)
    return run


def shard_groups(run: Run) -> None:
    """FSDP: parameters are replaced by sharded ones, so the optimizer groups are rebuilt by name."""
    from vlmkit.train.distributed import shard

    if isinstance(run.model, VlmkitForConditionalGeneration) and run.cfg.uses_lora:
        raise VlmkitError("fsdp=true with LoRA on a composed model is not supported; use DDP (fsdp=false)")
    names = {id(p): n for n, p in run.model.named_parameters()}
    group_names = [[names[id(p)] for p in g["params"]] for g in run.groups]
    units = shard(run.model, run.dist)
    run.say(f"FSDP: parameters sharded over {run.dist.world} processes in {units} units")
    params = dict(run.model.named_parameters())
    for group, wanted in zip(run.groups, group_names):
        group["params"] = [params[n] for n in wanted]


def run_steps(run: Run, resume: bool, stop_after: int | None) -> bool:
    """Train to the last step (True), or to `stop_after` with a checkpoint written (False)."""
    cfg, dist, model, objective = run.cfg, run.dist, run.model, run.objective
    per_step = cfg.batch_size * cfg.grad_accum
    rank_slice = slice(dist.rank * cfg.batch_size, (dist.rank + 1) * cfg.batch_size)
    runner = model if run.fsdp else dist.wrap(model)
    train_mode(model, cfg)
    # the fused kernel: one pass over the parameters (much faster than the loop over tensors on CPU)
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for g in run.groups for p in g["params"])

    def make_optimizer(lr: float | None = None):  # lr: every group's (the budget's timing probe uses 0)
        groups = run.groups if lr is None else [{**g, "lr": lr} for g in run.groups]
        return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay, betas=(0.9, 0.95), fused=fused or None)

    if not cfg.max_steps and cfg.max_minutes > 0:
        fix_steps_to_budget(run, runner, rank_slice, make_optimizer, *unbudgeted_steps(run))
    if cfg.max_steps:
        total_steps = cfg.max_steps
    else:
        total_steps, choice = unbudgeted_steps(run)
        if choice is not None:
            run.recipe.append(choice)
    if run.recipe:
        run.say("chosen for this run: " + "; ".join(map(str, run.recipe)))
    optimizer = make_optimizer()
    scheduler = cosine_schedule(optimizer, total_steps, round(cfg.warmup_ratio * total_steps), cfg.min_lr_ratio)
    named_trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    trainable = [p for _, p in named_trainable]
    run.trainable_parameters = sum(p.numel() for p in trainable)
    average = WeightAverage(named_trainable, cfg.ema, total_steps) if cfg.ema > 0 else None
    # max_minutes: the plan is checked as the run goes; a resumed run goes on with the checkpoint's checks, if
    # it holds any (none when max_steps was given beside max_minutes: no budget)
    budgeted = run.budget is not None or (resume and cfg.max_minutes > 0)
    spent = run.budget["timing_seconds"] if run.budget is not None else 0.0
    replan = Replan(cfg.max_minutes, lambda x: dist.all_sum(x) / dist.world, spent) if budgeted else None
    schedule = scheduler.lr_lambdas[0]

    step = 0
    if resume:
        step, run.history, replanning = load_checkpoint(run.out / CHECKPOINT, model, optimizer, scheduler, average, replan)
        replan = replan if replanning else None
        total_steps = schedule.total  # the checkpoint's plan
        run.say(f"resuming at step {step}/{total_steps}")
    from torch.utils.tensorboard import SummaryWriter

    writer = run.writer = SummaryWriter(str(run.out / "logs")) if dist.main else None
    run.say(
        f"training {run.trainable_parameters:,} of {sum(p.numel() for p in model.parameters()):,} parameters "
        f"({cfg.stage}, {cfg.method}), {len(run.examples)} samples, {total_steps} steps of {per_step * dist.world}"
        + (f" ({dist.world} processes x {per_step})" if dist.active else "")
        + f", {run.precision.name} on {run.device} ({run.precision.reason})"
    )
    # every rank draws the same global batches and trains on its own slice of each
    batches = batches_from(run.examples, cfg.batch_size * dist.world, cfg.seed, step * cfg.grad_accum, cfg.group_by_length)
    start = time.time()
    bar = tqdm(total=total_steps, initial=step, desc="training", unit="step", file=sys.stderr, disable=not dist.main)
    mark = clock()  # a budget counts the whole loop: a step's seconds run to the next step's check, logging,
    while step < total_steps:  # evaluation passes and checkpoints included
        micro = [run.to_device(objective.batch(next(batches)[rank_slice])) for _ in range(cfg.grad_accum)]
        weights = [objective.weight(b) for b in micro]
        total_weight = dist.all_sum(float(sum(weights)))  # the step's labelled tokens (pairs) on all ranks
        loss_sum, metrics = 0.0, {}
        for batch, weight in zip(micro, weights):
            with run.autocast():
                loss, parts = objective.loss(runner, batch)
            # a mean over this micro-batch -> its share of the step's mean (DDP divides by the world size)
            (loss * (weight * dist.world / total_weight)).backward()
            loss_sum += loss.item() * weight
            for key, value in parts.items():
                metrics[key] = metrics.get(key, 0.0) + value * weight
        loss_sum = dist.all_sum(loss_sum) / total_weight
        metrics = {k: dist.all_sum(v) / total_weight for k, v in metrics.items()}
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if average is not None:
            average.update()
        step += 1
        record = {"step": step, "loss": loss_sum, "lr": scheduler.get_last_lr()[-1], "grad_norm": float(grad_norm), **metrics}
        now = clock()
        seconds, mark = now - mark, now
        if replan is not None and (planned := replan.after_step(step, seconds, total_steps)) is not None:
            total_steps = bar.total = schedule.total = replanned(run, replan, total_steps, planned)
        if run.eval_examples and cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps and (dist.main or run.fsdp):
            record["eval_loss"] = run.evaluate()
        run.history.append(record)
        for key, value in record.items():
            if key != "step" and writer is not None:
                writer.add_scalar("eval/loss" if key == "eval_loss" else f"train/{key}", value, step)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum:.3f}")
        stopping = stop_after is not None and step >= stop_after
        if dist.main and not run.fsdp and (stopping or (cfg.save_every and step % cfg.save_every == 0 and step < total_steps)):
            save_checkpoint(run.out / CHECKPOINT, model, optimizer, scheduler, step, run.history, capture_rng(), average, replan)
        if stopping:
            bar.close()
            dist.barrier()
            return False
    bar.close()
    run.train_seconds, run.steps = time.time() - start, step
    if run.budget is not None and replan is not None:  # the steps the timing planned, the checks, the steps taken
        run.budget.update(timed_plan=run.budget["steps"], plans=replan.plans, steps=step)
    if average is not None:  # the final eval and the saved model use the average
        average.apply()
        run.say(f"ema={cfg.ema:g}: the trained weights are replaced by their moving average (time constant "
                f"{cfg.ema * total_steps:.0f} steps)")
    return True


def unbudgeted_steps(run: Run) -> tuple[int, Choice | None]:
    """The steps without `max_steps` or `max_minutes`: `epochs` passes, or with `epochs` unset the recipe's
    choice from the data's size (returned too, with its reason)."""
    cfg, per_step = run.cfg, run.cfg.batch_size * run.cfg.grad_accum
    if cfg.epochs is None:
        choice = choose_steps(len(run.examples), per_step * run.dist.world)
        return choice.value, choice
    return (max(1, math.ceil(cfg.epochs * len(run.examples) / per_step)) if cfg.epochs > 0 else 0), None


def fix_steps_to_budget(run: Run, runner, rank_slice: slice, make_optimizer, without: int, choice: Choice | None) -> None:
    """`max_minutes`: time the first steps, set `max_steps` to what fits and save it in the run's config.
    `without` (and the recipe's `choice`, if it made one): the steps the run would take without the budget,
    reported beside the budget's."""
    cfg = run.cfg
    begun = clock()
    seconds = time_steps(run, runner, rank_slice, make_optimizer)
    spent = run.dist.all_sum(clock() - begun) / run.dist.world  # counted in the minutes: compiling too
    cfg.max_steps = steps_for(cfg.max_minutes - spent / 60, seconds)
    run.budget = {"max_minutes": cfg.max_minutes, "seconds_per_step": seconds, "steps": cfg.max_steps,
                  "timed_steps": TIMED_STEPS, "steps_without_budget": without, "timing_seconds": spent}
    unbudgeted = f"{without} ({choice.reason if choice is not None else f'epochs={cfg.epochs:g}'})" if without else "none"
    run.say(f"max_minutes={cfg.max_minutes:g}: {seconds:.3f} s a step over {TIMED_STEPS} timed steps (batches from the "
            f"epoch's narrowest to its widest; the timing took {spent:.1f} s{', compiling included' if cfg.compile else ''}) -> "
            f"max_steps={cfg.max_steps} (saved in config.yaml, so --resume keeps it); steps without the budget: {unbudgeted}")
    if run.dist.main:
        cfg.save(run.out / "config.yaml")


def replanned(run: Run, replan: Replan, total: int, planned: int) -> int:
    """A budget's check found `planned` steps fit where `total` were planned: say so when it differs, and
    save the new count in config.yaml (so that a run started again from it takes the same steps)."""
    check = replan.plans[-1]
    if planned != total:
        run.say(f"max_minutes={run.cfg.max_minutes:g}: steps to {check['step']} ran at {check['seconds_per_step']:.3f} s "
                f"a step with {replan.spent / 60:.1f} minutes spent -> max_steps={planned} (was {total}; saved in config.yaml)")
        run.cfg.max_steps = planned
        if run.dist.main:
            run.cfg.save(run.out / "config.yaml")
    return planned


def finish(run: Run) -> dict:
    """The final eval loss, then rank 0 writes the model, history, plot and summary."""
    cfg, dist, out = run.cfg, run.dist, run.out
    final_eval = run.evaluate() if run.eval_examples and (dist.main or run.fsdp) else None  # FSDP: every rank takes part
    state = None
    if run.fsdp:
        from vlmkit.train.distributed import full_state_dict

        state = full_state_dict(run.model)  # gathered on rank 0
    if not dist.main:  # rank 0 writes the results; the others are done
        dist.barrier()
        return {"model": str(out / MODEL), "steps": run.steps, "rank": dist.rank}
    if run.eval_examples:
        run.history[-1]["eval_loss"] = final_eval
        run.writer.add_scalar("eval/loss", final_eval, run.steps)
    run.writer.close()
    run.release()
    save_trained(run.model, run.processor, cfg, out / MODEL, state)
    write_history(run.history, out)
    if (out / CHECKPOINT).exists():
        shutil.rmtree(out / CHECKPOINT)
    summary = {
        "model": str(out / MODEL),
        "steps": run.steps,
        "train_seconds": round(run.train_seconds, 1),
        "final_loss": run.history[-1]["loss"],
        "eval_loss": final_eval,
        "trainable_parameters": run.trainable_parameters,
        "skipped_too_long": run.skipped,
        "precision": run.precision.name,
        "precision_reason": run.precision.reason,
        **({"budget": run.budget} if run.budget else {}),
        "recipe": {c.key: {"value": c.value, "reason": c.reason} for c in run.recipe},
    }
    atomic_write_text(out / "train_summary.json", json.dumps(summary, indent=2))
    dist.barrier()
    return summary
