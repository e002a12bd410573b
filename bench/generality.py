"""Generality benchmark: does the default `vlmkit train` give a good model on a user's own small dataset?

For each dataset of bench/datasets.py (written once, fixed: training split from seed 0, held-out split from
seed 1, no image in both) and each training seed, trains with the library defaults plus
`max_minutes=<minutes>` and `seed=<seed>`, evaluates the held-out split with `vlmkit.eval.run.evaluate`
and prints one markdown table (held-out exact match overall and per question type; BLEU-4 and CIDEr for
the caption dataset; the exact match on training samples too, so a low score reads as underfitting or as
overfitting), then the minimum and mean per dataset. `--baseline key=value ...` runs a second
configuration (the defaults plus those keys) in the same process, beside the first.

    python bench/generality.py [--datasets scenes3 mnist ...] [--minutes 15] [--seeds 0 1 2]
                               [--output runs/generality] [--baseline key=value ...] [--set key=value ...]
                               [--fit-samples 250]

A run folder with a `result.json` is read instead of rerun, so a killed benchmark continues where it
stopped (a run killed before its result is started over). `--set` applies keys to every configuration
(e.g. other parts); `--n-train` / `--n-test` write smaller (or larger) datasets, for a quick look, and `--types`
keeps one or more question types alone.
Time: about `minutes` plus a few minutes (feature caching, saving, held-out generation) per run, so the
defaults (7 datasets x 3 seeds x 15 min) take about 6 hours on 2 CPU cores, per configuration.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import shutil
import sys
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
# Import bench.datasets as a package module: bench/ itself stays off sys.path, so bench/datasets.py can
# never shadow the `datasets` package that transformers looks for.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

from bench.datasets import CAPTIONED, DATASETS  # noqa: E402

# `--baseline previous`: the library's defaults before the default recipe (vlmkit/recipe.py) chose keys from
# the data and parts: the LM fine-tuned in full at 1e-4, batch 16, one epoch, 9 tokens from 224 px, no position
# embeddings or column words, a randomly started projector
PREVIOUS = ["method=full", "lr=1e-4", "batch_size=16", "epochs=1", "image_tokens=9", "image_positions=false",
            "column_words=false", "position_words=false", "projector_init=random", "group_by_length=false",
            "train_on_prompt=false"]
# `--baseline first`: the first default recipe (2026-12-02), before the CNN's last block, adapters at 1e-3 and
# at least 2,000 steps: its rule (at least 750 steps, at most three epochs) gives 750 on every dataset here
FIRST = ["vision_feature_layer=-1", "lr=5e-4", "max_steps=750", "train_on_prompt=false"]
# `--baseline three`: the recipe of 2026-12-03 before six epochs: at least 2,000 steps and at most three epochs,
# which is three epochs on every dataset here
THREE = ["epochs=3"]
# `--baseline replies`: the recipe of 2026-12-02 before the questions' words were trained too (replies only, three
# epochs)
REPLIES = ["train_on_prompt=false", *THREE]
# `--baseline lastblock`: the recipe of 2026-12-02 to 2026-12-07, reading the built-in CNN's last block (320
# channels) instead of the block before it
LASTBLOCK = ["vision_feature_layer=-2"]
BASELINES = {"previous": PREVIOUS, "first": FIRST, "replies": REPLIES, "three": THREE, "lastblock": LASTBLOCK}
TRAIN_SEED, TEST_SEED = 0, 1  # the data seeds: the datasets are fixed, only training seeds vary
SHORT_TOKENS, CAPTION_TOKENS = 12, 64  # max_new_tokens when generating the held-out replies
FIT_SAMPLES = 250  # training samples scored after training: how well the run fitted what it saw


def write_data(name: str, folder: Path, n_train: int, n_test: int) -> tuple[Path, Path]:
    """The dataset's two splits, written once: a folder that holds both JSONL files is reused."""
    from vlmkit.io import atomic_write_folder

    train, test = folder / "train.jsonl", folder / "test.jsonl"
    if not (train.is_file() and test.is_file()):
        maker = DATASETS[name][0]
        log(f"writing {name} ({n_train} training, {n_test} held-out samples) to {folder}")
        atomic_write_folder(folder, lambda tmp: (maker(tmp, "train", n_train, TRAIN_SEED),
                                                 maker(tmp, "test", n_test, TEST_SEED)))
    return train, test


def of_types(path: Path, types: list[str]) -> Path:
    """The samples of `path` whose last question (the one scored) is of one of `types` (its first two words,
    lower case: `vlmkit.eval.run.question_type`), written once beside it as `<stem>-<types>.jsonl`: one
    question type trained alone tells how many steps that type needs when every step holds it."""
    from vlmkit.data.schema import load_samples, split_reference
    from vlmkit.eval.run import question_type
    from vlmkit.io import atomic_write_text

    wanted = {t.lower() for t in types}
    out = path.with_name(f"{path.stem}-{'+'.join(sorted(wanted)).replace(' ', '_')}.jsonl")
    if not out.is_file():
        lines = [line for line in path.read_text().splitlines() if line.strip()]  # bench/datasets.py: one sample a line
        kinds = [question_type(split_reference(sample)[0]) for sample in load_samples(path)]
        kept = [line for line, kind in zip(lines, kinds, strict=True) if kind in wanted]
        if not kept:
            found = sorted(set(kinds))
            raise SystemExit(f"--types {' '.join(types)}: no sample of {path} asks those; its types: {', '.join(found)}")
        atomic_write_text(out, "".join(line + "\n" for line in kept))
    return out


