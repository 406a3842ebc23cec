"""Crash safety: `kill -9` during `seg fit`, then `--ckpt_path last` resumes to the end with the global step going on."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tiny_run import tiny_config


EPOCHS, STEPS = 3, 3  # 3 epochs of 3 training batches: 9 optimizer steps in all
TINY = {
    "trainer": {"max_epochs": EPOCHS, "accelerator": "cpu", "limit_train_batches": STEPS, "log_every_n_steps": 1,
                "check_val_every_n_epoch": 1, "enable_checkpointing": True},
    "model": {"channels": [8, 16, 32], "strides": [2, 2], "sw_batch_size": 2, "hd95": False},
    "data": {"patch_size": [32, 32, 16], "batch_size": 2, "num_workers": 0},
}


def command(*args) -> list[str]:
    return [sys.executable, "-m", "seg", *map(str, args)]


def quiet_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    return {**env, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    return tiny_config(tmp_path_factory.mktemp("crash"), TINY, cases=6)


def test_checkpoints_go_through_the_atomic_writer(config, tmp_path):
    """Both checkpoint callbacks (best, last) save through the strategy's AtomicCheckpointIO, in DDP too."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from seg.data import NiftiDataModule
    from seg.training.checkpoint_io import AtomicCheckpointIO
    from seg.training.cli import SegCLI
    from seg.training.module import SegmentationModule

    for extra in ([], ["--trainer.strategy", "ddp", "--trainer.devices", "2"]):
        cli = SegCLI(SegmentationModule, NiftiDataModule, run=False, args=[
            "--config", str(config), "--trainer.default_root_dir", str(tmp_path), "--logging", "csv", *extra])
        assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
        callbacks = {c.filename: c for c in cli.trainer.checkpoint_callbacks}
        assert set(callbacks) == {"best", "last"}
        # no symlink or copy for last.ckpt: Lightning links only with save_last="link"
        assert all(isinstance(c, ModelCheckpoint) and c.save_last in (None, False) for c in callbacks.values())
        assert callbacks["last"].monitor is None  # saved at every validation, improved or not


def test_kill_9_then_resume_from_last(config, tmp_path):
    run = tmp_path / "run"
    checkpoints = run / "checkpoints"
    args = ["fit", "--config", config, "--trainer.default_root_dir", run, "--logging", "csv",
            "--overlays.every_n_epochs", "0"]
    fit = subprocess.Popen(command(*args), env=quiet_env(), start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (checkpoints / "last.ckpt").exists():
            assert fit.poll() is None, f"fit ended before its first checkpoint:\n{fit.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "no last.ckpt after 300 s"
            time.sleep(0.05)
    finally:
        os.killpg(fit.pid, signal.SIGKILL)  # the whole group: data workers too
        fit.wait()
        fit.stderr.close()
    assert fit.returncode == -signal.SIGKILL

    # Every file with a checkpoint's name is whole; a save cut short leaves only a dot-named temp file.
    for path in checkpoints.glob("*.ckpt"):
        assert torch.load(path, weights_only=True)["state_dict"], path
    killed_at = torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"]
    assert 0 < killed_at < EPOCHS * STEPS

    # What a kill in the middle of a save leaves: a torn temp file beside last.ckpt. It must not be resumed from.
    torn = checkpoints / f".tmp-{fit.pid}-last.ckpt"
    torn.write_bytes((checkpoints / "last.ckpt").read_bytes()[:1000])

    resumed = subprocess.run(command(*args, "--ckpt_path", "last"), env=quiet_env(), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    last = torch.load(checkpoints / "last.ckpt", weights_only=True)
    assert last["global_step"] == EPOCHS * STEPS > killed_at
    assert last["epoch"] == EPOCHS - 1
    assert not torn.exists()  # cleaned at the next save
    assert not list(checkpoints.glob(".tmp-*"))
    # The resumed run's own log starts where the killed one stopped, not at step 0.
    metrics = sorted((run / "csv").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))
    with open(metrics[-1]) as f:
        steps = [int(row["step"]) for row in csv.DictReader(f) if row.get("train/loss_step")]
    assert steps and min(steps) >= killed_at and max(steps) == EPOCHS * STEPS - 1
