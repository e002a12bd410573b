"""Distillation benchmark: a teacher trained on labelled shapes labels fresh, unlabelled shapes; a student
learns from those labels alone. Offline, with the commands a user runs.

1. `vlmkit train` a teacher on the quickstart's labelled shapes (2000 images, one question each, 3 in 10
   asking for the caption): the defaults, as `vlmkit quickstart` trains (an existing OUT/teacher is used).
2. A fresh split of unlabelled images (its questions, without answers: the generator keeps the truth).
3. `vlmkit distill --teacher T --tasks qa --questions Q --samples S --temperature 1`: the teacher answers
   each question S times; the filters keep the majority answer (self-consistency) and drop the rest.
4. `vlmkit train` a student with the defaults on OUT/data.jsonl only, and another on the same images with
   their true answers (the same number of rows), both with the defaults (or for the same minutes).
5. `vlmkit eval` the teacher and both students on the same labelled held-out split.

Reported in one table: the teacher's label accuracy on the distilled images (every sampled reply, then
the ones the filters kept), and each model's held-out exact match. Target: the filters raise the label
accuracy, and the student reaches >= 90% of the teacher's held-out exact match. Every step's output is
kept, and a step whose output exists is not run again (so a stopped run resumes).

    python bench/distill.py [--output runs/bench-distill] [--teacher-minutes 0] [--student-minutes 0]
                            [--images 2000] [--samples 3] [--parallel]

(0 minutes: the recipe's own number of steps.) Results: docs/distill.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]


def command(*argv: str) -> list[str]:
    print("$ vlmkit " + " ".join(argv), flush=True)
    return [sys.executable, "-m", "vlmkit.cli", *argv]


def env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def run(*argv: str) -> None:
    subprocess.run(command(*argv), check=True, env=env())


def train(data: Path, output: Path, minutes: float) -> subprocess.Popen | None:
    """Start `vlmkit train` with the defaults and a time budget, unless its model is already there."""
    if (output / "train_summary.json").exists():
        return None
    log = open(output.with_suffix(".log"), "w")
    budget = [f"max_minutes={minutes}"] if minutes else []  # 0: the recipe's own number of steps
    return subprocess.Popen(command("train", "--data", str(data), "--output", str(output), *budget),
                            env=env(), stdout=log, stderr=subprocess.STDOUT)


def wait(*processes: subprocess.Popen | None) -> None:
    for p in processes:
        if p is not None and p.wait() != 0:
            raise SystemExit(f"a training run failed: see {p.args[-2]}.log")


def evaluate(model: Path, test: Path, output: Path) -> dict:
    if not output.exists():
        run("eval", "--model", str(model / "model"), "--data", str(test), "--output", str(output))
    return json.loads(output.read_text())


def unlabelled(out: Path, n: int) -> tuple[Path, list[dict]]:
    """A fresh shapes split (another seed and split name), its questions in a file without answers, and
    the truth: one {"image", "question", "answer"} per image."""
    from vlmkit.data.shapes import make_shapes_dataset
    from vlmkit.quickstart import CAPTION_SHARE

    folder = out / "unlabelled"
    truth_file = folder / "truth.jsonl"
    if not truth_file.exists():
        split = make_shapes_dataset(folder, "fresh", n, seed=7, questions_per_image=1, captions=False, caption_share=CAPTION_SHARE)
        truth = []
        for line in split.read_text().splitlines():
            row = json.loads(line)
            question = next(p["text"] for p in row["messages"][0]["content"] if p["type"] == "text")
            truth.append({"image": row["images"][0], "question": question, "answer": row["messages"][1]["content"][0]["text"]})
        (folder / "questions.jsonl").write_text("".join(json.dumps({"image": t["image"], "question": t["question"]}) + "\n" for t in truth))
        truth_file.write_text("".join(json.dumps(t) + "\n" for t in truth))
        split.unlink()  # the labels stay out of the distillation's reach
    return folder, [json.loads(line) for line in truth_file.read_text().splitlines()]


def label_accuracy(records: list[dict], truth: dict) -> dict:
    from vlmkit.eval.metrics import exact_match

    def accuracy(rs):
        return sum(exact_match(r["reply"], [truth[r["image"]]]) for r in rs) / max(len(rs), 1)

    kept = [r for r in records if r["status"] == "kept"]
    return {"all": accuracy(records), "kept": accuracy(kept), "n_all": len(records), "n_kept": len(kept)}


def ground_truth_data(records: list[dict], truth: dict, path: Path) -> int:
    """The kept pairs' images and questions with their true answers: a dataset of the same size."""
    from vlmkit.distill.manifest import chat_row

    rows = [chat_row(r, truth[r["image"]]) for r in records if r["status"] == "kept"]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="runs/bench-distill")
    parser.add_argument("--teacher-minutes", type=float, default=0.0,
                        help="the teacher's training budget; 0 (default): the recipe's own steps, as `vlmkit quickstart`")
    parser.add_argument("--student-minutes", type=float, default=0.0,
                        help="each student's training budget; 0 (default): the recipe's own steps")
    parser.add_argument("--images", type=int, default=2000, help="unlabelled images to distill (default 2000)")
    parser.add_argument("--samples", type=int, default=3, help="sampled answers per question (default 3)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--parallel", action="store_true", help="train the two students at the same time")
    args = parser.parse_args()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()

    from vlmkit.quickstart import make_data

    if not (out / "data" / "test.jsonl").exists():
        make_data(out / "data")
    train_file, test_file = out / "data" / "train.jsonl", out / "data" / "test.jsonl"
    wait(train(train_file, out / "teacher", args.teacher_minutes))

    folder, truth_rows = unlabelled(out, args.images)
    distilled = out / "distilled"
    if not (distilled / "summary.json").exists():
        run("distill", "--teacher", str(out / "teacher"), "--images", str(folder / "images"), "--tasks", "qa",
            "--questions", str(folder / "questions.jsonl"), "--samples", str(args.samples), "--temperature",
            str(args.temperature), "--max-new-tokens", "24", "--batch-size", "16", "--output", str(distilled))
    from vlmkit.distill.manifest import load_manifest

    records = [dict(r, image=os.path.realpath(r["image"])) for r in load_manifest(distilled)]
    truth = {os.path.realpath(folder / t["image"]): t["answer"] for t in truth_rows}
    labels = label_accuracy(records, truth)
    n_rows = ground_truth_data(records, truth, out / "ground_truth.jsonl")

    # the two students train for the same minutes, one after the other (or side by side, one thread each)
    if args.parallel:
        os.environ["OMP_NUM_THREADS"] = "1"  # two processes with every core's threads each thrash (measured: 3 s a step each, 0.5 s alone)
    student = train(distilled / "data.jsonl", out / "student", args.student_minutes)
    if not args.parallel:
        wait(student)
    wait(student, train(out / "ground_truth.jsonl", out / "student_gt", args.student_minutes))
    runs = {
        "teacher (2000 labelled images)": ("teacher", train_file),
        f"student on {n_rows} distilled labels": ("student", distilled / "data.jsonl"),
        f"student on the same {n_rows} true labels": ("student_gt", out / "ground_truth.jsonl"),
    }
    table = []
    for name, (run_dir, _) in runs.items():
        report = evaluate(out / run_dir, test_file, out / f"eval_{run_dir}.json")
        summary = json.loads((out / run_dir / "train_summary.json").read_text())
        table.append((name, summary["train_seconds"] / 60, summary.get("steps"), report["exact_match"]))

    summary = json.loads((distilled / "summary.json").read_text())
    print(f"\ndistilled: {len(truth_rows)} images x 1 question x {args.samples} samples = {labels['n_all']} replies; "
          f"kept {labels['n_kept']}; dropped by reason {summary['dropped_by_reason']}")
    print("\n| | train min | steps | label accuracy on the distilled images | held-out exact match |")
    print("|---|---|---|---|---|")
    print(f"| teacher's labels, every sampled reply | | | {labels['all']:.3f} ({labels['n_all']}) | |")
    print(f"| teacher's labels, kept by the filters | | | {labels['kept']:.3f} ({labels['n_kept']}) | |")
    for name, minutes, steps, em in table:
        print(f"| {name} | {minutes:.1f} | {steps} | | {em:.3f} |")
    teacher_em, student_em = table[0][3], table[1][3]
    ratio = student_em / max(teacher_em, 1e-9)
    print(f"\nfilters raise label accuracy: {'yes' if labels['kept'] > labels['all'] else 'NO'} "
          f"({labels['all']:.3f} -> {labels['kept']:.3f})")
    print(f"student / teacher held-out exact match: {ratio:.2f} (target >= 0.90: {'met' if ratio >= 0.9 else 'NOT met'})")
    print(f"wall time {(time.time() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
