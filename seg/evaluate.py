"""`seg evaluate`: score a folder of predicted label maps against the labels, per case and class, in mm.

    seg evaluate --predictions runs/pred --labels data/Task04_Hippocampus/labelsTs [--dataset dataset.json]

Each `<case>.nii.gz` label is paired with the prediction of the same name. Per case and foreground class: Dice,
HD95 and normalised surface Dice (`--tolerance` mm), from each file's own voxel size (`seg.metrics`). Writes,
atomically, into `--output` (default: the predictions folder):
- `per_case.csv`: one row per case: status, and per class dice / hd95 / nsd and what the class is missing from;
- `summary.json`: per class the mean, median, std and count of each score over the cases where it exists, and the
  number of cases where the class is missing from the prediction, from the label, or from both. A missing class
  is counted, never scored as 0 mm: its HD95 and NSD are absent; its Dice is 0 when only one side lacks it and
  absent when both do.
A case whose prediction is missing, unreadable, or on another grid (shape or affine) than its label is one line
naming the file; the others are scored, and the exit code says that something failed.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from seg.data.guard import guard_file
from seg.data.layout import MAX_LABEL, parse_labels, strip_nifti_suffix
from seg.errors import DataError, SegError, escape, one_line
from seg.io import read_json, write_atomic
from seg.metrics import ClassScores, score_case, spacing_of, summarise

PER_CASE, SUMMARY = "per_case.csv", "summary.json"
DEFAULT_TOLERANCE_MM = 1.0
AFFINE_TOLERANCE_MM = 1e-3  # predictions written by `seg predict` carry their scan's header: equal, not close


@dataclass
class CaseEvaluation:
    """One case: its files, and its scores per class (in `classes` order) or why it could not be scored."""

    case_id: str
    label: Path
    prediction: Path | None
    scores: dict[int, ClassScores] = field(default_factory=dict)
    message: str = ""

    @property
    def ok(self) -> bool:
        return not self.message


def nifti_files(folder: Path) -> dict[str, Path]:
    """Case id -> file for the `.nii`/`.nii.gz` files of a folder (hidden files left out)."""
    if not folder.is_dir():
        raise DataError("folder not found", folder)
    files = {}
    for path in sorted(folder.iterdir()):
        stem = strip_nifti_suffix(path.name)
        if stem is not None and not path.name.startswith("."):
            files.setdefault(stem, path)
    return files


def declared_labels(dataset: str | os.PathLike) -> dict[int, str]:
    """Label value -> name from a dataset.json (MSD or nnU-Net v2), or from the dataset.json of a dataset folder."""
    path = Path(dataset)
    path = path / "dataset.json" if path.is_dir() else path
    meta = read_json(path, "dataset.json")
    if not isinstance(meta, dict) or "labels" not in meta:
        raise DataError("dataset.json has no 'labels'", path)
    return parse_labels(meta["labels"], path)


def read_label_map(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(integer array, affine) of a label map; `DataError` naming the file when it is not one.

    The header is checked before any voxel is read (`guard_file`), and the values before they are scored: every
    value up to the largest costs a row and a column of the confusion matrix, and every value found a surface
    distance transform, so a value above `MAX_LABEL` (as dataset.json allows) is refused, not computed for hours.
    """
    image = guard_file(path)
    if not np.all(np.isfinite(image.affine)):
        raise DataError("affine is not finite (NaN or infinite entries); fix its sform/qform", path)
    try:
        array = np.asanyarray(image.dataobj)
    except Exception as err:  # nibabel raises many types for a broken file
        raise DataError(f"cannot read: {type(err).__name__}: {one_line(str(err))[:200]}", path) from None
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise DataError(f"is {array.ndim}D {array.shape}; a label map is 3D", path)
    if not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.rint(array)):
            raise DataError("holds non-integer values; a label map holds class indices", path)
    if array.size and array.min() < 0:
        raise DataError(f"holds negative values ({int(array.min())}); a label map holds class indices", path)
    if array.size and array.max() > MAX_LABEL:
        raise DataError(f"holds label value {int(array.max())}, above {MAX_LABEL}; a label map holds class "
                        "indices", path)
    return array.astype(np.int64, copy=False) if array.dtype.kind == "f" else array, image.affine


