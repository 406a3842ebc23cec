"""Gate-activation overlays: where the attention gates look, per scan, as NIfTI maps, a PNG and a number.

For each scan: `gate_<level>.nii.gz` (float32 in [0, 1], the scan's own grid and affine; coarsest level
first; `cbam_<level>.nii.gz` for CBAM's spatial maps, finest first), `overlay.png` (see
`seg.training.overlay_figure`) and, with a ground truth, the attention concentration of every map
(`seg.training.concentration`) and the Dice of every class, collected in `concentration.csv`.

Two ways in:
- `GateOverlays`, a Lightning callback, at validation time: `OUT/overlays/epoch=<E>/<case_id>/...` with
  OUT the trainer's `default_root_dir`, plus W&B images and a table when the logger is W&B;
- `seg overlays --checkpoint CKPT --input SCAN_OR_FOLDER --output DIR [--labels ...]`, for any scan.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from lightning.pytorch import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn

from seg.errors import DataError, SegError
from seg.training.concentration import attention_concentration
from seg.training.overlay_figure import figure_masks, render_overlay


log = logging.getLogger(__name__)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _batch_case_id(batch, default: str) -> str:
    """The case id of a validation batch of one volume, for messages."""
    ids = batch.get("case_id") if isinstance(batch, Mapping) else None
    return str(ids[0]) if isinstance(ids, (list, tuple)) and ids else default


@dataclass
class CaseOverlay:
    """What was exported for one scan, and the small pieces W&B needs (no volumes are kept).

    Attributes:
        case_id: the case.
        folder: where its files are.
        dice: foreground class name -> Dice (NaN when both are empty); empty without ground truth.
        missing: class name -> why it has no distance-based score ("not predicted", "not in the label", "in
            neither"), for the classes absent from the prediction or the ground truth; empty without ground truth.
        concentration: map name ("gate_0", ...) -> attention concentration; empty without ground truth.
        figure_masks: "ground_truth" / "prediction" -> `(H, W)` uint8 class indices drawn like the overlay PNG
            (every view and column), for W&B's masks over it; about 1.5 MB each at the default size.
    """

    case_id: str
    folder: Path
    dice: dict[str, float] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    concentration: dict[str, float] = field(default_factory=dict)
    figure_masks: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def png(self) -> Path:
        return self.folder / "overlay.png"


def write_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write a NIfTI atomically (temporary name, then `os.replace`), with the affine in sform and qform."""
    image = nib.Nifti1Image(array, affine)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    tmp = path.with_name(f".{path.name[:-len('.nii.gz')]}.tmp-{os.getpid()}.nii.gz")  # nibabel picks gzip by suffix
    try:
        nib.save(image, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def dice_per_class(prediction: np.ndarray, label: np.ndarray, class_names: Sequence[str]) -> dict[str, float]:
    """Dice of every foreground class (class c is `class_names[c - 1]`).

    nnU-Net's convention, as `SegmentationModule`'s: NaN where the class is in neither (nothing to score), 0 where
    it is in only one of them (missed, or a false positive); `missing_classes` says which.
    """
    scores = {}
    for c, name in enumerate(class_names, start=1):
        p, t = prediction == c, label == c
        total = int(p.sum()) + int(t.sum())
        scores[name] = 2.0 * int((p & t).sum()) / total if total else float("nan")
    return scores


def missing_classes(prediction: np.ndarray, label: np.ndarray, class_names: Sequence[str]) -> dict[str, str]:
    """The foreground classes absent from the prediction or the label -> "not predicted", "not in the label" or
    "in neither"; such a class has no surface distance (HD95)."""
    missing = {}
    for c, name in enumerate(class_names, start=1):
        predicted, labelled = bool((prediction == c).any()), bool((label == c).any())
        if not (predicted and labelled):
            missing[name] = "not predicted" if labelled else "not in the label" if predicted else "in neither"
    return missing


def map_order(names) -> list[str]:
    """The map names among `names` in display order: gates by level (coarsest first), then CBAM maps by level."""
    maps = [n for n in names if n.startswith(("gate_", "cbam_")) and n.rsplit("_", 1)[1].isdigit()]
    return sorted(maps, key=lambda n: (not n.startswith("gate_"), int(n.rsplit("_", 1)[1])))


def _fmt(value: float, digits: int = 2) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def map_title(name: str, count: int, concentration: float | None) -> str:
    """Column title: "gate 0 (coarsest)", and its concentration when known."""
    kind, level = name.rsplit("_", 1)
    where = ""
    if count > 1 and kind == "gate":  # gates come coarsest first, CBAM maps finest first
        where = " (coarsest)" if int(level) == 0 else " (finest)" if int(level) == count - 1 else ""
    elif count > 1:
        where = " (finest)" if int(level) == 0 else " (coarsest)" if int(level) == count - 1 else ""
    text = f"{'CBAM' if kind == 'cbam' else kind} {level}{where}"
    return text if concentration is None else f"{text}\nconcentration {_fmt(concentration, 1)}x"


def display_background(preprocessing: Mapping | None) -> float:
    """The first channel's background after normalisation: CT's clipped air `(low - mean) / std`, else 0."""
    scheme = ((preprocessing or {}).get("normalization") or [{}])[0]
    if scheme.get("scheme") == "ct":
        return (float(scheme["clip"][0]) - float(scheme["mean"])) / float(scheme["std"])
    return 0.0


def channel_title(channels: int, modalities: Sequence[str] = ()) -> str:
    """The scan column's title: "scan", or which channel of a multi-channel scan is shown (the first)."""
    if channels <= 1:
        return "scan"
    name = f" ({modalities[0]})" if modalities else ""
    return f"scan: channel 0{name} of {channels}"


def export_case(
    folder: Path,
    case_id: str,
    image: np.ndarray,
    maps: Mapping[str, np.ndarray],
    affine: np.ndarray,
    prediction: np.ndarray,
    label: np.ndarray | None = None,
    class_names: Sequence[str] = (),
    dilation_mm: float = 2.0,
    epoch: int | None = None,
    image_title: str = "scan",
) -> CaseOverlay:
    """Write one scan's map NIfTIs and overlay PNG; measure concentration and Dice when `label` is given.

    Args:
        folder: the case's output folder (created).
        case_id: the case, for titles.
        image: the scan `(X, Y, Z)`, one channel, for display.
        maps: "gate_<level>" / "cbam_<level>" -> `(X, Y, Z)` in [0, 1], in column order.
        affine: voxel -> world (mm) of every volume: the scan's own.
        prediction: predicted class indices `(X, Y, Z)`.
        label: ground-truth class indices `(X, Y, Z)`, or None.
        class_names: foreground class names.
        dilation_mm: the ground truth is grown by this much before measuring concentration.
        epoch: for the title, when exported during training.
        image_title: the scan column's title (`channel_title` for a multi-channel scan).
    """
    folder.mkdir(parents=True, exist_ok=True)
    result = CaseOverlay(case_id, folder)
    spacing = nib.affines.voxel_sizes(affine)
    for name, volume in maps.items():
        write_nifti(np.asarray(volume, dtype=np.float32), affine, folder / f"{name}.nii.gz")
        if label is not None:
            result.concentration[name] = attention_concentration(volume, label, spacing, dilation_mm)
    if label is not None:
        result.dice = dice_per_class(prediction, label, class_names)
        result.missing = missing_classes(prediction, label, class_names)
    title = f"{case_id}" + (f"  |  epoch {epoch}" if epoch is not None else "")
    if result.dice:
        title += "  |  Dice " + ", ".join(f"{k} {_fmt(v)}" for k, v in result.dice.items())
    count = {kind: sum(n.startswith(kind) for n in maps) for kind in ("gate", "cbam")}
    titles = {n: map_title(n, count[n.split("_")[0]], result.concentration.get(n)) for n in maps}
    layout = render_overlay(result.png, image, maps, affine, label=label, prediction=prediction,
                            class_names=class_names, title=title, map_titles=titles, image_title=image_title)
    result.figure_masks = figure_masks(layout, {"ground_truth": label, "prediction": prediction}, affine)
    return result


def write_concentration_csv(path: Path, results: Sequence[CaseOverlay], class_names: Sequence[str]) -> None:
    """`case_id, level, concentration, dice_<class>..., missing`: one row per case and map, written atomically.

    `missing` names the classes absent from the prediction or the label ("lesion: not predicted"; `; ` between
    several), whose Dice is then 0 (or nan when in neither).
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["case_id", "level", "concentration", *[f"dice_{c}" for c in class_names], "missing"])
    for r in results:
        missing = "; ".join(f"{name}: {why}" for name, why in r.missing.items())
        for level, value in r.concentration.items():
            writer.writerow([r.case_id, level, f"{value:.6g}", *[f"{r.dice.get(c, float('nan')):.6g}"
                                                                  for c in class_names], missing])
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(buffer.getvalue())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def mean_concentration(results: Sequence[CaseOverlay]) -> dict[str, float]:
    """Per map, the mean concentration over the cases where it is defined."""
    values: dict[str, list[float]] = {}
    for r in results:
        for level, value in r.concentration.items():
            if not math.isnan(value):
                values.setdefault(level, []).append(value)
    return {level: float(np.mean(v)) for level, v in values.items()}


class GateOverlays(Callback):
    """Export gate overlays for every validation volume, every `every_n_epochs` epochs.

    The maps come from the validation step's own sliding window (the module's `export_gates` flag makes
    `validation_step` return them), are taken back to each scan's grid with `Invertd` and the datamodule's
    `val_transforms`, written under `<default_root_dir>/overlays/epoch=<E>/`, and, with a W&B logger, logged
    under stable keys ("overlays/<case_id>", "overlays/table") at the trainer's global step. The mean
    concentration per map is logged as `overlays/concentration_<map>` to every logger. Volumes are handled one at
    a time; only a small axial slice per volume is kept until the epoch ends. With several processes, each
    exports the volumes it validates and rank zero writes the CSV and logs.

    Args:
        every_n_epochs: export at the validation of every n-th epoch and at the last one of the run (0: never).
            Outside `fit`: every validation.
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
        self._results: list[CaseOverlay] = []
        self._inverter = None
        self.failed: list[str] = []  # case ids whose export failed at the last validation (logged, skipped)

    # ---- when ---------------------------------------------------------------------------------------------------
    def _due(self, trainer) -> bool:
        if self.every_n_epochs == 0 or trainer.sanity_checking:
            return False
        if trainer.state.fn != TrainerFn.FITTING:
            return True
        # the run's last validation (`FinalValidation`: the last epoch, or a stop by `max_time`) always exports
        max_epochs = getattr(trainer, "max_epochs", None)
        last = getattr(trainer, "should_stop", False) or bool(max_epochs and trainer.current_epoch + 1 >= max_epochs)
        return last or (trainer.current_epoch + 1) % self.every_n_epochs == 0

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
                          type(err).__name__, _first_line(err))
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
        if trainer.is_global_zero:
            try:
                self._log_wandb(trainer, pl_module.class_names, results)
            except Exception as err:  # noqa: BLE001 - the files are written; a logger problem must not stop training
                log.error("overlays: logging to W&B failed (the overlay files are written): %s: %s",
                          type(err).__name__, _first_line(err))

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
    def _log_wandb(trainer, class_names: Sequence[str], results: Sequence[CaseOverlay]) -> None:
        """Per volume the overlay PNG with ground truth and prediction as W&B masks, and the table of all volumes.

        W&B stages a logged table (and its images) as an artifact under `WANDB_DATA_DIR`, beside the run folder by
        default; here it goes inside the run folder, so that the one folder `wandb sync` is given holds it all.
        """
        from lightning.pytorch.loggers import WandbLogger

        logger = next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)
        if logger is None or not results:
            return
        import wandb

        class_labels = {0: "background", **{i: name for i, name in enumerate(class_names, start=1)}}
        levels = sorted({level for r in results for level in r.concentration})
        columns = ["case_id", *[f"dice_{c}" for c in class_names], *[f"concentration_{lv}" for lv in levels],
                   "missing", "overlay"]
        rows, payload = [], {"epoch": trainer.current_epoch}
        number = lambda v: None if v is None or math.isnan(v) else float(v)  # noqa: E731 - JSON has no NaN
        for r in results:
            missing = "; ".join(f"{name}: {why}" for name, why in r.missing.items())
            if r.png.exists():
                masks = {k: {"mask_data": v, "class_labels": class_labels} for k, v in r.figure_masks.items()}
                caption = f"{r.case_id}, epoch {trainer.current_epoch}: Dice " + ", ".join(
                    f"{k} {_fmt(v)}" for k, v in r.dice.items()) + (f"; {missing}" if missing else "")
                payload[f"overlays/{r.case_id}"] = wandb.Image(str(r.png), masks=masks, caption=caption)
            rows.append([r.case_id, *[number(r.dice.get(c)) for c in class_names],
                         *[number(r.concentration.get(lv)) for lv in levels], missing,
                         wandb.Image(str(r.png), caption=r.case_id) if r.png.exists() else None])
        payload["overlays/table"] = wandb.Table(columns=columns, data=rows)
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


