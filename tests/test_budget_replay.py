"""bench/budget_replay.py: a time-budgeted run's recorded step times replayed through the budget's checks."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import budget_replay  # noqa: E402


def test_a_run_that_slowed_down_is_replayed_to_its_minutes(tmp_path, capsys, monkeypatch):
    from torch.utils.tensorboard import SummaryWriter

    run = tmp_path / "run"
    # timed at 0.5 s a step: 120 steps for one minute; the run took 1 s a step from step 11 on (115 s in all)
    (run / "logs").mkdir(parents=True)
    writer = SummaryWriter(str(run / "logs"))
    now = 1000.0
    for step in range(1, 121):
        now += 0.5 if step <= 10 else 1.0
        writer.add_scalar("train/loss", 1.0, step, walltime=now)
    writer.close()
    (run / "train_summary.json").write_text(json.dumps({"budget": {"max_minutes": 1.0, "seconds_per_step": 0.5, "steps": 120}}))

    seconds = budget_replay.step_seconds(run / "logs")
    assert len(seconds) == 120 and seconds[:10] == [0.5] * 10 and seconds[10:] == [1.0] * 110
    steps, spent, plans = budget_replay.replay(seconds, 1.0, 120)
    assert 59.0 < spent <= 60.0 and steps == plans[-1]["steps"] < 120  # what one minute at the recorded pace buys
    monkeypatch.setattr(sys, "argv", ["budget_replay.py", str(run)])
    budget_replay.main()
    row = capsys.readouterr().out.splitlines()[-1]
    assert row.startswith(f"| {run} | 1 | 0.500 | 120, 1.9 | {steps}, 1.0 |")

    (run / "train_summary.json").write_text(json.dumps({}))  # not a budgeted run: one clear error
    with pytest.raises(SystemExit, match="no `budget`"):
        budget_replay.main()
