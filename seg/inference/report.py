"""The per-case report of `seg predict`: what was found, and which results a reviewer should look at first.

For each case, on the scan's own grid:
- per foreground class: volume (ml), voxel count, mean and std of the input intensity inside it (first
  channel, in the scan's units: HU for CT), and the number of connected components (face-connected);
- quality flags, each one line: a class predicted nowhere ("empty"), a class in more than `FRAGMENTS` pieces
  ("fragmented"), a class touching the scan's border ("border": the structure may be cut off), a voxel spacing
  far outside the training scans' range ("spacing"; checkpoints without that range: far from the training
  spacing), CT intensities far from the training foreground ("intensity"), a CT scan through a model trained on
  another modality or the reverse ("modality": from the DICOM Modality, else from the intensities: CT has air
  near -1000 HU, MR no negative values), and a high predictive entropy ("uncertain");
- `uncertainty`: the mean normalised predictive entropy `-sum_c p_c log p_c / log C` in [0, 1] inside the
  predicted foreground, when the softmax was computed (`--uncertainty` or `--save-probabilities`). With
  `--tta` the softmax is the mean over mirrored passes, so disagreement between the passes raises it.

Numbers are computed in float64. One that is still not finite (a mean over values near float64's limit), or an
integer beyond 64 bits, is written as null, and the case's `nulls` says which and why (`json_ready`): report.json
is strict JSON whatever the scan holds.

`seg predict` and `seg overlays` end with `console_lines`: one line per case whose input is unlike the training
data (modality, spacing, intensity) or whose prediction is empty or fragmented, or a count when there are many.
"""

from __future__ import annotations

import json
import math
import os
import stat
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from seg.errors import escape, one_line
from seg.io import write_text

REPORT = "report.json"
# A spacing this many times coarser or finer than the training spacing on any axis is flagged: the network
# then sees anatomy at a scale it was not trained on (resampling cannot restore detail a thick slice lost).
SPACING_RATIO = 2.0
# CT: a predicted structure whose mean HU lies this many training standard deviations from the training
# foreground's mean is flagged (a contrast phase never seen in training, an MR scan through a CT model).
INTENSITY_STDS = 3.0
# Mean normalised entropy inside the foreground above this is flagged for review.
UNCERTAINTY_FLAG = 0.3
# A class predicted in more pieces than this is flagged: a model that learned an organ (or a handful of lesions)
# and returns hundreds of specks is segmenting noise or a scan unlike its training data (a CT through an MR
# model: 893 pieces of "liver").
FRAGMENTS = 20
# The flags `seg predict` and `seg overlays` print at the end of a run (the rest stay in report.json), and the
# cases printed one line each before a count and the report's path are printed instead.
CONSOLE_FLAGS = ("modality", "spacing", "intensity", "fragmented", "empty")
CONSOLE_CASES = 10