# ---- seg overlays ------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, type=Path, help="a .ckpt written by `seg fit`")
    parser.add_argument("--input", required=True, type=Path,
                        help="a scan (.nii/.nii.gz) or a folder of scans (nnU-Net channel files _0000, _0001 grouped)")
    parser.add_argument("--output", required=True, type=Path, help="output folder: <output>/<case_id>/...")
    parser.add_argument("--labels", type=Path,
                        help="ground truth: a label file (with a single scan) or a folder of <case_id>.nii.gz; "
                             "adds contours, Dice and concentration.csv")
    parser.add_argument("--cbam", action="store_true", help="also export CBAM's spatial attention maps")
    parser.add_argument("--dilation-mm", type=float, default=2.0,
                        help="grow the ground truth by this many mm for the concentration (default 2)")
    parser.add_argument("--device", default="auto", help="auto (GPU when there is one), cpu or cuda")


def _label_path(labels: Path | None, case_id: str, single: bool) -> Path | None:
    from seg.data.layout import NIFTI_SUFFIXES

    if labels is None:
        return None
    if labels.is_file():
        if not single:
            raise DataError("a single label file goes with a single scan; give a folder of labels", labels)
        return labels
    if not labels.is_dir():
        raise DataError("no such file or folder", labels)
    found = next((labels / f"{case_id}{s}" for s in NIFTI_SUFFIXES if (labels / f"{case_id}{s}").is_file()), None)
    if found is None:
        raise DataError(f"no label for case '{case_id}' (expected {case_id}.nii.gz)", labels)
    return found


