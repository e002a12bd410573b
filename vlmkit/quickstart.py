"""`vlmkit quickstart`: the main job, offline, in one command.

1. Writes the built-in shapes dataset (train + held-out splits from different seeds) as JSONL + PNG.
2. Composes EfficientNet-Lite0 (ImageNet) + SmolLM2-135M-Instruct with a new projector.
3. Evaluates the untrained model on the held-out split, trains it, evaluates again.
4. Saves the model (`DIR/model`), the report (`DIR/eval.json`, as `vlmkit eval` writes it), the loss
   curves (`DIR/loss.png`, TensorBoard logs in `DIR/logs`) and prints a summary.

It trains with the library's default recipe (`vlmkit/recipe.py`: the same keys `vlmkit train` chooses on
any data), plus a time budget on CPU (`max_minutes`, `--minutes`), so it measures the defaults;
docs/experiments.md records the measurements, and bench/quickstart.py repeats them.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from vlmkit.config import load_config
from vlmkit.data.shapes import make_shapes_dataset
from vlmkit.io import atomic_write_text
from vlmkit.recipe import resolve

# One short conversation per image: what limits learning here is the number of optimizer steps, and
# single-question samples give several times more steps per minute than four questions per image.
# Three images in ten ask for the caption instead, which names every shape's colour, kind and side.
# The image comes before the question, as a passage comes before a question about it in text
# (docs/experiments.md has the measurements behind each).
TRAIN_IMAGES = 2000
TEST_IMAGES = 200
CAPTION_SHARE = 0.3
QUESTION_FIRST = False
CPU_MINUTES = 10.0  # `vlmkit quickstart` on a CPU: about this many minutes of training steps


def default_minutes(device_type: str) -> float | None:
    """The command's time budget when `--minutes` is not given: on CPU about CPU_MINUTES of training
    (the recipe's six epochs of 2,000 images take about 22 on 2 cores), on a GPU the recipe's own steps."""
    return CPU_MINUTES if device_type == "cpu" else None


def make_data(folder: Path, train_images: int = TRAIN_IMAGES, test_images: int = TEST_IMAGES) -> tuple[Path, Path]:
    train = make_shapes_dataset(
        folder, "train", train_images, seed=0, questions_per_image=1, captions=False, caption_share=CAPTION_SHARE,
        question_first=QUESTION_FIRST,
    )
    test = make_shapes_dataset(
        folder, "test", test_images, seed=1, questions_per_image=1, captions=False, question_first=QUESTION_FIRST
    )
    return train, test


def quickstart(output: str = "runs/quickstart", minutes: float | None = None, overrides: list[str] | None = None) -> dict:
    from vlmkit.eval.run import evaluate
    from vlmkit.infer.engine import Engine
    from vlmkit.build import for_training
    from vlmkit.train.loop import log, train

    out = Path(output)
    started = time.time()
    log(f"[1/5] writing the shapes dataset to {out / 'data'}")
    train_file, test_file = make_data(out / "data")
    budget = [f"max_minutes={minutes}"] if minutes else []  # as many steps as fit on this machine
    cfg, choices = resolve(load_config(None, budget + list(overrides or []), data=str(train_file), output=str(out)))

    log("[2/5] composing the model: EfficientNet-Lite0 + SmolLM2-135M-Instruct + new projector")
    model, processor = for_training(cfg)

    log(f"[3/5] evaluating the untrained model on {test_file.name}")
    engine = Engine(model, processor)
    before = evaluate(test_file, out / "eval_before.json", engine=engine, max_new_tokens=8)

    log("[4/5] training")
    summary = train(cfg, model_and_processor=(model, processor), recipe=choices)

    log(f"[5/5] evaluating the trained model on {test_file.name}")
    engine = Engine(model.eval(), processor)
    after = evaluate(test_file, out / "eval.json", engine=engine, max_new_tokens=8)

    result = {
        "before": {k: before[k] for k in ("exact_match", "vqa_accuracy")},
        "after": {k: after[k] for k in ("exact_match", "vqa_accuracy", "bleu4", "rougeL", "cider")},
        "by_type": after["by_type"],
        "steps": summary["steps"],
        "budget": summary.get("budget"),  # max_minutes: the timed seconds a step and the steps chosen
        "train_seconds": summary["train_seconds"],
        "precision": f"{summary['precision']} ({summary['precision_reason']})",
        "total_seconds": round(time.time() - started, 1),
        "model": summary["model"],
        "report": str(out / "eval.json"),
    }
    atomic_write_text(out / "quickstart.json", json.dumps(result, indent=2) + "\n")
    print_summary(result, test_file, out)
    return result


def budget_line(budget: dict | None) -> list[str]:
    """How many steps the time budget gave on this machine, against the recipe's own (a slower machine gets
    fewer, and learns less)."""
    if not budget:
        return []
    minutes, plans = budget["max_minutes"], budget.get("plans") or []
    pace = plans[-1]["seconds_per_step"] if plans else budget["seconds_per_step"]
    line = (f"  {budget['steps']} steps: {minutes:g} minute{'' if minutes == 1 else 's'} at "
            f"{pace:.2f} s a step on this machine")
    if budget.get("timed_plan", budget["steps"]) != budget["steps"]:
        line += f" ({budget['timed_plan']} planned from the first timed steps, {budget['seconds_per_step']:.2f} s)"
    if budget.get("steps_without_budget"):
        line += (f", {budget['steps'] / budget['steps_without_budget']:.0%} of the recipe's own "
                 f"{budget['steps_without_budget']} (`--minutes 0`)")
    return [line]


def print_summary(result: dict, test_file: Path, out: Path) -> None:
    b, a = result["before"], result["after"]
    image = sorted((out / "data" / "images").glob("test_*.png"))[0]
    lines = [
        "",
        "vlmkit quickstart done",
        f"  held-out exact match: {b['exact_match']:.3f} before -> {a['exact_match']:.3f} after training "
        f"(VQA accuracy {a['vqa_accuracy']:.3f})",
        "  by question: " + ", ".join(f"{k} {v['exact_match']:.2f}" for k, v in result["by_type"].items()),
        f"  training took {result['train_seconds'] / 60:.1f} min in {result['precision']}; everything "
        f"{result['total_seconds'] / 60:.1f} min",
        *budget_line(result.get("budget")),
        f"  model:  {result['model']}",
        f"  report: {result['report']}  (loss curves: {out / 'loss.png'})",
        "",
        "next:",
        f"  vlmkit generate --model {result['model']} --image {image} --prompt 'How many shapes are there?'",
        f"  vlmkit eval --model {result['model']} --data {test_file} --output {out / 'eval2.json'}",
        f"  vlmkit inspect {result['model']}",
        f"  vlmkit chat --model {result['model']}",
        f"  vlmkit quickstart --minutes 20 --output {out}-20min   # 20 minutes of steps on this machine",
    ]
    print("\n".join(lines), file=sys.stdout)
