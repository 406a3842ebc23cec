"""Where the network looks, for one scan: gate maps as NIfTI in the scan's own grid, the overlay PNG, and numbers.

For each scan: `gate_<level>.nii.gz` (float32 in [0, 1], the scan's own grid and affine; coarsest level
first; `cbam_<level>.nii.gz` for CBAM's spatial maps, finest first), `overlay.png` (`seg.figure`) and,
with a ground truth, the attention concentration of every map and its share inside each class
(`seg.explain.concentration`) and the Dice of every class, collected in `concentration.csv` (in training also `table.json`, `overlay_table`). Used by the
training callback (`GateOverlays`) and by `seg overlays` (`seg.explain.command`).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from seg.explain.concentration import attention_concentration, class_energy_share
from seg.figure import figure_masks, render_overlay
from seg.io import save_nifti, write_text
from seg.metrics import confusion, dice_from_confusion

TABLE = "table.json"  # per exported epoch of a run: the volumes' scores, the table W&B and MLflow get too


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
        energy: map name -> foreground class name -> share of the map's mass inside the (dilated) class
            (`class_energy_share`); empty without ground truth.
        figure_masks: "ground_truth" / "prediction" -> `(H, W)` uint8 class indices drawn like the overlay PNG
            (every view and column), for W&B's masks over it; about 1.5 MB each at the default size.
        report: `seg overlays`: the case's report as `seg predict` writes it (`seg.inference.report.case_report`).
    """

    case_id: str
    folder: Path
    dice: dict[str, float] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    concentration: dict[str, float] = field(default_factory=dict)
    energy: dict[str, dict[str, float]] = field(default_factory=dict)
    figure_masks: dict[str, np.ndarray] = field(default_factory=dict)
    report: dict = field(default_factory=dict)

    @property
    def png(self) -> Path:
        return self.folder / "overlay.png"


def write_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write a map as NIfTI atomically, with the affine in sform and qform (`seg.io.save_nifti`)."""
    save_nifti(array, affine, path)


def dice_per_class(prediction: np.ndarray, label: np.ndarray, class_names: Sequence[str]) -> dict[str, float]:
    """Dice of every foreground class (class c is `class_names[c - 1]`), by `seg.metrics`.

    nnU-Net's convention, as `SegmentationModule`'s: NaN where the class is in neither (nothing to score), 0 where
    it is in only one of them (missed, or a false positive); `missing_classes` says which.
    """
    size = max(len(class_names) + 1, int(prediction.max(initial=0)) + 1, int(label.max(initial=0)) + 1)
    dice = dice_from_confusion(confusion(prediction, label, size))
    return {name: float(dice[c]) for c, name in enumerate(class_names)}


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
    modality: str | None = None,
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
        modality: the first channel's modality when `image` is in its own units ("CT": the soft-tissue window).
    """
    folder.mkdir(parents=True, exist_ok=True)
    result = CaseOverlay(case_id, folder)
    spacing = nib.affines.voxel_sizes(affine)
    for name, volume in maps.items():
        write_nifti(np.asarray(volume, dtype=np.float32), affine, folder / f"{name}.nii.gz")
        if label is not None:
            result.concentration[name] = attention_concentration(volume, label, spacing, dilation_mm)
            result.energy[name] = class_energy_share(volume, label, spacing, class_names, dilation_mm)
    if label is not None:
        result.dice = dice_per_class(prediction, label, class_names)
        result.missing = missing_classes(prediction, label, class_names)
    title = f"{case_id}" + (f"  |  epoch {epoch}" if epoch is not None else "")
    if result.dice:
        title += "  |  Dice " + ", ".join(f"{k} {_fmt(v)}" for k, v in result.dice.items())
    count = {kind: sum(n.startswith(kind) for n in maps) for kind in ("gate", "cbam")}
    titles = {n: map_title(n, count[n.split("_")[0]], result.concentration.get(n)) for n in maps}
    layout = render_overlay(result.png, image, maps, affine, label=label, prediction=prediction,
                            class_names=class_names, title=title, map_titles=titles, image_title=image_title,
                            modality=modality)
    result.figure_masks = figure_masks(layout, {"ground_truth": label, "prediction": prediction}, affine)
    return result


def write_concentration_csv(path: Path, results: Sequence[CaseOverlay], class_names: Sequence[str]) -> None:
    """`case_id, level, concentration, energy_<class>..., dice_<class>..., missing`: one row per case and map,
    written atomically. `energy_<class>` is the share of the map's mass inside that class, dilated as for the
    concentration (`class_energy_share`).

    `missing` names the classes absent from the prediction or the label ("lesion: not predicted"; `; ` between
    several), whose Dice is then 0 (or nan when in neither).
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["case_id", "level", "concentration", *[f"energy_{c}" for c in class_names],
                     *[f"dice_{c}" for c in class_names], "missing"])
    for r in results:
        missing = "; ".join(f"{name}: {why}" for name, why in r.missing.items())
        for level, value in r.concentration.items():
            energy = r.energy.get(level, {})
            writer.writerow([r.case_id, level, f"{value:.6g}",
                             *[f"{energy.get(c, float('nan')):.6g}" for c in class_names],
                             *[f"{r.dice.get(c, float('nan')):.6g}" for c in class_names], missing])
    write_text(path, buffer.getvalue())


def mean_concentration(results: Sequence[CaseOverlay]) -> dict[str, float]:
    """Per map, the mean concentration over the cases where it is defined."""
    values: dict[str, list[float]] = {}
    for r in results:
        for level, value in r.concentration.items():
            if not math.isnan(value):
                values.setdefault(level, []).append(value)
    return {level: float(np.mean(v)) for level, v in values.items()}


def overlay_table(epoch: int, class_names: Sequence[str], results: Sequence[CaseOverlay],
                  failed: Sequence[str] = ()) -> dict:
    """The volumes of one exported epoch as a JSON-ready table, W&B's and MLflow's column layout.

    `{"epoch", "class_names", "levels", "columns": [case_id, dice_<class>..., concentration_<map>..., missing,
    overlay], "data": [one row per volume], "failed": [case ids whose export failed]}`; `overlay` is the figure's
    path relative to the epoch's folder (None when it was not written), NaN scores are None (JSON has no NaN).
    """
    levels = sorted({level for r in results for level in r.concentration})
    columns = ["case_id", *[f"dice_{c}" for c in class_names], *[f"concentration_{lv}" for lv in levels],
               "missing", "overlay"]
    number = lambda v: None if v is None or math.isnan(v) else float(v)  # noqa: E731
    data = [[r.case_id, *[number(r.dice.get(c)) for c in class_names],
             *[number(r.concentration.get(lv)) for lv in levels],
             "; ".join(f"{name}: {why}" for name, why in r.missing.items()),
             f"{r.folder.name}/{r.png.name}" if r.png.exists() else None] for r in results]
    return {"epoch": int(epoch), "class_names": list(class_names), "levels": levels, "columns": columns,
            "data": data, "failed": sorted(set(failed))}
