"""Training precision on CPU: step time and held-out accuracy of the quickstart in fp32, bf16 (autocast),
bf16-frozen and int8-frozen (the frozen weights' products in bf16 or int8; int8 on x86 builds of torch).

Two measurements, both on the quickstart's data and recipe (`vlmkit/quickstart.py`):

- `--speed`: the training step time in each precision, measured in one process and alternated
  (fp32, bf16, bf16-frozen, int8-frozen, fp32, ...) so the machine's drift hits all alike; prints the seconds per step
  of each round and the ratios of the medians. On a CPU without bf16 units bf16 is emulated (slow).
- `--accuracy`: the whole quickstart (same steps) for each precision and seed; prints a table and the
  minimum and mean held-out exact match per precision.
- `--compile`: the training step time in the machine's own precision (`precision=auto`) with the LM's blocks
  plain and compiled (`compile=false` / `true`), alternated in one process; the steps' median after the
  first COMPILE_WARM (where the compiled run compiles), and what those first steps cost beyond it: the
  compiling. The first compiled round compiles from nothing unless TorchInductor's disk cache already
  holds the kernels; the later rounds reuse the process's compiled graphs.

    python bench/precision.py --speed [--steps 40] [--rounds 3]
    python bench/precision.py --compile [--steps 200] [--rounds 3]
    python bench/precision.py --accuracy [--seeds 0 1 2] [--precisions fp32 bf16] [--output runs/bench-precision]

The figures behind `precision=auto`'s choice are in docs/precision.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PRECISIONS = ("fp32", "bf16", "bf16-frozen", "int8-frozen")


def cpu_flags() -> str:
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return "unknown"
    return ", ".join(f for f in ("avx512_bf16", "amx_bf16") if f in flags) or "no bf16 units"


def alternated(steps: int, rounds: int, configs: dict[str, list[str]]):
    """Each configuration (the default recipe plus its keys) trained `steps` steps on the quickstart's data in
    turn, `rounds` times, in this process: yields (round, name, config, summary) after each run."""
    from vlmkit.config import load_config
    from vlmkit.quickstart import make_data
    from vlmkit.train.loop import train

    with tempfile.TemporaryDirectory() as tmp:
        train_file, _ = make_data(Path(tmp) / "data", train_images=max(200, 4 * steps), test_images=8)
        for r in range(rounds):
            for name, keys in configs.items():
                cfg = load_config(None, [*keys, f"max_steps={steps}", "save_every=0"], data=str(train_file),
                                  output=f"{tmp}/run-{name}-{r}")
                yield r, name, cfg, train(cfg)


def speed(steps: int, rounds: int) -> None:
    times: dict[str, list[float]] = {p: [] for p in PRECISIONS}
    for r, precision, cfg, summary in alternated(steps, rounds, {p: [f"precision={p}"] for p in PRECISIONS}):
        batch = summary["recipe"].get("batch_size", {}).get("value", cfg.batch_size)
        times[precision].append(summary["train_seconds"] / steps)
        print(f"round {r + 1}: {precision} {times[precision][-1]:.3f} s/step", flush=True)
    print("\n| precision | s/step per round | median |\n|---|---|---|")
    for precision, values in times.items():
        print(f"| {precision} | {' / '.join(f'{v:.3f}' for v in values)} | {statistics.median(values):.3f} |")
    for precision in PRECISIONS[1:]:
        ratio = statistics.median(times["fp32"]) / statistics.median(times[precision])
        print(f"{precision} step speed-up over fp32: {ratio:.2f}x ({steps} steps of {batch}, {rounds} rounds)")


COMPILE_WARM = 5  # the compiled run's first steps: its graphs compile for the first widths it meets


def compile_speed(steps: int, rounds: int) -> None:
    from vlmkit.train import loop

    marks: list[float] = []
    real = loop.clock  # read once before the loop and once after each step

    def clock() -> float:
        marks.append(real())
        return marks[-1]

    loop.clock = clock
    steady: dict[bool, list[float]] = {False: [], True: []}
    first: dict[bool, list[float]] = {False: [], True: []}
    configs = {compiled: [f"compile={str(compiled).lower()}"] for compiled in (False, True)}
    for r, compiled, _, summary in alternated(steps, rounds, configs):
        seconds = [b - a for a, b in zip(marks, marks[1:])]
        marks.clear()
        steady[compiled].append(statistics.median(seconds[COMPILE_WARM:]))
        first[compiled].append(sum(seconds[:COMPILE_WARM]) - COMPILE_WARM * steady[compiled][-1])
        print(f"round {r + 1}: compile={compiled} {steady[compiled][-1]:.3f} s/step, first {COMPILE_WARM} steps "
              f"+{first[compiled][-1]:.1f} s ({summary['precision']})", flush=True)
    print(f"\n| compile | s/step per round (median of steps {COMPILE_WARM + 1}-{steps}) | median | first {COMPILE_WARM} "
          "steps' extra seconds per round |\n|---|---|---|---|")
    for compiled in (False, True):
        print(f"| {str(compiled).lower()} | {' / '.join(f'{v:.3f}' for v in steady[compiled])} | "
              f"{statistics.median(steady[compiled]):.3f} | {' / '.join(f'{v:.1f}' for v in first[compiled])} |")
    ratio = statistics.median(steady[False]) / statistics.median(steady[True])
    print(f"compiled step speed-up: {ratio:.2f}x ({steps} steps, {rounds} rounds)")


def accuracy(seeds: list[int], precisions: list[str], output: str) -> None:
    from vlmkit.quickstart import quickstart

    rows = []
    for seed in seeds:
        for precision in precisions:
            folder = Path(output) / f"{precision}-seed{seed}"
            done = folder / "quickstart.json"
            result = json.loads(done.read_text()) if done.is_file() else quickstart(str(folder), overrides=[f"precision={precision}", f"seed={seed}"])
            rows.append((precision, seed, result))
    types = list(rows[0][2]["by_type"])
    print(f"\n| precision | seed | train min | held-out EM | {' / '.join(types)} |\n|---|---|---|---|---|")
    for precision, seed, r in rows:
        by_type = " / ".join(f"{r['by_type'][t]['exact_match']:.2f}" for t in types)
        print(f"| {precision} | {seed} | {r['train_seconds'] / 60:.1f} | {r['after']['exact_match']:.3f} | {by_type} |")
    print()
    for precision in precisions:
        scores = [r["after"]["exact_match"] for p, _, r in rows if p == precision]
        print(f"{precision}: min {min(scores):.3f}, mean {statistics.mean(scores):.3f} over seeds {seeds}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--speed", action="store_true", help="time training steps in fp32 and bf16, alternated")
    parser.add_argument("--accuracy", action="store_true", help="run the quickstart in fp32 and bf16 for each seed")
    parser.add_argument("--compile", action="store_true", help="time training steps with the LM's blocks plain and "
                        "compiled, alternated")
    parser.add_argument("--steps", type=int, default=None, help="steps per timed run (default 40; --compile 200)")
    parser.add_argument("--rounds", type=int, default=3, help="timed runs per precision (default 3)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS),
                        help="--accuracy: which precisions to run (two processes can share the work; a finished run "
                        "folder is read, not rerun)")
    parser.add_argument("--output", default="runs/bench-precision")
    args = parser.parse_args()
    if not (args.speed or args.accuracy or args.compile):
        parser.error("give --speed, --accuracy, --compile or several")

    import torch

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, CPU bf16: {cpu_flags()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.speed:
        speed(args.steps or 40, args.rounds)
    if args.compile:
        compile_speed(args.steps or 200, args.rounds)
    if args.accuracy:
        accuracy(args.seeds, args.precisions, args.output)


if __name__ == "__main__":
    main()
