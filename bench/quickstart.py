"""Quickstart benchmark: held-out accuracy of `vlmkit quickstart` over training seeds, with its time budget.

For each seed runs the whole quickstart as the command does (dataset, compose, eval, train for about
`--minutes` of steps on this machine, eval) and, in the same process and with the same budget, a baseline:
the previous recipe on the same data (`stage=align`: the projector alone learns, 9 image tokens from a
224 px input, batch 8). Prints one table (a row per run and seed: steps, training minutes, held-out exact
match before and after, by question type), each configuration's minimum and mean over the seeds, and the
ratio of the two minimums.
Target: the minimum over three seeds >= 0.9 held-out exact match, each with at most 10 minutes of training
on 2 CPU cores.

    python bench/quickstart.py [--seeds 0 1 2] [--minutes 10] [--output runs/bench] [--no-baseline] [key=value ...]

`--minutes 0` trains the recipe's own steps instead of a budget. A seed's folder that already holds a
`quickstart.json` is read instead of rerun, so a killed benchmark continues where it stopped. Time: about
`minutes` plus 4 (data, composing, two evaluations) per run; run it alone, since the budget is timed on
this machine and sharing the cores gives fewer steps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


# The recipe before this one: projector-only training on 9 pooled tokens of a 224 px input.
BASELINE = [
    "stage=align", "method=full", "image_tokens=9", "image_size=224", "image_positions=false", "position_words=false",
    "group_by_length=false", "projector_init=random", "column_words=false",
    "batch_size=8",
    "lr=1e-4", "epochs=1.6",
]
TARGET_ACCURACY, TARGET_MINUTES = 0.9, 10.0


def run_seeds(folder: Path, seeds: list[int], minutes: float, overrides: list[str]) -> dict[int, dict]:
    """The quickstart's result for each seed: read from `folder/seed<N>/quickstart.json`, or run now."""
    from vlmkit.quickstart import quickstart

    results = {}
    for seed in seeds:
        out = folder / f"seed{seed}"
        done = out / "quickstart.json"
        if done.is_file():
            results[seed] = json.loads(done.read_text())
        else:
            results[seed] = quickstart(str(out), minutes=minutes or None, overrides=[*overrides, f"seed={seed}"])
    return results


def over_seeds(seeds: dict[int, dict]) -> tuple[float, float, float]:
    """A configuration's minimum and mean held-out exact match over its seeds, and its longest training (min)."""
    scores = [r["after"]["exact_match"] for r in seeds.values()]
    return min(scores), sum(scores) / len(scores), max(r["train_seconds"] for r in seeds.values()) / 60


def table(runs: dict[str, dict[int, dict]]) -> str:
    """One markdown row per configuration and seed, then each configuration's minimum and mean."""
    types = list(next(iter(next(iter(runs.values())).values()))["by_type"])
    lines = [f"| run | seed | steps | train min | held-out exact match | before training | {' | '.join(types)} |",
             "|---|---|---|---|---|---|" + "---|" * len(types)]
    for name, seeds in runs.items():
        for seed, r in seeds.items():
            by_type = " | ".join(f"{r['by_type'][t]['exact_match']:.2f}" if t in r["by_type"] else "-" for t in types)
            lines.append(f"| {name} | {seed} | {r.get('steps', '-')} | {r['train_seconds'] / 60:.1f} | "
                         f"{r['after']['exact_match']:.3f} | {r['before']['exact_match']:.3f} | {by_type} |")
    lines += ["", "| run | seeds | minimum | mean | longest training (min) |", "|---|---|---|---|---|"]
    for name, seeds in runs.items():
        lowest, mean, longest = over_seeds(seeds)
        lines.append(f"| {name} | {len(seeds)} | {lowest:.3f} | {mean:.3f} | {longest:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (default 0 1 2)")
    parser.add_argument("--minutes", type=float, default=TARGET_MINUTES,
                        help=f"each run's time budget, as `vlmkit quickstart --minutes` (default {TARGET_MINUTES:g}; "
                        "0: the recipe's own steps)")
    parser.add_argument("--output", default="runs/bench", help="runs go to OUTPUT/recipe/seedN and OUTPUT/baseline/seedN")
    parser.add_argument("--no-baseline", action="store_true", help="only run the quickstart recipe")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="training config overrides for every run")
    args = parser.parse_args()

    import torch

    out = Path(args.output)
    runs = {"quickstart recipe": run_seeds(out / "recipe", args.seeds, args.minutes, args.overrides)}
    if not args.no_baseline:
        runs["baseline: previous recipe (align, 9 tokens)"] = run_seeds(
            out / "baseline", args.seeds, args.minutes, [*BASELINE, *args.overrides])

    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; budget: "
          + (f"{args.minutes:g} min of training a run" if args.minutes else "the recipe's own steps"))
    print(table(runs))
    (lowest, _, longest), *baseline = (over_seeds(seeds) for seeds in runs.values())
    if baseline:
        print(f"\nratio of the minimums, recipe / baseline: {lowest / max(baseline[0][0], 1e-9):.2f}x")
    met = lowest >= TARGET_ACCURACY and longest < TARGET_MINUTES + 0.05  # to the 0.1 minute the table shows
    print(f"target (minimum >= {TARGET_ACCURACY} over the seeds, each <= {TARGET_MINUTES:g} min of training, to 0.1 min): "
          f"{'met' if met else 'NOT met'} (minimum {lowest:.3f}, longest {longest:.1f} min)")


if __name__ == "__main__":
    main()