def ras_spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel size in mm along the closest R, A, S axes (for an oblique grid, the nearest axis)."""
    ornt = nib.orientations.io_orientation(affine)
    spacing = np.empty(3)
    spacing[ornt[:, 0].astype(int)] = nib.affines.voxel_sizes(affine)
    return spacing


def class_statistics(label: np.ndarray, image: np.ndarray | None, affine: np.ndarray,
                     class_names: Sequence[str]) -> dict[str, dict]:
    """Per foreground class: volume_ml, voxels, intensity_mean, intensity_std (None without voxels), components."""
    voxel_ml = abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0
    counts = np.bincount(label.ravel(), minlength=len(class_names) + 1)
    stats = {}
    for c, name in enumerate(class_names, start=1):
        mask = label == c
        # float64: float32 sums and squares of a uint64 scan's values (up to 2^64) overflow to infinity
        inside = image[mask].astype(np.float64) if image is not None and counts[c] else None
        # an overflow left even so is written as null with the reason (`json_ready`), not warned about
        with np.errstate(over="ignore", invalid="ignore"):
            stats[name] = {
                "volume_ml": float(counts[c]) * voxel_ml,
                "voxels": int(counts[c]),
                "intensity_mean": float(inside.mean()) if inside is not None else None,
                "intensity_std": float(inside.std()) if inside is not None else None,
                "components": int(ndimage.label(mask)[1]) if counts[c] else 0,
            }
    return stats


def touches_border(mask: np.ndarray) -> bool:
    """True when the mask reaches the first or last voxel along an axis (axes of one voxel do not count)."""
    for axis, size in enumerate(mask.shape):
        if size > 1 and (mask.take(0, axis).any() or mask.take(size - 1, axis).any()):
            return True
    return False


def entropy_score(probabilities: np.ndarray, foreground: np.ndarray) -> float | None:
    """Mean normalised predictive entropy in [0, 1] over `foreground`; None when it is empty.

    Args:
        probabilities: `(C, *S)` softmax.
        foreground: `S` boolean mask.
    """
    if not foreground.any() or probabilities.shape[0] < 2:
        return None
    p = np.clip(probabilities[:, foreground].astype(np.float64), 1e-12, 1.0)
    entropy = -(p * np.log(p)).sum(0) / np.log(probabilities.shape[0])
    return float(entropy.mean())


def quality_flags(stats: dict[str, dict], label: np.ndarray, affine: np.ndarray, preprocessing: dict,
                  uncertainty: float | None) -> list[str]:
    """One line per finding a reviewer should check; see the module docstring."""
    flags = []
    for c, (name, s) in enumerate(stats.items(), start=1):
        if s["voxels"] == 0:
            flags.append(f"empty: no voxel predicted as '{name}'")
            continue
        if s["components"] > FRAGMENTS:
            flags.append(f"fragmented: '{name}' is predicted in {s['components']} pieces (more than {FRAGMENTS})")
        if touches_border(label == c):
            flags.append(f"border: '{name}' touches the scan's border; it may extend beyond the scan")
    spacing = ras_spacing(affine)
    trained = training_spacing_range(preprocessing)
    if trained is not None:  # the training scans' own spacings, kept in checkpoints since fit-time fingerprints
        for axis, (have, low, high) in enumerate(zip(spacing, *trained)):
            if label.shape[axis] > 1 and not low / SPACING_RATIO <= have <= high * SPACING_RATIO:
                flags.append(f"spacing: {'RAS'[axis]} spacing {have:.3g} mm is more than {SPACING_RATIO:g}x outside "
                             f"the training scans' {low:.3g}-{high:.3g} mm")
    else:  # an older checkpoint: the spacing it resamples to
        target = np.asarray(preprocessing.get("spacing") or [0, 0, 0], dtype=float)
        for axis, (have, want) in enumerate(zip(spacing, target)):
            if want > 0 and label.shape[axis] > 1 and not 1 / SPACING_RATIO <= have / want <= SPACING_RATIO:
                flags.append(f"spacing: {'RAS'[axis]} spacing {have:.3g} mm is {have / want:.2g}x the training "
                             f"spacing {want:.3g} mm")
    scheme = (preprocessing.get("normalization") or [{}])[0]
    if scheme.get("scheme") == "ct":
        mean, std = float(scheme["mean"]), float(scheme["std"])
        far = [(n, s["intensity_mean"]) for n, s in stats.items()
               if s["intensity_mean"] is not None and abs(s["intensity_mean"] - mean) > INTENSITY_STDS * std]
        for name, value in far:
            flags.append(f"intensity: '{name}' has mean {value:.4g}, {abs(value - mean) / std:.1f} training std from "
                         f"the training foreground mean {mean:.4g} HU: is this a CT of the trained kind?")
    if uncertainty is not None and uncertainty > UNCERTAINTY_FLAG:
        flags.append(f"uncertain: mean predictive entropy {uncertainty:.2f} inside the foreground "
                     f"(above {UNCERTAINTY_FLAG})")
    return flags


def training_spacing_range(preprocessing: Mapping) -> tuple[list[float], list[float]] | None:
    """The smallest and largest voxel spacing (mm, R A S) of the training scans, or None (older checkpoints)."""
    fingerprint = preprocessing.get("fingerprint") or {}
    low, high = fingerprint.get("spacing_min"), fingerprint.get("spacing_max")
    return (list(low), list(high)) if low and high else None


def modality_flag(image: np.ndarray | None, preprocessing: dict, modality: str | None = None) -> str | None:
    """One line when the scan is a CT and the model was not trained on CT, or the reverse; else None."""
    trained = [str(m).strip().upper() for m in preprocessing.get("modalities") or []][:1]
    ct_model = trained == ["CT"]
    if modality:
        ct_scan = modality.strip().upper() == "CT"
        seen = f"DICOM Modality {modality}"
    elif image is not None and image.size:
        low = float(image.min())
        ct_scan = low <= -500.0  # air, as CT scans hold it and MR scans never do
        seen = f"lowest value {low:.4g} ({'like CT air in HU' if ct_scan else 'no air in HU: not a CT'})"
    else:
        return None
    if ct_scan == ct_model:
        return None
    return f"modality: scan looks {'like CT' if ct_scan else 'not like CT'} ({seen}), model trained on " \
           f"{', '.join(str(m) for m in preprocessing.get('modalities') or ['?'])}"


def intensity_note(preprocessing: dict) -> str:
    """One line saying what the intensity check compares, or why there is none (MR has no absolute scale)."""
    scheme = (preprocessing.get("normalization") or [{}])[0]
    if scheme.get("scheme") == "ct":
        return (f"CT: mean HU inside each class against the training foreground (mean {scheme['mean']:.4g}, std "
                f"{scheme['std']:.4g}); flagged beyond {INTENSITY_STDS:g} std")
    modality = (preprocessing.get("modalities") or ["MR"])[0]
    return (f"{modality}: z-scored per scan, intensities have no absolute scale: only the spacing is compared "
            "with the training data")


def case_report(label: np.ndarray, image: np.ndarray | None, affine: np.ndarray, class_names: Sequence[str],
                preprocessing: dict, probabilities: np.ndarray | None = None, modality: str | None = None) -> dict:
    """The report of one case (JSON-ready).

    Args:
        label: `(X, Y, Z)` class indices on the scan's grid.
        image: `(X, Y, Z)` the scan's first channel in its own units, or None.
        affine: the scan's voxel -> world affine.
        class_names: foreground class names (class c is `class_names[c - 1]`).
        preprocessing: the checkpoint's preprocessing (training spacing, CT statistics).
        probabilities: `(C, X, Y, Z)` softmax on the scan's grid, or None (no uncertainty then).
        modality: the DICOM Modality of the series, None for NIfTI (then guessed from the intensities).
    """
    stats = class_statistics(label, image, affine, class_names)
    uncertainty = entropy_score(probabilities, label > 0) if probabilities is not None else None
    flags = quality_flags(stats, label, affine, preprocessing, uncertainty)
    mismatch = modality_flag(image, preprocessing, modality)
    return json_ready({
        "shape": [int(s) for s in label.shape],
        "spacing_mm": [round(float(s), 4) for s in nib.affines.voxel_sizes(affine)],
        "classes": stats,
        "uncertainty": uncertainty,
        "flags": flags + ([mismatch] if mismatch else []),
    })


# JSON readers (JavaScript, many C and Java parsers) hold numbers as float64 or int64: a larger integer is garbled.
MAX_INTEGER = 2**63 - 1
# A report is 3 levels deep; an earlier report.json's entry nested deeper is not one of ours.
MAX_DEPTH = 16


def json_ready(report: dict) -> dict:
    """The case report with every non-finite float and every integer beyond 64 bits replaced by None, and
    `nulls`: {where: why} for each (absent when there is none). Strict JSON (`allow_nan=False`) accepts the result.
    """
    earlier = report.get("nulls")
    nulls = {str(k): one_line(str(v)) for k, v in earlier.items()} if isinstance(earlier, dict) else {}

    def clean(value, where: str, depth: int):
        if depth > MAX_DEPTH:
            nulls[where] = f"nested deeper than {MAX_DEPTH} levels"
            return None
        if isinstance(value, dict):
            return {str(k): clean(v, f"{where}.{k}" if where else str(k), depth + 1) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
        if isinstance(value, (int, np.integer)):
            if abs(int(value)) <= MAX_INTEGER:
                return int(value)
            nulls[where] = "an integer beyond 64 bits"
            return None
        if isinstance(value, (float, np.floating)):
            if math.isfinite(value):
                return float(value)
            nulls[where] = f"{float(value)}: not a finite number (the scan's values overflow float64 here)"
            return None
        return value

    cleaned = clean({k: v for k, v in report.items() if k != "nulls"}, "", 0)
    return {**cleaned, "nulls": nulls} if nulls else cleaned


def summary_columns(class_names: Sequence[str]) -> list[str]:
    """The report's columns in summary.csv (after the volumes)."""
    columns = []
    for name in class_names:
        columns += [f"voxels_{name}", f"mean_{name}", f"std_{name}", f"components_{name}"]
    return columns + ["uncertainty", "flags"]


