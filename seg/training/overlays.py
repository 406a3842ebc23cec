"""`GateOverlays`: the training callback that exports where the gates look for every validation volume.

At validation time: `OUT/overlays/epoch=<E>/<case_id>/...` with OUT the trainer's `default_root_dir` (the files of
`seg.explain.export`) and `OUT/overlays/epoch=<E>/table.json` (`TABLE`: one row per volume, written last, so its
presence marks the epoch's overlays complete), plus images and the table in W&B or MLflow when the run logs there.
The maps come from the validation step's own sliding window; `seg overlays` (`seg.explain.command`) does the same
for any scan.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn

from seg.explain.export import (TABLE, CaseOverlay, _fmt, channel_title, display_background, export_case, map_order,
                                mean_concentration, overlay_table, write_concentration_csv)
from seg.errors import first_line
from seg.io import write_text
from seg.training.callbacks.validation import is_final_validation

log = logging.getLogger(__name__)


def _batch_case_id(batch, default: str) -> str:
    """The case id of a validation batch of one volume, for messages."""
    ids = batch.get("case_id") if isinstance(batch, Mapping) else None
    return str(ids[0]) if isinstance(ids, (list, tuple)) and ids else default


class GateOverlays(Callback):
    """Export gate overlays for every validation volume, every `every_n_epochs` epochs and at the run's end.

    The maps come from the validation step's own sliding window (the module's `export_gates` flag makes
    `validation_step` return them), are taken back to each scan's grid with `Invertd` and the datamodule's
    `val_transforms`, written under `<default_root_dir>/overlays/epoch=<E>/` with the epoch's `table.json`, and, with
    a W&B logger, logged under stable keys ("overlays/<case_id>", "overlays/table") at the trainer's global step,
    with an MLflow logger as artifacts under the same paths as on disk (`SegMLFlowLogger.log_overlays`). The mean
    concentration per map is logged as `overlays/concentration_<map>` to every logger. Volumes are handled one at
    a time; only a small axial slice per volume is kept until the epoch ends. With several processes, each
    exports the volumes it validates and rank zero writes the CSV and logs.

    Args:
        every_n_epochs: export at the first validation after each n-th epoch and at the last one of the run
            (0: never). Outside `fit`: every validation.
        cbam: also export CBAM's spatial attention maps.
        max_volumes: export at most this many volumes per validation (per process); None: all.
        dilation_mm: growth of the ground truth for the concentration.
    """

    def __init__(self, every_n_epochs: int = 1, cbam: bool = False, max_volumes: int | None = None,
                 dilation_mm: float = 2.0):
        if every_n_epochs < 0 or (max_volumes is not None and max_volumes < 0) or dilation_mm < 0:
            raise ValueError("every_n_epochs, max_volumes and dilation_mm must not be negative")
        self.every_n_epochs = every_n_epochs
        self.cbam = cbam
        self.max_volumes = max_volumes
        self.dilation_mm = dilation_mm
        self._active = False
        self._exported_epoch = -1  # the epoch of the last export in this fit
        self._results: list[CaseOverlay] = []
        self._inverter = None
        self.failed: list[str] = []  # case ids whose export failed at the last validation (logged, skipped)

    # ---- when ---------------------------------------------------------------------------------------------------
    def _due(self, trainer) -> bool:
        """Whether this validation exports; in `fit` it also books the export, so call it once per validation."""
        if self.every_n_epochs == 0 or trainer.sanity_checking:
            return False
        if trainer.state.fn != TrainerFn.FITTING:
            return True
        # The run's last validation always exports (the last epoch, or a stop by `max_time`), and otherwise the
        # first validation that passes a multiple of every_n_epochs epochs since the last export: epochs whose
        # validation `ValidationSchedule` skipped do not make the schedule lose an export.
        epoch, n = trainer.current_epoch, self.every_n_epochs
        due = is_final_validation(trainer) or (epoch + 1) // n > (self._exported_epoch + 1) // n
        if due:
            self._exported_epoch = epoch
        return due

    def _make_inverter(self, trainer):
        from monai.transforms import Invertd

        transforms = getattr(getattr(trainer, "datamodule", None), "val_transforms", None)
        if transforms is None:
            rank_zero_warn("GateOverlays needs a datamodule with `val_transforms` to map gates back to the scans; "
                           "no overlays are exported")
            return None
        # floats (scan, probabilities, maps) with the image's own modes; the label with nearest neighbours
        return Invertd(["floats", "label"], transform=transforms, orig_keys="image", nearest_interp=[False, True],
                       allow_missing_keys=True)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._results = []
        self.failed = []
        self._active = self._due(trainer)
        if self._active:  # rebuilt each time: `seg validate` after `fit` may bring another datamodule
            self._inverter = self._make_inverter(trainer)
            self._active = self._inverter is not None

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        room = self.max_volumes is None or len(self._results) < self.max_volumes
        pl_module.export_gates = self._active and room
        pl_module.export_cbam = pl_module.export_gates and self.cbam

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        pl_module.export_gates = pl_module.export_cbam = False
        if self._active and isinstance(outputs, Mapping) and "logits" in outputs:
            folder = Path(trainer.default_root_dir) / "overlays" / f"epoch={trainer.current_epoch}"
            try:
                self._results.append(self._export(folder, pl_module, outputs, batch, trainer.current_epoch))
            except Exception as err:  # noqa: BLE001 - a drawing bug must never cost the run its training
                case_id = _batch_case_id(batch, f"volume {batch_idx}")
                log.error("overlays: export of case %s failed, skipped (the run goes on): %s: %s", repr(case_id),
                          type(err).__name__, first_line(err))
                self.failed.append(case_id)

    # ---- one volume -----------------------------------------------------------------------------------------------
    def _export(self, folder: Path, pl_module, outputs: Mapping, batch: Mapping, epoch: int) -> CaseOverlay:
        from monai.data import MetaTensor, decollate_batch

        item = decollate_batch({k: batch[k] for k in ("image", "label", "case_id") if k in batch}, detach=True)[0]
        names = map_order(outputs)
        probabilities = torch.softmax(outputs["logits"][0].float(), 0)
        num_classes = probabilities.shape[0]
        # One resampling for every float volume: they share the grid and the interpolation.
        # The inverse pads the cropped-away border with zeros; shown as the scan, that border should read as the
        # background it was (CT: the clipped air, not the normalised mean's grey), so the scan is shifted by it.
        background = display_background(getattr(pl_module, "preprocessing", None))
        floats = torch.cat([item["image"].as_tensor()[:1].float() - background, probabilities,
                            *[outputs[k][0].float() for k in names]]).cpu()
        data = {"image": item["image"], "floats": MetaTensor(floats)}
        if "label" in item:
            data["label"] = MetaTensor(item["label"].as_tensor().float().cpu())
        inverted = self._inverter(data)
        floats = inverted["floats"]
        affine = floats.affine.double().numpy()
        floats = floats.as_tensor().numpy()
        floats[0] += background
        meta = item["image"].meta
        shape = tuple(int(v) for v in meta.get("spatial_shape", floats.shape[1:]))
        original = np.asarray(meta.get("original_affine", affine), dtype=np.float64)
        if floats.shape[1:] != shape or not np.allclose(affine, original, atol=1e-3):  # a bug, not a user error
            raise RuntimeError(f"inverted maps {floats.shape[1:]} do not lie on the scan's grid {shape}:\n"
                               f"{affine}\nvs\n{original}")
        label = np.rint(inverted["label"].as_tensor().numpy()[0]).astype(np.int16) if "label" in inverted else None
        # Outside the foreground crop the inverse pads zeros: every probability 0, so argmax says background.
        prediction = floats[1:1 + num_classes].argmax(0).astype(np.int16)
        maps = {k: np.clip(floats[1 + num_classes + i], 0.0, 1.0) for i, k in enumerate(names)}
        case_id = str(item.get("case_id", f"case_{len(self._results)}"))
        modalities = (getattr(pl_module, "preprocessing", None) or {}).get("modalities") or ()
        return export_case(folder / case_id, case_id, floats[0], maps, affine, prediction, label,
                           pl_module.class_names, self.dilation_mm, epoch,
                           image_title=channel_title(int(item["image"].shape[0]), modalities))

    # ---- the epoch ------------------------------------------------------------------------------------------------
    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not self._active:
            return
        self._active = False
        results = self._gather(trainer, self._results)
        self._results = []
        folder = Path(trainer.default_root_dir) / "overlays" / f"epoch={trainer.current_epoch}"
        if trainer.is_global_zero and any(r.concentration for r in results):
            write_concentration_csv(folder / "concentration.csv", results, pl_module.class_names)
        for level, value in mean_concentration(results).items():
            # Every process holds the gathered results, so all log the same number (no sync needed).
            pl_module.log(f"overlays/concentration_{level}", value, on_step=False, on_epoch=True)
        if not trainer.is_global_zero:
            return
        table = overlay_table(trainer.current_epoch, pl_module.class_names, results, self.failed)
        try:
            write_text(folder / TABLE, json.dumps(table, indent=1, allow_nan=False))
        except OSError as err:  # the figures are written; a full disk here must not stop training
            log.error("overlays: %s not written: %s", folder / TABLE, first_line(err))
        for name, send in (("W&B", self._log_wandb), ("MLflow", log_overlays_mlflow)):
            try:
                send(trainer, folder, table, results)
            except Exception as err:  # noqa: BLE001 - the files are written; a logger problem must not stop training
                log.error("overlays: logging to %s failed (the overlay files are written): %s: %s", name,
                          type(err).__name__, first_line(err))

    @staticmethod
    def _gather(trainer, results: list[CaseOverlay]) -> list[CaseOverlay]:
        """Every process's results, on every process, once per case (samplers may repeat a case to even out)."""
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            everyone: list = [None] * trainer.world_size
            torch.distributed.all_gather_object(everyone, results)
            results = [r for part in everyone for r in part]
        unique = {}
        for r in results:
            unique.setdefault(r.case_id, r)
        return [unique[k] for k in sorted(unique)]

    @staticmethod
    def _log_wandb(trainer, folder: Path, table: dict, results: Sequence[CaseOverlay]) -> None:
        """Per volume the overlay PNG with ground truth and prediction as W&B masks, and the table of all volumes.

        W&B stages a logged table (and its images) as an artifact under `WANDB_DATA_DIR`, beside the run folder by
        default; here it goes inside the run folder, so that the one folder `wandb sync` is given holds it all.
        """
        from lightning.pytorch.loggers import WandbLogger

        logger = next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)
        if logger is None or not results:
            return
        import wandb

        class_labels = {0: "background", **{i: name for i, name in enumerate(table["class_names"], start=1)}}
        rows, payload = [], {"epoch": trainer.current_epoch}
        for r, row in zip(results, table["data"]):
            missing = row[-2]
            if r.png.exists():
                masks = {k: {"mask_data": v, "class_labels": class_labels} for k, v in r.figure_masks.items()}
                caption = f"{r.case_id}, epoch {trainer.current_epoch}: Dice " + ", ".join(
                    f"{k} {_fmt(v)}" for k, v in r.dice.items()) + (f"; {missing}" if missing else "")
                payload[f"overlays/{r.case_id}"] = wandb.Image(str(r.png), masks=masks, caption=caption)
            rows.append([*row[:-1], wandb.Image(str(r.png), caption=r.case_id) if r.png.exists() else None])
        payload["overlays/table"] = wandb.Table(columns=table["columns"], data=rows)
        run_folder = Path(logger.experiment.dir).parent  # offline-run-<id>/ (files/ is the run's own)
        previous = os.environ.get("WANDB_DATA_DIR")
        os.environ["WANDB_DATA_DIR"] = str(run_folder)  # read when the table is staged, during the log call
        try:
            logger.log_metrics(payload, step=trainer.global_step)
        finally:
            if previous is None:
                os.environ.pop("WANDB_DATA_DIR", None)
            else:
                os.environ["WANDB_DATA_DIR"] = previous


def log_overlays_mlflow(trainer, folder: Path, table: dict, results: Sequence[CaseOverlay]) -> None:
    """With an MLflow logger: each volume's figure as `overlays/epoch=<E>/<case_id>/overlay.png`, and the epoch's
    table (`table.json`) and `concentration.csv` under `overlays/epoch=<E>/`."""
    from seg.training.mlflow_logger import SegMLFlowLogger

    logger = next((lg for lg in trainer.loggers if isinstance(lg, SegMLFlowLogger)), None)
    if logger is not None and results:
        logger.log_overlays(folder, table, [r.png for r in results if r.png.exists()])
