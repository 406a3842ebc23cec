"""Connected-component postprocessing of label maps, chosen per class on out-of-fold predictions (as nnU-Net).

Two steps per foreground class: keep only its largest connected component, or remove its components smaller than
a volume in ml (resolution-independent, so one choice serves scans of any voxel size). `choose_postprocessing` tries
them on predictions whose labels are known and keeps a step for a class only when it raises that class's mean Dice;
the choice is a small JSON file (`postprocessing.json`) that `seg predict --postprocessing` applies. Removed voxels
become background. Components are `scipy.ndimage.label`'s with full connectivity (26 neighbours in 3D), as
nnU-Net's.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from seg.errors import DataError, one_line
from seg.io import read_json, write_text

FORMAT = 1
STEPS = ("largest_component", "remove_small")
# Volumes tried by "remove_small", as fractions of the class's median labelled volume over the cases.
SMALL_FRACTIONS = (0.01, 0.05, 0.1, 0.25)
# 1e6 ml is a cubic metre, beyond any body: a `min_ml` above it erases the class on every scan, a typo or a forged
# file rather than a choice.
MAX_MIN_ML = 1e6
CLASS_KEY = re.compile(r"[0-9]{1,5}")  # ASCII digits: "²".isdigit() is true, and int() of 5,000 digits raises


def components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """`scipy.ndimage.label` with full connectivity: (component index per voxel, 0 outside; count)."""
    return ndimage.label(mask, structure=np.ones((3,) * mask.ndim, dtype=bool))


def voxel_ml(affine: np.ndarray) -> float:
    return abs(float(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))) / 1000.0


def apply_step(label: np.ndarray, value: int, step: dict | None, affine: np.ndarray) -> np.ndarray:
    """`label` with one class's step applied (in place); `step` None leaves it as it is."""
    if not step:
        return label
    index, count = components(label == value)
    if count == 0:
        return label
    sizes = np.bincount(index.ravel(), minlength=count + 1)
    sizes[0] = 0
    if step["step"] == "largest_component":
        drop = np.ones(count + 1, bool)
        drop[int(np.argmax(sizes))] = False
    else:
        drop = sizes * voxel_ml(affine) < float(step["min_ml"])
    drop[0] = False
    label[drop[index]] = 0
    return label


def apply_postprocessing(label: np.ndarray, affine: np.ndarray, plan: dict) -> np.ndarray:
    """Apply a `postprocessing.json` plan (`load_postprocessing`) to a label map, in place; returns it."""
    for key, choice in plan["classes"].items():
        apply_step(label, int(key), choice.get("step") and choice, affine)
    return label


@dataclass
class _ClassCase:
    """What Dice needs of one class in one case, for any subset of its predicted components."""

    sizes: np.ndarray  # voxels per predicted component
    overlaps: np.ndarray  # of them, voxels inside the label
    label_voxels: int
    voxel_ml: float

    def dice(self, keep: np.ndarray) -> float:
        predicted = int(self.sizes[keep].sum())
        if predicted + self.label_voxels == 0:
            return math.nan
        return 2.0 * int(self.overlaps[keep].sum()) / (predicted + self.label_voxels)

    def keep(self, step: str | None, min_ml: float = 0.0) -> np.ndarray:
        if step is None or not self.sizes.size:
            return np.ones(self.sizes.size, bool)
        if step == "largest_component":
            return np.arange(self.sizes.size) == int(np.argmax(self.sizes))
        return self.sizes * self.voxel_ml >= min_ml


def measure(prediction: np.ndarray, label: np.ndarray, affine: np.ndarray, classes: Sequence[int]) -> dict:
    """Per class: the sizes of the predicted components and their overlap with the label (for `choose_postprocessing`)."""
    out = {}
    for value in classes:
        truth = label == value
        index, count = components(prediction == value)
        sizes = np.bincount(index.ravel(), minlength=count + 1)[1:]
        overlaps = np.bincount(index.ravel(), weights=truth.ravel(), minlength=count + 1)[1:].astype(np.int64)
        out[value] = _ClassCase(sizes, overlaps, int(truth.sum()), voxel_ml(affine))
    return out