def evaluate_case(case_id: str, prediction: Path, label: Path, classes: Sequence[int] | None,
                  tolerance_mm: float) -> CaseEvaluation:
    """Score one case; `classes` None scores every foreground value found in either map."""
    result = CaseEvaluation(case_id, label, prediction)
    try:
        truth, truth_affine = read_label_map(label)
        predicted, predicted_affine = read_label_map(prediction)
        if predicted.shape != truth.shape:
            raise DataError(f"prediction has shape {predicted.shape}, its label {label.name} {truth.shape}: not the "
                            "same grid (predict in the scan's own geometry)", prediction)
        if not np.allclose(predicted_affine, truth_affine, rtol=0, atol=AFFINE_TOLERANCE_MM):
            raise DataError(f"prediction's affine differs from its label's ({label.name}) by up to "
                            f"{np.abs(predicted_affine - truth_affine).max():.3g}: not the same grid", prediction)
        if classes is not None:
            allowed = set(classes) | {0}
            for path, array in ((prediction, predicted), (label, truth)):
                extra = sorted(set(np.unique(array).tolist()) - allowed)
                if extra:
                    raise DataError(f"holds label values {extra[:5]} that the dataset does not declare "
                                    f"(classes {sorted(allowed)})", path)
            wanted = list(classes)
        else:
            wanted = sorted((set(np.unique(truth).tolist()) | set(np.unique(predicted).tolist())) - {0})
        scores = score_case(predicted, truth, wanted, spacing_of(truth_affine), tolerance_mm)
        result.scores = dict(zip(wanted, scores))
    except SegError as err:
        result.message = str(err)
    return result


def evaluate_pairs(pairs: Sequence[tuple[str, Path | None, Path]], classes: Sequence[int] | None = None,
                   tolerance_mm: float = DEFAULT_TOLERANCE_MM,
                   report: Callable[[str], None] | None = None) -> list[CaseEvaluation]:
    """Score (case id, prediction or None, label) triples; a case that cannot be scored carries its one-line reason."""
    results = []
    for case_id, prediction, label in pairs:
        if prediction is None:
            result = CaseEvaluation(case_id, label, None, message=f"{escape(str(label))}: no prediction for case "
                                                                   f"'{escape(case_id)}'")
        else:
            result = evaluate_case(case_id, prediction, label, classes, tolerance_mm)
        if result.message and report is not None:
            report(result.message)
        results.append(result)
    return results


def summary_of(results: Sequence[CaseEvaluation], class_names: dict[int, str], tolerance_mm: float) -> dict:
    """The `summary.json` content (see the module docstring)."""
    scored = [r for r in results if r.ok]
    classes = {}
    for value, name in class_names.items():
        rows = [r.scores.get(value, ClassScores(math.nan, math.nan, math.nan, 0, 0)) for r in scored]
        missing = [s.missing for s in rows]
        classes[name] = {
            "label": value,
            **{metric: summarise([getattr(s, metric) for s in rows]) for metric in ("dice", "hd95", "nsd")},
            "missing_in_prediction": missing.count("prediction"),
            "missing_in_label": missing.count("label"),
            "missing_in_both": missing.count("both"),
        }
    means = {}
    for metric in ("dice", "hd95", "nsd"):
        values = [c[metric]["mean"] for c in classes.values() if c[metric]["mean"] is not None]
        means[metric] = float(np.mean(values)) if values else None
    return {"cases": len(scored), "failed": [{"case": r.case_id, "message": r.message} for r in results if not r.ok],
            "tolerance_mm": tolerance_mm, "mean": means, "classes": classes}


def _number(value: float) -> str:
    return "" if value is None or not math.isfinite(value) else f"{value:.6g}"


