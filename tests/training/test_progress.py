"""`seg fit > log`: plain progress lines when the output is not a terminal; when `seg fit` validates (the last
epoch always, within a share of a time-bounded run)."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiny_run import tiny_config

# 3 epochs of 2 batches, validated every 2 epochs: Lightning alone validates epoch 1 only, never the last (2).
TINY = {
    "trainer": {"max_epochs": 3, "accelerator": "cpu", "limit_train_batches": 2, "log_every_n_steps": 1,
                "check_val_every_n_epoch": 2},
    "model": {"channels": [8, 16, 32], "strides": [2, 2], "sw_batch_size": 2, "hd95": False},
    "data": {"patch_size": [32, 32, 16], "batch_size": 1, "num_workers": 0, "val_fraction": 0.34, "check": False},
}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """`seg fit ... > log 2>&1`: stdout and stderr a file, as under Docker or SLURM."""
    root = tmp_path_factory.mktemp("progress")
    config = tiny_config(root, TINY, cases=6)
    out = root / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    with open(root / "log", "w") as log:
        code = subprocess.run([sys.executable, "-m", "seg", "fit", "--config", str(config), "--logging", "csv",
                               "--trainer.default_root_dir", str(out), "--progress.every_n_seconds", "0"],
                              stdout=log, stderr=subprocess.STDOUT, env=env, timeout=600).returncode
    (out / "log").write_text((root / "log").read_text())
    assert code == 0, (root / "log").read_text()[-3000:]
    return out


def test_fit_to_a_file_writes_a_plain_progress_line_per_step(run):
    log = (run / "log").read_text()
    assert "\r" not in log and "\x1b[" not in log  # no bar redrawn in place, no terminal colours
    lines = [line for line in log.splitlines() if line.startswith("epoch ")]
    pattern = re.compile(r"epoch (\d)/2 \| step (\d)/6 \| [\d.]+ steps/s \| loss ([\d.]+) \| ETA \d+:\d\d:\d\d")
    matches = [pattern.match(line) for line in lines]
    assert all(matches), lines
    assert [(int(m[1]), int(m[2])) for m in matches] == [(0, 1), (0, 2), (1, 3), (1, 4), (2, 5), (2, 6)]
    assert all(float(m[3]) > 0 for m in matches)
    # after the first validation (epoch index 1) the lines carry its mean Dice
    assert "val dice_mean" not in "".join(lines[:4]) and all(" (epoch 1)" in line for line in lines[4:])
    validations = [line for line in log.splitlines() if line.startswith("validation epoch")]
    assert [line.split(" | ")[0] for line in validations] == ["validation epoch 1", "validation epoch 2"]
    for line in validations:
        fields = dict(part.rsplit(" ", 1) for part in line.split(" | ")[1:])
        assert set(fields) == {"dice_mean", "dice_liver", "dice_lesion", "missing_liver", "missing_lesion"}
        assert 0 <= float(fields["dice_liver"]) <= 1 and fields["missing_lesion"] in ("0", "1", "2")


def test_the_last_epoch_is_validated_with_overlays_even_off_schedule(run):
    with open(next((run / "csv").rglob("metrics.csv"))) as f:
        validated = sorted({int(row["epoch"]) for row in csv.DictReader(f) if row.get("val/dice_mean")})
    assert validated == [1, 2]
    assert sorted(p.name for p in (run / "overlays").iterdir()) == ["epoch=1", "epoch=2"]
    assert (run / "overlays" / "epoch=2" / "concentration.csv").is_file()
    best = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)
    assert best["epoch"] in (1, 2) and best["global_step"] in (4, 6)
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6


def test_each_validation_logs_its_seconds_and_the_share_of_the_run_so_far(run):
    with open(next((run / "csv").rglob("metrics.csv"))) as f:
        rows = [r for r in csv.DictReader(f) if r.get("time/validation_share")]
    assert [int(r["step"]) for r in rows] == [4, 6]  # the validations of epochs 1 and 2
    shares = [float(r["time/validation_share"]) for r in rows]
    seconds = [float(r["time/validation_seconds"]) for r in rows]
    assert all(0 < v < 1 for v in shares) and all(v > 0 for v in seconds)


def test_the_validation_schedule_makes_the_last_epoch_or_a_timed_out_one_due_and_restores_the_schedule():
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import Timer

    from seg.training.callbacks import ValidationSchedule

    timer = Timer(duration={"seconds": 60})
    timer.time_remaining = lambda stage="train": remaining  # the Timer's own clock, stood in for
    trainer = SimpleNamespace(max_epochs=10, current_epoch=3, check_val_every_n_epoch=5, should_stop=False,
                              callbacks=[timer], strategy=SimpleNamespace(broadcast=lambda value: value),
                              num_training_batches=100)
    final = ValidationSchedule()
    remaining = 30.0
    final.on_train_epoch_start(trainer, None)
    final.on_train_batch_end(trainer, None, None, None, 0)
    assert trainer.check_val_every_n_epoch == 5  # neither the last epoch nor out of time: Lightning's schedule
    remaining = 0.0
    final.on_train_batch_end(trainer, None, None, None, 1)
    assert trainer.check_val_every_n_epoch == 1  # the time is up: this epoch is validated when the Timer stops
    final.on_train_end(trainer, None)
    assert trainer.check_val_every_n_epoch == 5
    trainer.current_epoch, timer.time_remaining = 9, lambda stage="train": None
    final.on_train_epoch_start(trainer, None)
    assert trainer.check_val_every_n_epoch == 1  # the last of max_epochs


def _clocked_trainer(elapsed: dict, **kw):
    """A trainer stand-in whose `max_time` Timer reads `elapsed["s"]` seconds into the run."""
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import Timer

    timer = Timer(duration={"seconds": 600})
    timer.time_elapsed = lambda stage="train": elapsed["s"]
    timer.time_remaining = lambda stage="train": 600 - elapsed["s"]
    return SimpleNamespace(max_epochs=-1, current_epoch=0, check_val_every_n_epoch=1, should_stop=False,
                           callbacks=[timer], strategy=SimpleNamespace(broadcast=lambda value: value),
                           num_training_batches=4, sanity_checking=False, **kw)


def _epoch(schedule, trainer, elapsed, epoch: int, end_s: float) -> bool:
    """Run epoch `epoch`'s hooks up to its last batch at `end_s`; True when Lightning would validate it."""
    trainer.current_epoch = epoch
    schedule.on_train_epoch_start(trainer, None)
    for batch in range(trainer.num_training_batches):
        elapsed["s"] = end_s - 0.1 * (trainer.num_training_batches - 1 - batch)
        schedule.on_train_batch_end(trainer, None, None, None, batch)
    return (epoch + 1) % trainer.check_val_every_n_epoch == 0


