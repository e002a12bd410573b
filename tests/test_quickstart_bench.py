"""bench/quickstart.py without training (seeds already run are read back, the others run with the seed and
the budget, the table gives each configuration's minimum over the seeds), and the quickstart's line on its budget."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import quickstart as bench  # noqa: E402


def result(score: float, seconds: float) -> dict:
    return {"before": {"exact_match": 0.0}, "after": {"exact_match": score}, "steps": 100, "train_seconds": seconds,
            "by_type": {"count": {"exact_match": score}, "side": {"exact_match": 1.0}}}


def test_finished_seeds_are_read_and_the_others_run_with_their_seed_and_budget(tmp_path, monkeypatch):
    import vlmkit.quickstart

    (tmp_path / "seed0").mkdir()
    (tmp_path / "seed0" / "quickstart.json").write_text(json.dumps(result(0.95, 500)))
    calls = []

    def fake_quickstart(output, minutes=None, overrides=None):
        calls.append((output, minutes, overrides))
        return result(0.9, 600)

    monkeypatch.setattr(vlmkit.quickstart, "quickstart", fake_quickstart)
    runs = bench.run_seeds(tmp_path, [0, 2], 10.0, ["lr=1e-3"])
    assert runs[0]["after"]["exact_match"] == 0.95 and runs[2]["after"]["exact_match"] == 0.9
    assert calls == [(str(tmp_path / "seed2"), 10.0, ["lr=1e-3", "seed=2"])]
    bench.run_seeds(tmp_path / "own", [1], 0.0, [])  # --minutes 0: the recipe's own steps, no budget
    assert calls[-1][1] is None


def test_table_gives_each_configuration_its_minimum_and_mean_over_seeds():
    text = bench.table({"recipe": {0: result(0.98, 590), 1: result(0.90, 610)}, "baseline": {0: result(0.5, 600)}})
    assert "| recipe | 1 | 100 | 10.2 | 0.900 | 0.000 | 0.90 | 1.00 |" in text
    assert "| recipe | 2 | 0.900 | 0.940 | 10.2 |" in text and "| baseline | 1 | 0.500 | 0.500 | 10.0 |" in text


def test_baseline_keys_are_training_keys():
    from vlmkit.config import load_config

    load_config(None, bench.BASELINE, data="d.jsonl")  # a removed key fails here, not after an hour of runs


def test_the_quickstart_summary_says_what_share_of_the_recipes_steps_the_budget_gave():
    from vlmkit.quickstart import budget_line

    budget = {"max_minutes": 10.0, "seconds_per_step": 0.625, "steps": 960, "steps_without_budget": 3000}
    assert budget_line(budget) == ["  960 steps: 10 minutes at 0.62 s a step on this machine, 32% of the recipe's own "
                                   "3000 (`--minutes 0`)"]
    checked = {**budget, "timed_plan": 1000, "steps": 900, "plans": [{"step": 50, "seconds_per_step": 0.66, "steps": 900}]}
    assert budget_line(checked) == ["  900 steps: 10 minutes at 0.66 s a step on this machine (1000 planned from the "
                                    "first timed steps, 0.62 s), 30% of the recipe's own 3000 (`--minutes 0`)"]
    assert budget_line({**budget, "max_minutes": 1.0})[0].startswith("  960 steps: 1 minute at")
    assert budget_line(None) == []  # max_steps or --minutes 0: no budget to explain