def fit_sample(train: Path, n: int) -> Path:
    """`n` training samples drawn at random, in file order (`fit<n>.jsonl` beside the training split, written
    once; not every k-th line, which would see only some types of a file that cycles through them): scored
    after training, they say whether a run fitted its data (training score low too) or learned it by heart
    (training score far above the held-out one)."""
    from vlmkit.io import atomic_write_text

    path = train.with_name(f"{train.stem.replace('train', f'fit{n}', 1)}.jsonl")  # fit250.jsonl, fit250-is_there.jsonl
    if not path.is_file():
        lines = train.read_text().splitlines()
        chosen = sorted(random.Random(TRAIN_SEED).sample(range(len(lines)), min(n, len(lines))))
        atomic_write_text(path, "".join(lines[k] + "\n" for k in chosen))
    return path


def text_only_prior(train: Path, test: Path) -> float:
    """Exact match of answering each held-out question with the training split's most common answer to the
    same question text (else to questions of its type): what a model that ignores the image can reach."""
    from vlmkit.data.schema import load_samples, split_reference
    from vlmkit.eval.metrics import exact_match
    from vlmkit.eval.run import question_type

    def question(messages: list[dict]) -> str:
        return " ".join(p["text"] for p in messages[-1]["content"] if p["type"] == "text").strip().lower()

    by_text, by_type = {}, {}
    for sample in load_samples(train):
        m = sample.messages
        for k, turn in enumerate(m):
            if turn["role"] == "assistant" and k > 0:
                answer = "".join(p["text"] for p in turn["content"] if p["type"] == "text")
                by_text.setdefault(question(m[:k]), Counter())[answer] += 1
                by_type.setdefault(question_type(m[:k]), Counter())[answer] += 1
    scores = []
    for sample in load_samples(test):
        prompt, reference, _ = split_reference(sample)
        counts = by_text.get(question(prompt)) or by_type.get(question_type(prompt)) or Counter({"": 1})
        scores.append(exact_match(counts.most_common(1)[0][0], [reference]))
    return sum(scores) / len(scores)


def run_one(run_dir: Path, train_file: Path, test_file: Path, overrides: list[str], max_new_tokens: int,
            fit_file: Path | None = None) -> dict:
    """Train with the defaults plus `overrides`, evaluate the held-out split (and `fit_file`, training samples);
    the result is saved in `run_dir`."""
    from vlmkit.build import for_training
    from vlmkit.config import load_config
    from vlmkit.eval.run import evaluate
    from vlmkit.infer.engine import Engine
    from vlmkit.recipe import resolve
    from vlmkit.io import atomic_write_text
    from vlmkit.train.loop import train

    done = run_dir / "result.json"
    if done.is_file():
        result = json.loads(done.read_text())
        log(f"{run_dir}: finished before; reading {done.name}")
        if result.get("overrides") != overrides:
            log(f"warning: {done} was trained with {' '.join(result.get('overrides', []))}; delete its folder to rerun")
        return result
    if run_dir.exists():  # killed before its result: its minutes would be split, so it starts over
        log(f"{run_dir}: unfinished run; starting it over")
        shutil.rmtree(run_dir)
    cfg, choices = resolve(load_config(None, overrides, data=str(train_file), output=str(run_dir)))
    model, processor = for_training(cfg)
    summary = train(cfg, model_and_processor=(model, processor), recipe=choices)
    engine = Engine(model.eval(), processor)
    report = evaluate(test_file, run_dir / "eval.json", engine=engine, max_new_tokens=max_new_tokens)
    fit = fit_file and evaluate(fit_file, run_dir / "fit.json", engine=engine, max_new_tokens=max_new_tokens)
    result = {
        "overrides": overrides,
        "train_seconds": summary["train_seconds"],
        "steps": summary["steps"],
        **{k: report[k] for k in ("n", "exact_match", "vqa_accuracy", "bleu4", "rougeL", "cider")},
        "by_type": report["by_type"],
        **({"fit_exact_match": fit["exact_match"], "fit_by_type": fit["by_type"]} if fit else {}),
    }
    atomic_write_text(done, json.dumps(result, indent=2) + "\n")
    del model, processor
    gc.collect()
    return result


def log(msg: str) -> None:
    print(f"[generality] {msg}", file=sys.stderr, flush=True)