def summary_values(report: dict, class_names: Sequence[str]) -> list[str]:
    """One case's values for `summary_columns` ("" where there is no report)."""
    if not report:
        return [""] * len(summary_columns(class_names))
    values = []
    classes = report.get("classes") if isinstance(report.get("classes"), dict) else {}
    for name in class_names:
        s = classes.get(name) if isinstance(classes.get(name), dict) else {}
        values += [_integer(s.get("voxels")), _number(s.get("intensity_mean")), _number(s.get("intensity_std")),
                   _integer(s.get("components"))]
    flags = sorted({flag.split(":", 1)[0] for flag in report.get("flags") or [] if isinstance(flag, str)})
    return values + [_number(report.get("uncertainty")), one_line(";".join(flags))]


def _number(value) -> str:
    """A float for the summary, "" for None and for anything that is not a finite number (an earlier report's)."""
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return f"{value:.4g}" if is_number and math.isfinite(value) else ""


def _integer(value) -> str:
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else ""


def previous_reports(path: Path, warn: Callable[[str], None] = lambda line: None) -> dict[str, dict]:
    """The case reports of an earlier `report.json` in the output folder (for cases `--skip-existing` keeps).

    A missing file gives none. One that is not a regular file (never opened: a fifo would block), or that is not
    the JSON `write_report` writes (half-written by another tool, corrupt, nested too deep), gives none with one
    line to `warn`; the skipped cases' reports are then computed again from their files.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return {}
    except OSError as err:
        warn(f"{escape(str(path))}: cannot read the earlier report ({err.strerror or err}); ignored")
        return {}
    if not stat.S_ISREG(mode):
        warn(f"{escape(str(path))}: the earlier report is not a regular file; ignored")
        return {}
    try:
        cases = json.loads(path.read_bytes()).get("cases")
    except (OSError, ValueError, AttributeError, RecursionError, MemoryError) as err:
        warn(one_line(f"{escape(str(path))}: the earlier report is not readable JSON "
                      f"({type(err).__name__}: {' '.join(str(err).split())[:200]}); ignored"))
        return {}
    if not isinstance(cases, dict):
        warn(f"{escape(str(path))}: the earlier report has no 'cases'; ignored")
        return {}
    return {str(case): json_ready(report) for case, report in cases.items() if isinstance(report, dict)}


def write_report(reports: dict[str, dict], path: Path, preprocessing: dict, meta: dict, durable: bool = True) -> None:
    """`report.json`, atomically: `{"seg": meta, "intensity_check": ..., "cases": {case: report}}`.

    Every case report goes through `json_ready`, so that a number an earlier report.json held (`1e400` reads
    as infinity) cannot make this one invalid.
    """
    document = {"seg": meta, "intensity_check": intensity_note(preprocessing),
                "training_spacing_mm": preprocessing.get("spacing"),
                "cases": {case: json_ready(report) for case, report in reports.items()}}
    write_text(path, json.dumps(document, indent=1, allow_nan=False), durable)


def console_flags(case: Mapping) -> list[str]:
    """A case report's flags worth a line on the console, in `CONSOLE_FLAGS` order; "empty" only when nothing at
    all is predicted (a scan without a lesion is not news)."""
    flags = [f for f in case.get("flags") or [] if f.split(":", 1)[0] in CONSOLE_FLAGS and not f.startswith("empty")]
    classes = case.get("classes") or {}
    if classes and not any(c.get("voxels") for c in classes.values()):
        flags.append("empty: nothing predicted")
    return sorted(flags, key=lambda f: CONSOLE_FLAGS.index(f.split(":", 1)[0]))  # the input's kind first: the cause


def console_lines(reports: Mapping[str, Mapping], report_path: Path | None = None,
                  limit: int = CONSOLE_CASES) -> list[str]:
    """What the end of a run says about its cases' reports: one line per flagged case, or, beyond `limit` cases, a
    count per kind and `report_path` (without one: the first `limit` lines and a count of the rest)."""
    flagged = {case: flags for case, report in reports.items() if (flags := console_flags(report))}
    if len(flagged) > limit and report_path is not None:
        kinds = Counter(kind for flags in flagged.values() for kind in {f.split(":", 1)[0] for f in flags})
        counts = ", ".join(f"{kind} {kinds[kind]}" for kind in CONSOLE_FLAGS if kinds[kind])
        return [f"{len(flagged)} cases flagged ({counts}): see {report_path}"]
    lines = [one_line(f"flagged {case}: {'; '.join(flags)}") for case, flags in flagged.items()]
    return lines[:limit] + ([f"and {len(lines) - limit} more flagged cases"] if len(lines) > limit else [])
