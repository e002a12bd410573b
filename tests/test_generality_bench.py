"""bench/generality.py end to end on tiny random parts: data written once, train, evaluate, table, and a
finished run read back instead of trained again."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import generality  # noqa: E402


def test_generality_trains_evaluates_and_reuses_finished_runs(parts, tmp_path, capsys):
    argv = ["--datasets", "multiturn", "--seeds", "3", "--output", str(tmp_path), "--n-train", "8", "--n-test", "5",
            "--set", f"vision={parts['clip']}", f"llm={parts['llama']}", "image_tokens=4", "batch_size=4", "max_steps=1",
            "--baseline", "lr=0", "--fit-samples", "3"]
    rows = generality.main(argv)
    assert [(r["config"], r["dataset"], r["seed"], r["steps"], r["n"]) for r in rows] == [
        ("default", "multiturn", 3, 1, 5), ("baseline", "multiturn", 3, 1, 5)]
    run = tmp_path / "runs" / "default" / "multiturn-8x5" / "seed3"
    assert {"seed=3", "max_minutes=15", "max_steps=1"} <= set(json.loads((run / "result.json").read_text())["overrides"])
    assert "seed: 3" in (run / "config.yaml").read_text()
    assert (run / "model").is_dir() and (run / "eval.predictions.jsonl").is_file()
    data = tmp_path / "data" / "multiturn-8x5"
    assert len((data / "test.jsonl").read_text().splitlines()) == 5
    # three distinct training samples in file order, scored after training beside the held-out ones
    train_lines, fit_lines = (data / "train.jsonl").read_text().splitlines(), (data / "fit3.jsonl").read_text().splitlines()
    assert len(set(fit_lines)) == 3 and [line for line in train_lines if line in fit_lines] == fit_lines
    fit = json.loads((run / "fit.json").read_text())
    assert fit["n"] == 3 and rows[0]["fit_exact_match"] == fit["exact_match"] and rows[0]["fit_by_type"] == fit["by_type"]
    table = capsys.readouterr().out
    assert "| default | multiturn | 3 |" in table and "| baseline | multiturn | 1 |" in table
    prior = generality.text_only_prior(data / "train.jsonl", data / "test.jsonl")
    assert f"| {rows[0]['exact_match']:.3f} | {prior:.3f} | {fit['exact_match']:.3f} |" in table  # held-out, prior, fit

    stamp = (run / "result.json").stat().st_mtime_ns
    again = generality.main(argv)  # finished: read, not retrained
    assert again == rows and (run / "result.json").stat().st_mtime_ns == stamp


def test_named_baselines_are_training_keys():
    from vlmkit.config import load_config

    for keys in generality.BASELINES.values():  # a misspelt or removed key fails here, not after hours of runs
        load_config(None, keys, data="d.jsonl")
    assert load_config(None, generality.FIRST, data="d.jsonl").vision_feature_layer == -1


def test_types_keep_the_samples_of_those_question_types_only(tmp_path):
    from bench.datasets import make_scenes3
    from vlmkit.data.schema import load_samples, split_reference
    from vlmkit.eval.run import question_type

    train = make_scenes3(tmp_path, "train", 40, 0)
    kept = generality.of_types(train, ["Is there", "which column"])
    assert kept.name == "train-is_there+which_column.jsonl"
    types = [question_type(split_reference(s)[0]) for s in load_samples(train)]
    lines = train.read_text().splitlines()
    assert kept.read_text().splitlines() == [line for line, t in zip(lines, types) if t in ("is there", "which column")]
    assert 0 < len(kept.read_text().splitlines()) < len(lines)
    assert generality.fit_sample(kept, 3).name == "fit3-is_there+which_column.jsonl"
    with pytest.raises(SystemExit, match="how much.*its types: .*is there"):  # names the types the data has
        generality.of_types(train, ["how much"])
