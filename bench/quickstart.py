"""Quickstart benchmark: held-out accuracy and training time of the quickstart recipe on this machine.

Runs the full quickstart (dataset, compose, eval, train, eval) and, in the same process, a baseline: the
previous recipe on the same data (`stage=align`: the projector alone learns, 9 image tokens from a 224 px
input, 400 steps of 8, about as many minutes). Prints a table and the ratio of the two accuracies.
Target: held-out exact match >= 0.9 with training under 10 minutes on 2 CPU cores.

    python bench/quickstart.py [--output runs/bench] [--no-baseline] [key=value ...]
"""

from __future__ import annotations

import argparse
import os
import platform

os.environ.setdefault("HF_HUB_OFFLINE", "1")


# The recipe before this one: projector-only training on 9 pooled tokens of a 224 px input.
BASELINE = [
    "stage=align", "method=full", "image_tokens=9", "image_size=224", "image_positions=false", "position_words=false",
    "group_by_length=false", "projector_init=random", "column_words=false",
    "batch_size=8",
    "lr=1e-4", "epochs=1.6",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="runs/bench")
    parser.add_argument("--no-baseline", action="store_true", help="only run the quickstart recipe")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()

    import torch

    from vlmkit.quickstart import quickstart

    runs = {"quickstart recipe": quickstart(f"{args.output}/recipe", overrides=args.overrides)}
    if not args.no_baseline:
        runs["baseline: previous recipe (align, 9 tokens)"] = quickstart(f"{args.output}/align", overrides=[*BASELINE, *args.overrides])

    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"| run | train min | held-out exact match | before training | {' | '.join(next(iter(runs.values()))['by_type'])} |")
    print("|---|---|---|---|" + "---|" * len(next(iter(runs.values()))["by_type"]))
    for name, r in runs.items():
        types = " | ".join(f"{v['exact_match']:.2f}" for v in r["by_type"].values())
        print(f"| {name} | {r['train_seconds'] / 60:.1f} | {r['after']['exact_match']:.3f} | "
              f"{r['before']['exact_match']:.3f} | {types} |")
    if len(runs) == 2:
        recipe, base = (r["after"]["exact_match"] for r in runs.values())
        print(f"\nratio recipe / baseline exact match: {recipe / max(base, 1e-9):.2f}x")
    target = runs["quickstart recipe"]
    met = target["after"]["exact_match"] >= 0.9 and target["train_seconds"] <= 600
    print(f"target (>= 0.9 in <= 10 min training): {'met' if met else 'NOT met'}")


if __name__ == "__main__":
    main()
