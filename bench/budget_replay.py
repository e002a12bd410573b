"""How closely `max_minutes` keeps to its minutes: finished time-budgeted runs replayed through the budget's checks.

A run trained with `max_minutes` records when each step ended (its TensorBoard events) and what the
timing before the first step measured (`train_summary.json`'s `budget`). Replaying those step times
through `vlmkit.train.budget.Replan` shows what the checks made of the same machine's drift: how many
steps they plan and how many minutes those take, against the plan fixed by the timing alone. Steps past
the end of the recorded run are given the mean time of its last tenth.

    python bench/budget_replay.py RUN [RUN ...]   # run folders (config.yaml, train_summary.json, logs/)

The figures are in docs/experiments.md ("the budget checked as the run goes").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def step_seconds(logs: Path) -> list[float]:
    """Seconds each step took, from the wall times of its `train/loss` events (the first step: the second's)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logs))
    events.Reload()
    ends = {e.step: e.wall_time for e in events.Scalars("train/loss")}
    seconds = [ends[s] - ends[s - 1] for s in range(2, max(ends) + 1)]
    return seconds[:1] + seconds


def replay(seconds: list[float], minutes: float, planned: int) -> tuple[int, float, list[dict]]:
    """(steps, seconds spent, the checks' plans) with `seconds[k]` the time of step k + 1."""
    from vlmkit.train.budget import Replan

    tail = seconds[-max(1, len(seconds) // 10):]
    later = sum(tail) / len(tail)
    replan, total, step = Replan(minutes), planned, 0
    while step < total:
        step += 1
        total = replan.after_step(step, seconds[step - 1] if step <= len(seconds) else later, total) or total
    return total, replan.spent, replan.plans


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="time-budgeted run folders")
    args = parser.parse_args()
    print("| run | minutes | timed s a step | the timing's plan: steps, minutes | with the checks: steps, minutes | the checks' plans |")
    print("|---|---|---|---|---|---|")
    for run in args.runs:
        budget = json.loads((run / "train_summary.json").read_text()).get("budget")
        if not budget:
            sys.exit(f"{run}: train_summary.json holds no `budget`: the run was not trained with max_minutes")
        seconds = step_seconds(run / "logs")
        planned = budget.get("timed_plan", budget["steps"])
        if len(seconds) < planned:
            sys.exit(f"{run}: {len(seconds)} steps recorded of the {planned} the timing planned")
        steps, spent, plans = replay(seconds, budget["max_minutes"], planned)
        print(f"| {run} | {budget['max_minutes']:g} | {budget['seconds_per_step']:.3f} | {planned}, "
              f"{sum(seconds[:planned]) / 60:.1f} | {steps}, {spent / 60:.1f} | "
              + ", ".join(f"{p['steps']} at step {p['step']} ({p['seconds_per_step']:.3f} s)" for p in plans) + " |")


if __name__ == "__main__":
    main()
