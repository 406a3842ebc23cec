"""`seg fit` with 2 CPU processes (DDP, gloo): trains, validates with the numbers of a single process, logs once."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import wandb_log
from tiny_run import tiny_config


# 7 cases: 4 train (one batch of 2 per rank), 3 validation. Three volumes on two ranks: Lightning-style
# DistributedSampler pads rank 1 with a repeat of the first volume, which a naive mean would count twice.
VAL_CASES = ["synth_000", "synth_003", "synth_005"]
TINY = {
    "trainer": {"max_epochs": 1, "accelerator": "cpu", "log_every_n_steps": 1, "num_sanity_val_steps": 0},
    "model": {"channels": [8, 16, 32], "strides": [2, 2], "sw_batch_size": 2},
    "data": {"patch_size": [32, 32, 16], "batch_size": 2, "num_workers": 0, "val_cases": VAL_CASES},
}
METRICS = ["val/dice_liver", "val/dice_lesion", "val/dice_mean", "val/hd95_liver", "val/hd95_lesion", "val/hd95_mean"]


def seg(*args, tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    # No W&B credentials whatever the machine has: the offline fallback, and its message, are part of the test.
    env.update(OMP_NUM_THREADS="1", NETRC=str(tmp_path / "no-netrc"))
    return subprocess.run([sys.executable, "-m", "seg", *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=600)


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-6, abs=1e-6)


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    return tiny_config(tmp_path_factory.mktemp("ddp"), TINY, cases=7)


def test_ddp_fit_logs_once_and_scores_like_one_process(config, tmp_path):
    run = tmp_path / "run"
    fit = seg("fit", "--config", config, "--trainer.default_root_dir", run, "--trainer.devices", 2,
              "--trainer.strategy", "ddp", tmp_path=tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert fit.stderr.count("logging offline") == 1  # the fallback message from rank zero only

    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 1 and (run / "checkpoints" / "best.ckpt").is_file()
    (offline,) = (run / "wandb").glob("offline-run-*")  # one W&B run, not one per rank
    validation = [row for row in wandb_log.history(offline) if "val/dice_mean" in row]
    assert len(validation) == 1
    logged = validation[0]

    # Overlays: each validation case once, though rank 1 validated a repeat of one of them.
    with open(run / "overlays" / "epoch=0" / "concentration.csv") as f:
        rows = [(r["case_id"], r["level"]) for r in csv.DictReader(f)]
    assert sorted({case for case, _ in rows}) == VAL_CASES and len(rows) == len(set(rows))

    # One process scoring the same checkpoint on the same three volumes.
    validate = seg("validate", "--config", config, "--trainer.default_root_dir", tmp_path / "single",
                   "--logging", "csv", "--overlays.every_n_epochs", 0, "--ckpt_path", run / "checkpoints" / "last.ckpt",
                   tmp_path=tmp_path)
    assert validate.returncode == 0, validate.stderr[-3000:]
    (metrics,) = (tmp_path / "single" / "csv").glob("version_*/metrics.csv")
    with open(metrics) as f:
        (single,) = [row for row in csv.DictReader(f) if row.get("val/dice_mean")]
    for key in METRICS:
        assert same(logged[key], float(single[key])), (key, logged[key], single[key])


def test_each_rank_builds_and_caches_only_its_validation_volumes(config, tmp_path):
    from types import SimpleNamespace

    from seg.data import NiftiDataModule

    data = yaml.safe_load(config.read_text())["data"]
    dm = NiftiDataModule(**data)
    dm.trainer = SimpleNamespace(world_size=2, global_rank=1, is_global_zero=False, default_root_dir=str(tmp_path),
                                 strategy=SimpleNamespace(root_device=torch.device("cpu")))
    dm.setup("validate")
    assert len(dm.val_dataset) == 3
    assert len(dm.val_dataset.dataset.dataset) == 2  # rank 1 of 2: the second volume and the padding repeat
    order = [batch["case_id"][0] for batch in dm.val_dataloader()]
    assert order == [VAL_CASES[1], VAL_CASES[0]]  # DistributedSampler's share, which Lightning leaves in place