def _load_label(path: Path, reference: nib.Nifti1Image) -> np.ndarray:
    """A label volume on its scan's grid, as class indices; `DataError` naming the file otherwise."""
    try:
        image = nib.load(os.fspath(path))
        data = np.asarray(image.dataobj)
    except Exception as err:  # nibabel raises many types for files that are not NIfTI
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"not a readable NIfTI label ({reason})", path) from None
    data = data.reshape(data.shape[:3]) if data.ndim == 4 and data.shape[3] == 1 else data
    if data.shape != reference.shape[:3] or not np.allclose(image.affine, reference.affine, atol=1e-3):
        raise DataError(f"label grid (shape {data.shape}) differs from its scan's ({reference.shape[:3]}, or the "
                        "affine); labels must be on the scan's grid", path)
    if not np.all(np.isfinite(data)):
        raise DataError("label has NaN or infinite values", path)
    return np.rint(data).astype(np.int16)


def overlay_scan(predictor, paths: Sequence[Path], case_id: str, folder: Path, label_path: Path | None = None,
                 cbam: bool = False, dilation_mm: float = 2.0) -> CaseOverlay:
    """Predict one scan with its gates in its own geometry (`Predictor`) and export its overlay files."""
    scan = predictor.load(paths, case_id)
    result = predictor.to_original(scan, predictor.infer(scan, with_gates=True, with_cbam=cbam))
    reference = result["reference"]
    label = _load_label(label_path, reference) if label_path is not None else None
    image = np.asarray(reference.dataobj, dtype=np.float32)
    image = image[..., 0] if image.ndim == 4 else image
    maps = {k: result[k] for k in map_order(result)}
    return export_case(folder, case_id, image, maps, reference.affine, result["label"], label,
                       predictor.class_names, dilation_mm,
                       image_title=channel_title(predictor.in_channels, predictor.preprocessing.get("modalities") or ()))


