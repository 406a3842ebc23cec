"""`seg fit | validate | test` through the real command line, on a tiny synthetic dataset."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import wandb_log

TINY = {
    "trainer": {"max_epochs": 2, "accelerator": "cpu", "limit_train_batches": 3, "log_every_n_steps": 1},
    "model": {"channels": [8, 16, 32], "strides": [2, 2], "sw_batch_size": 2},
    "data": {"patch_size": [32, 32, 16], "batch_size": 2, "num_workers": 0},
}


def seg(*args, env_extra=None, cwd=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "seg", *map(str, args)], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    from seg.data.synthetic import write_dataset

    return write_dataset(tmp_path_factory.mktemp("data") / "synth", cases=6, test_cases=2, size=(32, 32, 24))


@pytest.fixture(scope="module")
def config(tmp_path_factory, dataset) -> Path:
    path = tmp_path_factory.mktemp("config") / "tiny.yaml"
    cfg = {**TINY, "data": {**TINY["data"], "root": str(dataset)}}
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory, config) -> Path:
    """A 2-epoch fit with W&B (offline: no credentials), with a secret in the environment."""
    out = tmp_path_factory.mktemp("run")
    result = seg("fit", "--config", config, "--trainer.default_root_dir", out,
                 env_extra={"WANDB_API_KEY": "", "SEG_TEST_SECRET": "do-not-print"})
    assert result.returncode == 0, result.stderr[-3000:]
    (out / "stderr.txt").write_text(result.stderr)
    return out


def test_fit_leaves_weights_only_checkpoints(run):
    for name in ("best.ckpt", "last.ckpt"):
        checkpoint = torch.load(run / "checkpoints" / name, weights_only=True)
        assert checkpoint["epoch"] in (0, 1)
        assert checkpoint["hyper_parameters"]["out_channels"] == 3  # background + the two synthetic classes
        assert checkpoint["hyper_parameters"]["class_names"] == ["liver", "lesion"]
        pre = checkpoint["seg"]["preprocessing"]
        assert pre["orientation"] == "RAS" and len(pre["spacing"]) == 3 and pre["patch_size"] == [32, 32, 16]
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 6  # 2 epochs x 3 batches
    assert not list((run / "checkpoints").glob("*.tmp*"))


def test_fit_says_wandb_is_offline_and_logs_metrics(run):
    assert "logging offline" in (run / "stderr.txt").read_text()
    (run_dir,) = (run / "wandb").glob("offline-run-*")
    rows = wandb_log.history(run_dir)
    validation = [r for r in rows if "val/dice_mean" in r]
    assert len(validation) == 2  # one per epoch
    volumes = len(json.loads((run / "split.json").read_text())["val"])
    for row in validation:
        assert 0.0 <= row["val/dice_liver"] <= 1.0 and 0.0 <= row["val/dice_lesion"] <= 1.0
        assert row["val/dice_mean"] == pytest.approx((row["val/dice_liver"] + row["val/dice_lesion"]) / 2, abs=1e-6)
        for name in ("liver", "lesion"):
            assert 0 <= row[f"val/missing_{name}"] <= volumes
    # HD95 (`--model.hd95 final`, the default) at the last validation only: defined (and positive) unless the class
    # is missing from every volume's prediction
    assert "val/hd95_mean" not in validation[0]
    for name in ("liver", "lesion"):
        hd95 = validation[-1][f"val/hd95_{name}"]
        assert math.isnan(hd95) if validation[-1][f"val/missing_{name}"] == volumes else hd95 > 0
    assert any("train/loss_step" in r for r in rows)


def test_wandb_config_is_the_nested_cli_config(run):
    """The run's W&B config has the sections of config.yaml (trainer settings included), not flat keys."""
    (run_dir,) = (run / "wandb").glob("offline-run-*")
    logged = wandb_log.config(run_dir)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert {"model", "data", "trainer", "seed_everything"} <= set(logged)
    assert not {"lr", "root", "patch_size", "channels"} & set(logged)  # the module's and datamodule's flat keys
    for section in ("model", "data", "trainer"):
        assert logged[section] == saved[section], section
    assert logged["trainer"]["precision"] == saved["trainer"]["precision"] and "max_time" in logged["trainer"]
    assert logged["model"]["channels"] == [8, 16, 32] and logged["data"]["patch_size"] == [32, 32, 16]


def test_saved_config_holds_no_secrets(run, config):
    saved = (run / "config.yaml").read_text()
    assert "do-not-print" not in saved
    assert yaml.safe_load(saved)["data"]["root"] == yaml.safe_load(config.read_text())["data"]["root"]


def test_resume_from_last_continues_the_global_step(run, config):
    result = seg("fit", "--config", config, "--trainer.default_root_dir", run, "--trainer.max_epochs", 3,
                 "--ckpt_path", "last", "--logging", "csv")
    assert result.returncode == 0, result.stderr[-3000:]
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 9 and last["epoch"] == 2