def test_a_time_bounded_run_skips_the_validations_that_would_exceed_the_share():
    from seg.training.callbacks import ValidationSchedule

    elapsed = {"s": 0.0}
    trainer = _clocked_trainer(elapsed)
    schedule = ValidationSchedule(max_share=0.1)
    schedule.validation_cost = None  # no sanity check: the first due validation runs, and is measured
    assert _epoch(schedule, trainer, elapsed, 0, end_s=5.0)
    schedule.validation_seconds, schedule.validation_cost = 10.0, 10.0  # it took 10 s
    # 10 + 2 * 10 > 0.1 * (T + 2 * 10) until T = 280 s: epochs ending before are not validated
    validated = [e for e, end in enumerate([30, 100, 200, 279, 290], start=1)
                 if _epoch(schedule, trainer, elapsed, e, end_s=end)]
    assert validated == [5] and schedule.skipped == [1, 2, 3, 4]
    # the skips are undone at each epoch's start: the user's schedule again
    trainer.current_epoch = 6
    schedule.on_train_epoch_start(trainer, None)
    assert trainer.check_val_every_n_epoch == 1
    # time running out makes the epoch due whatever the share
    schedule.validation_seconds = 1000.0
    assert _epoch(schedule, trainer, elapsed, 6, end_s=600.0)
    schedule.on_train_end(trainer, None)
    assert trainer.check_val_every_n_epoch == 1


def test_the_share_applies_only_to_time_bounded_runs_and_can_be_turned_off():
    from seg.training.callbacks import ValidationSchedule

    elapsed = {"s": 0.0}
    for schedule, trainer in ((ValidationSchedule(max_share=None), _clocked_trainer(elapsed)),
                              (ValidationSchedule(max_share=1.0), _clocked_trainer(elapsed)),
                              (ValidationSchedule(max_share=0.1), _clocked_trainer(elapsed))):
        if schedule.max_share == 0.1:
            trainer.callbacks = []  # bounded by epochs only (no Timer)
            trainer.max_epochs = 100
        schedule.validation_seconds, schedule.validation_cost = 100.0, 100.0
        assert all(_epoch(schedule, trainer, elapsed, e, end_s=10.0 * (e + 1)) for e in range(3))
        assert schedule.skipped == []
    with pytest.raises(ValueError):
        ValidationSchedule(max_share=0)


def test_the_sanity_check_estimates_the_first_validation_and_a_resume_keeps_the_spent_share():
    from types import SimpleNamespace

    from seg.training.callbacks import ValidationSchedule

    schedule = ValidationSchedule()
    trainer = SimpleNamespace(num_sanity_val_batches=[2], num_val_batches=[10], sanity_checking=True)
    schedule.on_sanity_check_start(trainer, None)
    schedule._validation_start -= 3.0  # the sanity check's 2 volumes took 3 s
    schedule.on_sanity_check_end(trainer, None)
    assert schedule.validation_cost == pytest.approx(15.0, abs=0.5) and schedule.validation_seconds == 0
    schedule.validation_seconds = 42.0
    resumed = ValidationSchedule()
    resumed.load_state_dict(schedule.state_dict())
    assert resumed.validation_seconds == 42.0 and resumed.validation_cost == schedule.validation_cost