def run(args: argparse.Namespace) -> int:
    import traceback

    from seg.errors import escape
    from seg.inference.predict import find_cases
    from seg.inference.predictor import Predictor

    # the same case finding as `seg predict`: every entry that is skipped is named, with the reason
    cases, broken, ignored = find_cases(args.input)
    if not cases and not broken:
        raise DataError("no NIfTI scans (.nii, .nii.gz) in this folder", args.input)
    predictor = Predictor.from_checkpoint(args.checkpoint, device=args.device)
    args.output.mkdir(parents=True, exist_ok=True)
    for r in ignored + broken:
        print(f"seg overlays: {'note' if r.status == 'ignored' else 'error'}: {r.message}", file=sys.stderr)
    results, failed = [], len(broken)
    for case_id, paths in cases.items():
        try:
            predictor.inspect(paths)  # the scan's own problems first: a broken scan is named, not its label
            label_path = _label_path(args.labels, case_id, single=args.input.is_file())
            results.append(overlay_scan(predictor, paths, case_id, args.output / case_id, label_path, args.cbam,
                                        args.dilation_mm))
        except Exception as err:  # one bad scan must not stop the others, as in `seg predict`
            failed += 1
            if not isinstance(err, SegError):  # a bug or an unforeseen file: show where it came from
                traceback.print_exception(err, file=sys.stderr)
                err = f"{escape(str(paths[0]))}: unexpected error ({type(err).__name__}: {err})"
            print(f"seg overlays: error: {' '.join(str(err).split())}", file=sys.stderr)
            continue
        print(f"{escape(case_id)}: {escape(str(results[-1].png))}" + "".join(
            f", concentration {k} {_fmt(v, 1)}" for k, v in results[-1].concentration.items()))
    if any(r.concentration for r in results):
        write_concentration_csv(args.output / "concentration.csv", results, predictor.class_names)
    return 1 if failed else 0