def test_validate_and_test_score_a_checkpoint(run, config):
    for command in ("validate", "test"):
        result = seg(command, "--config", config, "--trainer.default_root_dir", run, "--logging", "csv",
                     "--ckpt_path", run / "checkpoints" / "best.ckpt")
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"{'val' if command == 'validate' else 'test'}/dice_mean" in result.stdout


@pytest.mark.parametrize("override, expected", [
    (["--model.no_such_key", "1"], "no_such_key"),
    (["--model.lr", "fast"], "lr"),
    (["--data.patch_size", "[32, 32]"], "patch_size"),
])
def test_config_errors_are_one_clear_message(config, tmp_path, override, expected):
    result = seg("fit", "--config", config, "--trainer.default_root_dir", tmp_path, "--logging", "csv", *override)
    assert result.returncode != 0
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_fit_refuses_a_dataset_that_fails_its_checks(config, dataset, tmp_path):
    import shutil

    import nibabel as nib
    import numpy as np

    broken = tmp_path / "broken"
    shutil.copytree(dataset, broken)
    label_path = sorted((broken / "labelsTr").iterdir())[0]
    label = nib.load(label_path)
    data = np.asarray(label.dataobj).copy()
    data[0, 0, 0] = 7  # a label value dataset.json does not declare
    nib.save(nib.Nifti1Image(data, label.affine, label.header), label_path)
    result = seg("fit", "--config", config, "--data.root", broken, "--trainer.default_root_dir", tmp_path / "out",
                 "--logging", "csv")
    assert result.returncode == 1
    assert label_path.name in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_run_ending_before_its_first_scheduled_validation_is_still_validated(config, tmp_path):
    result = seg("fit", "--config", config, "--trainer.default_root_dir", tmp_path, "--logging", "csv",
                 "--trainer.max_epochs", 1, "--trainer.check_val_every_n_epoch", 100, "--overlays.every_n_epochs", 0)
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    best = torch.load(tmp_path / "checkpoints" / "best.ckpt", weights_only=True)  # the final validation scored it
    (score,) = [v["best_model_score"] for k, v in best["callbacks"].items() if "val/dice_mean" in k]
    assert best["global_step"] == 3 and 0 <= float(score) <= 1
    scored = seg("test", "--config", config, "--trainer.default_root_dir", tmp_path, "--logging", "csv",
                 "--ckpt_path", "last", "--overlays.every_n_epochs", 0)
    assert scored.returncode == 0, scored.stderr[-3000:]
    assert "test/dice_mean" in scored.stdout


def test_ema_decay_checkpoints_the_moving_average_of_the_weights(config, tmp_path):
    # Two steps with d = 0.5: the average is 0.5 w1 + 0.5 w2 (it starts as the first step's weights). w2 is the
    # trained model the checkpoint keeps beside it; w1 comes from the same seeded run stopped after one step.
    common = ("--config", config, "--logging", "csv", "--trainer.max_epochs", 1, "--overlays.every_n_epochs", 0,
              "--seed_everything", 7)
    averaged = seg("fit", *common, "--trainer.default_root_dir", tmp_path / "ema", "--trainer.limit_train_batches", 2,
                   "--ema_decay", 0.5)
    assert averaged.returncode == 0, averaged.stderr[-3000:]
    one_step = seg("fit", *common, "--trainer.default_root_dir", tmp_path / "one", "--trainer.limit_train_batches", 1)
    assert one_step.returncode == 0, one_step.stderr[-3000:]
    last = torch.load(tmp_path / "ema" / "checkpoints" / "last.ckpt", weights_only=True)
    w1 = torch.load(tmp_path / "one" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    w2, average = last["current_model_state"], last["state_dict"]
    assert last["global_step"] == 2 and int(last["averaging_state"]["n_averaged"]) == 2
    weights = [k for k, v in w2.items() if k.startswith("model.") and v.is_floating_point()]
    assert weights and set(weights) <= set(average)
    moved = [k for k in weights if not torch.equal(w1[k], w2[k])]
    assert len(moved) > len(weights) / 2  # the second step changed the weights: the test can tell them apart
    for key in weights:
        torch.testing.assert_close(average[key], 0.5 * w1[key] + 0.5 * w2[key], rtol=1e-5, atol=1e-6)
    # best.ckpt, scored by the validation, holds the same average; predict and export read `state_dict`
    best = torch.load(tmp_path / "ema" / "checkpoints" / "best.ckpt", weights_only=True)
    assert all(torch.equal(best["state_dict"][k], average[k]) for k in weights)


def test_ema_decay_outside_0_1_is_one_clear_message(config, tmp_path):
    result = seg("fit", "--config", config, "--trainer.default_root_dir", tmp_path, "--logging", "csv",
                 "--ema_decay", 1.0)
    assert result.returncode != 0 and "--ema_decay 1.0" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "checkpoints").exists()