def choose_postprocessing(cases: Iterable[dict], class_names: dict[int, str]) -> dict:
    """Per class, the step that raises mean Dice the most over `cases` (`measure` outputs), or none.

    Dice as `seg evaluate`'s: 0 when one side is empty, and cases where the class is in neither map left out of the
    mean. A step is kept only when the mean rises (ties keep the prediction as it is).

    Returns:
        the `postprocessing.json` content: `{"format", "classes": {value: {"name", "step", "min_ml", "dice_before",
        "dice_after", "tried": {candidate: mean Dice}}}}`.
    """
    cases = list(cases)
    plan = {"format": FORMAT, "connectivity": "full", "classes": {}}
    for value, name in class_names.items():
        rows = [c[value] for c in cases if value in c]
        volumes = [r.label_voxels * r.voxel_ml for r in rows if r.label_voxels]
        candidates: list[tuple[str, str | None, float]] = [("none", None, 0.0),
                                                           ("largest_component", "largest_component", 0.0)]
        if volumes:
            median = float(np.median(volumes))
            candidates += [(f"remove_small<{f * median:.4g}ml", "remove_small", f * median) for f in SMALL_FRACTIONS]
        tried = {}
        for key, step, min_ml in candidates:
            scores = [r.dice(r.keep(step, min_ml)) for r in rows]
            finite = [s for s in scores if not math.isnan(s)]
            tried[key] = float(np.mean(finite)) if finite else None
        before = tried["none"]
        best = max((k for k in tried if tried[k] is not None), key=lambda k: tried[k], default="none")
        chosen = next(c for c in candidates if c[0] == best)
        if before is None or tried[best] <= before:
            chosen = candidates[0]
        plan["classes"][str(value)] = {
            "name": name, "step": chosen[1], "min_ml": chosen[2] if chosen[1] == "remove_small" else None,
            "dice_before": before, "dice_after": tried[chosen[0]], "tried": tried}
    return plan


def save_postprocessing(plan: dict, path: str | os.PathLike) -> Path:
    """Write a plan as JSON, atomically."""
    return write_text(path, json.dumps(plan, indent=1))


def load_postprocessing(path: str | os.PathLike, class_values: Sequence[int] | None = None) -> dict:
    """Read and check a `postprocessing.json`; `DataError` naming the file when it cannot be used.

    Args:
        class_values: the model's foreground values; a plan for another class is refused.
    """
    path = Path(path)
    plan = read_json(path, "postprocessing file")
    if not isinstance(plan, dict) or plan.get("format") != FORMAT or not isinstance(plan.get("classes"), dict):
        raise DataError(f"not a postprocessing file (format {FORMAT} with 'classes'); use the postprocessing.json "
                        "that `seg cv` writes", path)
    for key, choice in plan["classes"].items():
        if not (CLASS_KEY.fullmatch(key) and int(key) > 0) or not isinstance(choice, dict):
            raise DataError(f"class entry {one_line(repr(key)[:40])} must be a foreground label value (1 to 99999) "
                            "with a step", path)
        step = choice.get("step")
        if step not in (None, *STEPS):
            raise DataError(f"class {key}: unknown step {one_line(repr(step)[:40])}; expected one of {list(STEPS)} "
                            "or null", path)
        min_ml = choice.get("min_ml")
        # comparisons, not math.isfinite: an int of 400 digits overflows a float; NaN fails both comparisons
        if step == "remove_small" and not (isinstance(min_ml, (int, float)) and not isinstance(min_ml, bool)
                                           and 0 <= min_ml <= MAX_MIN_ML):
            raise DataError(f"class {key}: remove_small needs 'min_ml', a volume in ml from 0 to {MAX_MIN_ML:g}; "
                            f"got {one_line(repr(min_ml)[:40])}", path)
        if class_values is not None and int(key) not in class_values:
            raise DataError(f"is for class {key}, which the model does not predict (classes "
                            f"{sorted(class_values)})", path)
    return plan