def tables(rows: list[dict], priors: dict[str, float]) -> str:
    """One row per run, then the minimum and mean per configuration and dataset (markdown)."""
    lines = [
        "| config | dataset | seed | train min | steps | held-out exact match | text-only prior | training samples' "
        "exact match | BLEU-4 | CIDEr | exact match by question type (held-out / training samples) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fit_types = r.get("fit_by_type", {})
        types = ", ".join(f"{k} {v['exact_match']:.2f}" + (f" / {fit_types[k]['exact_match']:.2f}" if k in fit_types else "")
                          + f" (n={v['n']})" for k, v in r["by_type"].items())
        fit = f"{r['fit_exact_match']:.3f}" if "fit_exact_match" in r else "-"
        lines.append(
            f"| {r['config']} | {r['dataset']} | {r['seed']} | {r['train_seconds'] / 60:.1f} | {r['steps']} | "
            f"{r['exact_match']:.3f} | {priors[r['dataset']]:.3f} | {fit} | {r['bleu4']:.3f} | {r['cider']:.3f} | {types} |"
        )
    lines += ["", "| config | dataset | runs | min exact match | mean exact match | min CIDEr | mean CIDEr |",
              "|---|---|---|---|---|---|---|"]
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["config"], r["dataset"]), []).append(r)
    for (config, dataset), rs in groups.items():
        em, cider = [r["exact_match"] for r in rs], [r["cider"] for r in rs]
        caption = (f"{min(cider):.3f} | {sum(cider) / len(cider):.3f}" if dataset in CAPTIONED else "- | -")
        lines.append(f"| {config} | {dataset} | {len(rs)} | {min(em):.3f} | {sum(em) / len(em):.3f} | {caption} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS), metavar="NAME",
                        help=f"which datasets (default: all: {', '.join(DATASETS)})")
    parser.add_argument("--minutes", type=float, default=15.0, help="training minutes per run (max_minutes); 0: the recipe's own number of steps")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds (the data stays fixed)")
    parser.add_argument("--output", default="runs/generality")
    parser.add_argument("--baseline", nargs="+", default=None, metavar="key=value",
                        help="also run a second configuration: the defaults plus these keys; `previous`: the "
                             "library's defaults before the default recipe; `first`: the first default recipe; "
                             "`replies`: the recipe training the replies only (train_on_prompt=false), at three epochs; "
                             "`three`: the recipe at three epochs, its cap before six; `lastblock`: the recipe "
                             "reading the built-in CNN's last block (-2), its layer before -3")
    parser.add_argument("--set", nargs="+", default=[], metavar="key=value", help="keys for every configuration")
    parser.add_argument("--n-train", type=int, default=None, help="training samples per dataset (default: its own)")
    parser.add_argument("--n-test", type=int, default=None, help="held-out samples per dataset (default: its own)")
    parser.add_argument("--fit-samples", type=int, default=FIT_SAMPLES,
                        help=f"training samples scored after training, to tell underfitting from overfitting "
                             f"(default {FIT_SAMPLES}; 0: none)")
    parser.add_argument("--types", nargs="+", default=None, metavar="TYPE",
                        help="train and score only the samples whose last question is of these types (its first two "
                             "words, as the tables' by-type columns name them, e.g. \"is there\"): how many steps one "
                             "type needs when every step holds it")
    args = parser.parse_args(argv)

    import torch

    out = Path(args.output)
    configs = {"default": []}
    if args.baseline:
        named = len(args.baseline) == 1 and BASELINES.get(args.baseline[0])
        configs["baseline"] = named or list(args.baseline)
    rows, priors = [], {}
    for name in args.datasets:
        _, n_train, n_test = DATASETS[name]
        n_train, n_test = args.n_train or n_train, args.n_test or n_test
        sized = name if (n_train, n_test) == DATASETS[name][1:] else f"{name}-{n_train}x{n_test}"
        train_file, test_file = write_data(name, out / "data" / sized, n_train, n_test)
        if args.types:
            train_file, test_file = of_types(train_file, args.types), of_types(test_file, args.types)
            sized = f"{sized}-{train_file.stem.split('-', 1)[1]}"
        priors[name] = text_only_prior(train_file, test_file)
        fit_file = fit_sample(train_file, min(args.fit_samples, n_train)) if args.fit_samples > 0 else None
        tokens = CAPTION_TOKENS if name in CAPTIONED else SHORT_TOKENS
        for seed in args.seeds:
            for config, keys in configs.items():
                overrides = [f"max_minutes={args.minutes:g}", f"seed={seed}", *args.set, *keys]
                log(f"{config} / {sized} / seed {seed}: {' '.join(overrides)}")
                run_dir = out / "runs" / config / sized / f"seed{seed}"
                result = run_one(run_dir, train_file, test_file, overrides, tokens, fit_file)
                rows.append({"config": config, "dataset": name, "seed": seed, **result})

    machine = (f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
               f"{torch.get_num_threads()} threads; {args.minutes:g} training minutes a run")
    configs_line = "; ".join(f"{c}: defaults + {' '.join(k) or '(nothing)'}" for c, k in configs.items())
    text = f"{machine}\n{configs_line}\n\n{tables(rows, priors)}\n"
    print("\n" + text)
    from vlmkit.io import atomic_write_text

    atomic_write_text(out / "summary.md", text)
    return rows


if __name__ == "__main__":
    main()
