"""`max_minutes`: train for about N minutes, on any machine, with a schedule that spans the run.

The number of steps is fixed before the first one: a few whole steps are timed on the run's own batches,
picked across an epoch's from the narrowest to the widest so that they cost what an average step does
(forward, backward, clipping, and the AdamW update through a throwaway optimizer with learning rate 0,
which leaves every weight exactly as it was; the gradients are then thrown away and the random-number
state put back, so the timing leaves no trace), and the budget divided by that time gives the steps. The
count is written into the run's `config.yaml` as `max_steps`, so `--resume` continues the same schedule
exactly, and the summary says what was measured. A faster machine gets more steps, not a shorter run.
Checkpoints and evaluation passes are not timed and come on top.
"""

from __future__ import annotations

import time

import torch

from vlmkit.train.batches import spread_batches
from vlmkit.train.checkpoint import capture_rng, restore_rng

WARM_STEPS = 2  # untimed: the first passes allocate and pick kernels
TIMED_STEPS = 6


def steps_for(minutes: float, seconds_per_step: float) -> int:
    """How many steps of `seconds_per_step` fit in `minutes` (at least one)."""
    return max(1, int(minutes * 60 / max(seconds_per_step, 1e-9)))


def time_steps(run, runner, rank_slice: slice, make_optimizer) -> float:
    """Seconds per optimizer step (`grad_accum` micro-batches forward and backward, the gradient clipping
    and the update of `make_optimizer(lr)`'s optimizer at lr 0), averaged over TIMED_STEPS steps and over
    the ranks of a multi-process run."""
    cfg, dist, objective = run.cfg, run.dist, run.objective
    rng = capture_rng()
    timed = spread_batches(run.examples, cfg.batch_size * dist.world, cfg.seed + 1, TIMED_STEPS * cfg.grad_accum,
                           cfg.group_by_length)
    warm = [timed[len(timed) // 2]] * (WARM_STEPS * cfg.grad_accum)  # a batch of the median width
    batches = iter(warm + timed)
    trainable = [p for p in run.model.parameters() if p.requires_grad]
    probe = make_optimizer(0.0)  # its state is thrown away with it
    elapsed = 0.0
    for k in range(WARM_STEPS + TIMED_STEPS):
        start = time.perf_counter()
        for _ in range(cfg.grad_accum):
            batch = run.to_device(objective.batch(next(batches)[rank_slice]))
            with run.autocast():
                loss, _ = objective.loss(runner, batch)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
        probe.step()
        if run.device.type == "cuda":
            torch.cuda.synchronize(run.device)
        if k >= WARM_STEPS:
            elapsed += time.perf_counter() - start
        run.model.zero_grad(set_to_none=True)
    del probe
    restore_rng(rng)
    return dist.all_sum(elapsed / TIMED_STEPS) / dist.world
