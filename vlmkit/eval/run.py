"""Evaluate a model on a dataset: generate for every sample, score against its last assistant turn.

The report (JSON) has the top-level keys `n`, `exact_match`, `vqa_accuracy`, `bleu4`, `rougeL`, `cider`
(see `vlmkit.eval.metrics`), plus `by_type` when samples can be grouped by their question. Predictions go
to a JSONL beside it (`<report>.predictions.jsonl`), one object per sample in the data's order. Existing
predictions can be scored without a model (`predictions=`). Both files are written atomically.
"""

from __future__ import annotations

import json
from pathlib import Path

from vlmkit.data.schema import load_samples, split_reference
from vlmkit.errors import VlmkitError
from vlmkit.eval.metrics import exact_match, score
from vlmkit.io import atomic_write_text


def read_predictions(path: str | Path, n: int) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise VlmkitError(f"predictions file {path} not found")
    predictions = []
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            predictions.append(str(row["prediction"]))
        except (json.JSONDecodeError, TypeError, KeyError):
            raise VlmkitError(f'{path}:{line_no}: expected a JSON object with a "prediction" string') from None
    if len(predictions) != n:
        raise VlmkitError(f"{path}: {len(predictions)} predictions for {n} samples; one per sample, in the data's order")
    return predictions


def question_type(prompt: list[dict]) -> str:
    """The first words of the final question: groups the report by question template."""
    text = " ".join(p["text"] for p in prompt[-1]["content"] if p["type"] == "text").strip().lower()
    return " ".join(text.split()[:2]) or "(empty)"


def evaluate(
    data: str | Path,
    output: str | Path,
    engine=None,
    predictions: str | Path | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 32,
) -> dict:
    """Score `engine`'s replies (or a predictions file) on `data`; writes the report and predictions."""
    samples = load_samples(data)
    split = [split_reference(s) for s in samples]
    references = [[ref] for _, ref, _ in split]
    if predictions is not None:
        preds = read_predictions(predictions, len(samples))
    else:
        if engine is None:
            raise VlmkitError("give a model (--model) or existing predictions (--predictions)")
        conversations = [prompt for prompt, _, _ in split]
        images = [list(s.images[:n]) for s, (_, _, n) in zip(samples, split)]
        preds = engine.generate(
            conversations, images, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=True
        )
    report = score(preds, references)
    groups: dict[str, list[float]] = {}
    for (prompt, ref, _), pred in zip(split, preds):
        groups.setdefault(question_type(prompt), []).append(exact_match(pred, [ref]))
    report["by_type"] = {k: {"n": len(v), "exact_match": sum(v) / len(v)} for k, v in sorted(groups.items())}
    output = Path(output)
    rows = [
        {"where": s.where, "prediction": p, "reference": r[0], "correct": bool(exact_match(p, r))}
        for s, p, r in zip(samples, preds, references)
    ]
    atomic_write_text(predictions_path(output), "".join(json.dumps(r) + "\n" for r in rows))
    atomic_write_text(output, json.dumps(report, indent=2) + "\n")
    return report


def predictions_path(report: Path) -> Path:
    return report.with_name(report.stem + ".predictions.jsonl")