def write_results(results: Sequence[CaseEvaluation], class_names: dict[int, str], output: Path,
                  tolerance_mm: float, extra: dict | None = None) -> dict:
    """Write `per_case.csv` and `summary.json` into `output`, each under a temporary name then renamed."""
    summary = {**(extra or {}), **summary_of(results, class_names, tolerance_mm)}
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["case", "status", *[f"{m}_{n}" for n in class_names.values() for m in ("dice", "hd95", "nsd",
                                                                                            "missing")],
                     "prediction", "label", "message"])
    for r in results:
        cells = []
        for value in class_names:
            s = r.scores.get(value)
            cells += ["", "", "", ""] if s is None else [_number(s.dice), _number(s.hd95), _number(s.nsd),
                                                          s.missing or ""]
        writer.writerow([escape(r.case_id), "ok" if r.ok else "failed", *cells,
                         escape(r.prediction.name) if r.prediction else "", escape(r.label.name), one_line(r.message)])
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SegError(f"cannot make the output folder ({err.strerror or err})", output) from None
    for name, text in ((PER_CASE, buffer.getvalue()), (SUMMARY, json.dumps(summary, indent=1, allow_nan=False))):
        atomic_write_text(output / name, text)
    return summary


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` atomically (`seg.io.write_atomic`); a failure is one line naming the file."""
    write_atomic(text, path)


def class_names_for(results: Sequence[CaseEvaluation], labels: dict[int, str] | None) -> dict[int, str]:
    """Foreground value -> name: the declared labels, else every value found, named `class_<value>`."""
    if labels is not None:
        return {v: n for v, n in labels.items() if v != 0}
    found = sorted({v for r in results for v in r.scores})
    return {v: f"class_{v}" for v in found}


def evaluate_folders(predictions: str | os.PathLike, labels: str | os.PathLike,
                     dataset: str | os.PathLike | None = None, tolerance_mm: float = DEFAULT_TOLERANCE_MM,
                     output: str | os.PathLike | None = None,
                     report: Callable[[str], None] | None = None) -> tuple[list[CaseEvaluation], dict]:
    """Score every label of `labels` against the prediction of the same name in `predictions`; write the results.

    Args:
        predictions, labels: folders of `.nii`/`.nii.gz` label maps.
        dataset: a dataset.json (or its folder) declaring the labels; default: the one beside `labels`
            (`ROOT/labelsTr` -> `ROOT/dataset.json`) when there is one, else the values found, `class_<value>`.
        tolerance_mm: NSD tolerance.
        output: where `per_case.csv` and `summary.json` go; default `predictions`.
    """
    predictions, labels = Path(predictions), Path(labels)
    if not math.isfinite(tolerance_mm) or tolerance_mm < 0:
        raise SegError(f"--tolerance must be a distance in mm >= 0, got {tolerance_mm}")
    output = Path(output or predictions)
    if output.exists() and not output.is_dir():
        raise SegError("--output is a file, not a folder: give a folder for per_case.csv and summary.json", output)
    label_files, prediction_files = nifti_files(labels), nifti_files(predictions)
    if not label_files:
        raise DataError("no .nii/.nii.gz label maps found", labels)
    if dataset is None and (labels.parent / "dataset.json").is_file():
        dataset = labels.parent / "dataset.json"
    declared = declared_labels(dataset) if dataset is not None else None
    pairs = [(case_id, prediction_files.get(case_id), path) for case_id, path in label_files.items()]
    results = evaluate_pairs(pairs, None if declared is None else [v for v in declared if v], tolerance_mm, report)
    summary = write_results(results, class_names_for(results, declared), output, tolerance_mm,
                            {"predictions": str(predictions), "labels": str(labels),
                             "dataset": None if dataset is None else str(dataset)})
    return results, summary


# ---- command line ----------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--predictions", "-p", required=True, help="folder of predicted label maps <case>.nii.gz")
    parser.add_argument("--labels", "-l", required=True, help="folder of the labels <case>.nii.gz (e.g. labelsTs)")
    parser.add_argument("--dataset", default=None,
                        help="dataset.json declaring the labels (default: the one beside --labels, if any)")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE_MM,
                        help=f"surface Dice tolerance in mm (default {DEFAULT_TOLERANCE_MM})")
    parser.add_argument("--output", "-o", default=None,
                        help="folder for per_case.csv and summary.json (default: the predictions folder)")


def format_summary(summary: dict) -> list[str]:
    """One line per class: mean Dice / HD95 / NSD and the missing counts."""
    lines = []
    for name, c in summary["classes"].items():
        def mean(metric, unit=""):
            value = c[metric]["mean"]
            return "n/a" if value is None else f"{value:.3f}{unit}"
        lines.append(f"{name}: Dice {mean('dice')}, HD95 {mean('hd95', ' mm')}, NSD@{summary['tolerance_mm']:g}mm "
                     f"{mean('nsd')}; missing in prediction {c['missing_in_prediction']}, in label "
                     f"{c['missing_in_label']}, in both {c['missing_in_both']}")
    return lines


def run(args: argparse.Namespace) -> int:
    def report(line: str) -> None:
        print(f"seg evaluate: {line}", file=sys.stderr)

    results, summary = evaluate_folders(args.predictions, args.labels, args.dataset, args.tolerance, args.output,
                                        report)
    for line in format_summary(summary):
        print(line)
    failed = len(summary["failed"])
    output = Path(args.output or args.predictions)
    report(f"{summary['cases']} cases scored, {failed} failed; {output / PER_CASE}, {output / SUMMARY}")
    return 1 if failed else 0
