"""`seg fit --logging mlflow`: a real MLflow store in the run folder, read back with MLflow's own client."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tiny_run import tiny_config

mlflow = pytest.importorskip("mlflow", reason="MLflow is not installed (pip install 'seg[mlflow]')")

TINY = {
    "trainer": {"max_epochs": 2, "accelerator": "cpu", "limit_train_batches": 1, "log_every_n_steps": 1},
    "model": {"channels": [8, 16, 32], "strides": [2, 2], "sw_batch_size": 2, "hd95": False},
    "data": {"patch_size": [32, 32, 16], "batch_size": 1, "num_workers": 0, "val_fraction": 0.34, "check": False},
}


def artifacts(client, run_id: str, path: str | None = None) -> list[str]:
    """Every artifact file of a run, recursively."""
    files = []
    for item in client.list_artifacts(run_id, path):
        files += artifacts(client, run_id, item.path) if item.is_dir else [item.path]
    return files


def test_fit_logs_metrics_config_overlays_tables_and_the_best_checkpoint_to_mlflow(tmp_path):
    from mlflow.tracking import MlflowClient

    config = tiny_config(tmp_path, TINY, cases=6)
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MLFLOW_"))}
    result = subprocess.run([sys.executable, "-m", "seg", "fit", "--config", str(config), "--trainer.default_root_dir",
                             str(run), "--logging", "mlflow", "--mlflow.run_name", "tiny"],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (run / "wandb").exists()

    client = MlflowClient(f"sqlite:///{run / 'mlruns' / 'mlflow.db'}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "seg"]
    (logged,) = client.search_runs([experiment.experiment_id])
    run_id = logged.info.run_id
    assert logged.info.run_name == "tiny" and logged.info.status == "FINISHED"
    # the same metrics as every logger: per-class Dice and concentration at both validations, the loss
    for key in ("val/dice_mean", "val/dice_liver", "overlays/concentration_gate_0", "overlays/concentration_gate_1"):
        history = client.get_metric_history(run_id, key)
        assert len(history) == 2, key
        assert all(0 <= h.value <= (1 if key.startswith("val/") else 100) for h in history)
    assert len(client.get_metric_history(run_id, "train/loss_step")) == 2
    # the whole CLI config as nested params (trainer settings included), not only the module's hyper-parameters
    params = logged.data.params
    assert params["trainer.max_epochs"] == "2" and params["model.channels"] == "[8, 16, 32]"
    assert params["data.patch_size"] == "[32, 32, 16]" and params["logging"] == "mlflow"
    assert params["overlays.every_n_epochs"] == "1" and params["mlflow.run_name"] == "tiny"
    assert logged.data.tags["seg.best_checkpoint"] == str((run / "checkpoints" / "best.ckpt").resolve())
    assert 0 <= float(logged.data.tags["seg.best_score"]) <= 1

    # every overlay figure written to disk is an artifact at the same place, byte for byte; each epoch's table
    files = artifacts(client, run_id)
    on_disk = sorted(str(p.relative_to(run)) for p in run.glob("overlays/epoch=*/*/overlay.png"))
    assert len(on_disk) == 4  # 2 validation volumes x 2 epochs
    assert sorted(f for f in files if f.endswith(".png")) == on_disk
    local = Path(client.download_artifacts(run_id, on_disk[0], str(tmp_path / "down")))
    assert local.read_bytes() == (run / on_disk[0]).read_bytes()
    for epoch in (0, 1):
        for name in ("table.json", "concentration.csv"):
            assert f"overlays/epoch={epoch}/{name}" in files
        table = client.download_artifacts(run_id, f"overlays/epoch={epoch}/table.json", str(tmp_path / "down"))
        assert json.loads(Path(table).read_text()) == json.loads((run / f"overlays/epoch={epoch}/table.json").read_text())

    # beside the store: the config, a metrics CSV, and the review page of both validation volumes
    assert (run / "config.yaml").is_file()
    assert len(list(run.glob("csv/version_*/metrics.csv"))) == 1
    page = (run / "review.html").read_text()
    assert page.count('<li class="case"') == 2 and len(list((run / "review_files").glob("*.png"))) == 4 + 1
    assert "review page: " in result.stdout + result.stderr


def test_tracking_uri_from_the_option_then_the_environment_else_the_run_folder(tmp_path, monkeypatch):
    from seg.training.mlflow_logger import MLflowSettings, SegMLFlowLogger, default_store

    # a server's address: nothing is contacted until the first log
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9/from-env")
    assert SegMLFlowLogger({}, tmp_path, MLflowSettings())._tracking_uri == "http://127.0.0.1:9/from-env"
    chosen = SegMLFlowLogger({}, tmp_path, MLflowSettings(tracking_uri="http://127.0.0.1:9/option"))
    assert chosen._tracking_uri == "http://127.0.0.1:9/option" and chosen.save_dir == str(tmp_path)
    assert not (tmp_path / "mlruns").exists()
    uri, artifacts_at = default_store(tmp_path)
    assert uri == f"sqlite:///{tmp_path.resolve()}/mlruns/mlflow.db"
    assert artifacts_at == (tmp_path.resolve() / "mlruns" / "artifacts").as_uri()


def test_config_is_flattened_to_dotted_params():
    from seg.training.mlflow_logger import flatten

    assert flatten({"model": {"lr": 0.001, "channels": [8, 16]}, "trainer": {"callbacks": None, "plugins": {}},
                    "logging": "mlflow"}) == {"model.lr": "0.001", "model.channels": "[8, 16]",
                                              "trainer.callbacks": "None", "trainer.plugins": "{}",
                                              "logging": "mlflow"}
