"""`max_minutes`: train for about N minutes, on any machine, with a schedule that spans the run.

The number of steps is fixed before the first one: a few whole steps are timed on the run's own batches,
picked across an epoch's from the narrowest to the widest so that they cost what an average step does
(forward, backward, clipping, and the AdamW update through a throwaway optimizer with learning rate 0,
which leaves every weight exactly as it was; the gradients are then thrown away and the random-number
state put back, so the timing leaves no trace), and the budget divided by that time gives the steps. The
count is written into the run's `config.yaml` as `max_steps`, so `--resume` continues the same schedule
exactly, and the summary says what was measured. A faster machine gets more steps, not a shorter run.
The timed steps do not hold the run's checkpoints and evaluation passes; the checks below do. The
timing's own seconds count in the minutes (`spent`): a few steps' worth, or with `compile` the compiling too.

A machine's speed drifts while it trains (shared cores, clocks, memory): on 2-core VMs the steps of a
whole run took 3-11% longer than the few timed ones. So the plan is checked as it goes (`Replan`): at
5, 25, 50, 75, 90 and 97% of the current plan's steps, the steps since the last check give the seconds a
step (the training loop's wall-clock time, its logging, evaluation passes and checkpoints included), and
what is left of the minutes at that pace gives the new number of steps; the schedule's length
follows (the first check falls where the default warm-up ends), the count is saved in `config.yaml`
again, and the checkpoint keeps the checks' state, so a resumed run goes on with the same checks. As the
checks follow the current plan, a plan cut short by a slow spell (another program on the cores) is
checked again before its end and lengthened when the pace comes back.
"""

from __future__ import annotations

import time

import torch

from vlmkit.train.batches import spread_batches
from vlmkit.train.checkpoint import capture_rng, restore_rng

WARM_STEPS = 3  # untimed: the first passes allocate, pick kernels and compile
TIMED_STEPS = 6
CHECKS = (0.05, 0.25, 0.5, 0.75, 0.9, 0.97)  # the shares of the current plan's steps after which it is checked


def steps_for(minutes: float, seconds_per_step: float) -> int:
    """How many steps of `seconds_per_step` fit in `minutes` (at least one)."""
    return max(1, int(minutes * 60 / max(seconds_per_step, 1e-9)))


def warm_batches(timed: list[list]) -> list[list]:
    """WARM_STEPS of the batches to time, of as many widths as they have, the narrowest and the widest first: a
    compiled run (`compile`) compiles a graph for each of the first two widths it meets and, at the third, one
    for any width, all before the timed steps."""
    warm, widths = [], set()
    for batch in [timed[0], timed[-1], *timed[1:-1]]:
        width = max(e.length for e in batch)
        if width not in widths and len(warm) < WARM_STEPS:
            warm.append(batch)
            widths.add(width)
    return warm + [timed[len(timed) // 2]] * (WARM_STEPS - len(warm))


def time_steps(run, runner, rank_slice: slice, make_optimizer) -> float:
    """Seconds per optimizer step (`grad_accum` micro-batches forward and backward, the gradient clipping
    and the update of `make_optimizer(lr)`'s optimizer at lr 0), averaged over TIMED_STEPS steps and over
    the ranks of a multi-process run."""
    cfg, dist, objective = run.cfg, run.dist, run.objective
    rng = capture_rng()
    timed = spread_batches(run.examples, cfg.batch_size * dist.world, cfg.seed + 1, TIMED_STEPS * cfg.grad_accum,
                           cfg.group_by_length)
    warm = [b for b in warm_batches(timed) for _ in range(cfg.grad_accum)]
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


class Replan:
    """Keeps a time-budgeted run on its minutes: after each step, `after_step(step, seconds, total)` adds the
    step's seconds to those spent, and at a check returns the new number of steps (the steps done plus what
    the minutes left buy at the pace of the steps since the last check; never fewer than done) or None.
    The checks fall at CHECKS of the current plan, so a plan cut short by a slow spell is checked again
    before its end, and lengthened when the pace comes back. `mean` averages a number over the ranks of a
    multi-process run, so every rank makes the same plan. `state_dict` / `load_state_dict` carry it
    through a checkpoint."""

    def __init__(self, minutes: float, mean=lambda x: x, spent: float = 0.0):
        self.seconds = minutes * 60
        self.next = 0  # the next check's index in CHECKS
        self.spent = spent  # seconds of the training loop (its evaluation passes and checkpoints too), and before it
        self.last = (0, spent)  # (step, seconds spent) at the last check
        self.plans: list[dict] = []  # {"step", "seconds_per_step", "steps"} at each check
        self.mean = mean

    def due(self, step: int, total: int) -> bool:
        return self.next < len(CHECKS) and step >= max(1, round(CHECKS[self.next] * total))

    def after_step(self, step: int, seconds: float, total: int) -> int | None:
        self.spent += seconds
        if step >= total or not self.due(step, total):
            return None
        while self.due(step, total):
            self.next += 1
        self.spent = self.mean(self.spent)
        pace = (self.spent - self.last[1]) / (step - self.last[0])
        self.last = (step, self.spent)
        steps = step + max(0, int((self.seconds - self.spent) / max(pace, 1e-9)))
        self.plans.append({"step": step, "seconds_per_step": pace, "steps": steps})
        while self.due(step, steps):  # the new plan's checks already passed: the next one is still to come
            self.next += 1
        return steps

    def state_dict(self) -> dict:
        return {k: v for k, v in vars(self).items() if k != "mean"}

    def load_state_dict(self, state: dict) -> None:
        vars(self).update(state)
