"""`seg fit --logging mlflow`: Lightning's `MLFlowLogger` with a store inside the run folder by default.

Hospitals that may not send scans or derived images to a cloud service run MLflow in-house. The run gets the same
metrics as W&B, the whole LightningCLI config as nested params (`trainer.max_epochs`, `model.lr`, ...), every
overlay figure and each exported epoch's per-volume table as artifacts (`GateOverlays`), and the best checkpoint's
path and score as the tags `seg.best_checkpoint`, `seg.best_score`.

Where: `--mlflow.tracking_uri`, else `MLFLOW_TRACKING_URI`, else `sqlite:///<run>/mlruns/mlflow.db` with artifacts
in `<run>/mlruns/artifacts` (MLflow 3 refuses its old file store by default; SQLite needs no server). Browse it with
`mlflow ui --backend-store-uri sqlite:///<run>/mlruns/mlflow.db`.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only

from seg.errors import SegError


class MLflowSettings:
    """Where and under which names `--logging mlflow` logs (the `--mlflow.*` options).

    Args:
        tracking_uri: the MLflow tracking URI (a server, `sqlite:///...`, `databricks`); None: `MLFLOW_TRACKING_URI`,
            else a SQLite store in `<default_root_dir>/mlruns/`.
        experiment: the experiment's name.
        run_name: the run's name; None: MLflow's own.
    """

    def __init__(self, tracking_uri: str | None = None, experiment: str = "seg", run_name: str | None = None):
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.run_name = run_name


def default_store(root: Path) -> tuple[str, str]:
    """The tracking URI and artifact location of the store inside the run folder `root` (created)."""
    folder = root.resolve() / "mlruns"
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}", (folder / "artifacts").as_uri()


def flatten(config: Mapping, prefix: str = "") -> dict[str, str]:
    """A nested config as MLflow params: `{"model": {"lr": 0.001}}` -> `{"model.lr": "0.001"}`."""
    params = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            params.update(flatten(value, f"{name}."))
        else:
            params[name] = str(value)
    return params


class SegMLFlowLogger(MLFlowLogger):
    """`MLFlowLogger` that logs the run's whole config, the overlays and the best checkpoint.

    Args:
        config: the LightningCLI config of the run (nested dict); logged as params instead of the module's
            hyper-parameters, which it contains under `model.`.
        root: the run folder (`default_root_dir`): `save_dir`, where Lightning writes `config.yaml`.
        settings: the `--mlflow.*` options.
    """

    MAX_PARAM = 6000  # MLflow's limit on a param's value since 2.x (Lightning's own logger cuts at 250)

    def __init__(self, config: Mapping, root: Path, settings: MLflowSettings):
        if importlib.util.find_spec("mlflow") is None:
            raise SegError("--logging mlflow needs MLflow, which is not installed: pip install 'seg[mlflow]'")
        uri, artifacts = settings.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"), None
        if not uri:
            uri, artifacts = default_store(root)
        super().__init__(experiment_name=settings.experiment, run_name=settings.run_name, tracking_uri=uri,
                         artifact_location=artifacts, log_model=False)
        self._config = flatten(config)
        self._root = Path(root)

    @property
    def save_dir(self) -> str:
        return str(self._root)  # Lightning's is None for a non-file URI, and its config saving then fails

    @rank_zero_only
    def log_hyperparams(self, params) -> None:
        from mlflow.entities import Param

        items = [Param(k, v[: self.MAX_PARAM]) for k, v in sorted(self._config.items())]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params per call
            self.experiment.log_batch(run_id=self.run_id, params=items[start:start + 100])

    @rank_zero_only
    def after_save_checkpoint(self, checkpoint_callback) -> None:
        best, score = getattr(checkpoint_callback, "best_model_path", ""), getattr(checkpoint_callback,
                                                                                  "best_model_score", None)
        if best and getattr(checkpoint_callback, "monitor", None):  # the best-Dice checkpoint, not last.ckpt
            self.experiment.set_tag(self.run_id, "seg.best_checkpoint", str(Path(best).resolve()))
            if score is not None:
                self.experiment.set_tag(self.run_id, "seg.best_score", f"{float(score):.6g}")

    @rank_zero_only
    def log_overlays(self, folder: Path, table: dict, figures: Sequence[Path]) -> None:
        """One exported epoch: each figure under `overlays/<epoch folder>/<case_id>/`, the table and the CSV."""
        prefix = f"overlays/{folder.name}"
        for png in figures:
            self.experiment.log_artifact(self.run_id, str(png), f"{prefix}/{png.parent.name}")
        self.experiment.log_dict(self.run_id, table, f"{prefix}/table.json")
        if (folder / "concentration.csv").is_file():
            self.experiment.log_artifact(self.run_id, str(folder / "concentration.csv"), prefix)
