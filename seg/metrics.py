"""Segmentation scores of one label map against another, in millimetres: Dice, HD95, normalised surface Dice.

Self-contained (numpy, torch and MONAI's surface-distance utilities; no Lightning) so that `seg evaluate`, `seg cv`
and, later, the training module share one definition. Conventions, per foreground class:

- Dice: `2 |P & L| / (|P| + |L|)`; 0 when exactly one of prediction and label is empty, NaN when both are (the class
  is absent and nothing was predicted: no score, excluded from means).
- HD95 and NSD (normalised surface Dice, Nikolov et al. 2021, at a tolerance in mm): NaN when either side is empty.
  A class missing from the prediction or the label is counted (`ClassScores.missing`), never scored as 0 mm or
  as some made-up maximum distance.

Distances are Euclidean in mm on the voxel grid with the given spacing (each file's own: `spacing_of`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.metrics.utils import get_edge_surface_distance

# What a class is missing from, when it is: the prediction alone, the label alone, or both.
MISSING = ("prediction", "label", "both")


@dataclass(frozen=True)
class ClassScores:
    """The scores of one foreground class in one case.

    Attributes:
        dice: Dice in [0, 1]; NaN when the class is in neither map.
        hd95: 95th-percentile symmetric Hausdorff distance in mm; NaN when either map lacks the class.
        nsd: normalised surface Dice in [0, 1] at the tolerance; NaN when either map lacks the class.
        predicted_voxels, label_voxels: the class's voxel counts.
        missing: "prediction", "label", "both" or None (present in both).
    """

    dice: float
    hd95: float
    nsd: float
    predicted_voxels: int
    label_voxels: int

    @property
    def missing(self) -> str | None:
        if self.predicted_voxels and self.label_voxels:
            return None
        if self.predicted_voxels:
            return "label"
        return "prediction" if self.label_voxels else "both"


def spacing_of(affine: np.ndarray) -> tuple[float, ...]:
    """Voxel size in mm along each array axis: the lengths of the affine's columns (rotations keep distances)."""
    return tuple(float(v) for v in np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0))


def confusion(prediction: np.ndarray, label: np.ndarray, num_classes: int) -> np.ndarray:
    """`(num_classes, num_classes)` voxel counts, rows = label class, columns = predicted class.

    One pass over the voxels for every class at once (MONAI's `DiceMetric` takes a one-hot or one class at a time);
    the per-class sizes it gives are also what says whether a class is missing. Values outside `0..num_classes-1`
    must have been refused by the caller.
    """
    flat = label.astype(np.int64, copy=False).ravel() * num_classes + prediction.astype(np.int64, copy=False).ravel()
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def dice_from_confusion(matrix: np.ndarray) -> np.ndarray:
    """Dice of every foreground class (1..K-1) from `confusion`'s matrix; NaN where both sides are empty."""
    intersection = np.diag(matrix)[1:].astype(np.float64)
    sizes = (matrix.sum(0) + matrix.sum(1))[1:].astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(sizes > 0, 2.0 * intersection / sizes, np.nan)


def surface_scores(prediction: np.ndarray, label: np.ndarray, spacing: Sequence[float],
                   tolerance_mm: float) -> tuple[float, float]:
    """(HD95 in mm, NSD at `tolerance_mm`) of two binary masks on one grid; (NaN, NaN) when either is empty.

    One call of MONAI's `get_edge_surface_distance` (edges by erosion, cropped to the masks' bounding box, Euclidean
    distance transform with `spacing`) gives both: HD95 is then MONAI's `compute_hausdorff_distance(percentile=95)`
    (the larger of the two directed 95th percentiles) and NSD its `compute_surface_dice` (the share of both edges
    within the tolerance of the other). Calling those two would run the distance transforms twice, and
    `torch.quantile` refuses more than 2^24 distances (a speckled prediction on a big CT has more): numpy's
    percentile does not. Axes of length 1 are dropped first, so a single slice is scored as the 2D image it is
    (a 3D erosion would make every pixel an edge).
    """
    prediction, label = np.asarray(prediction, dtype=bool), np.asarray(label, dtype=bool)
    if prediction.shape != label.shape:
        raise ValueError(f"masks of shapes {prediction.shape} and {label.shape}")
    if not prediction.any() or not label.any():
        return float("nan"), float("nan")
    keep = [axis for axis, size in enumerate(prediction.shape) if size > 1] or [0]
    shape = tuple(prediction.shape[a] for a in keep)
    spacing = [float(spacing[a]) for a in keep]
    _, (to_label, to_prediction), _ = get_edge_surface_distance(
        torch.from_numpy(prediction.reshape(shape)), torch.from_numpy(label.reshape(shape)),
        distance_metric="euclidean", spacing=spacing, symmetric=True)
    to_label, to_prediction = to_label.double().numpy(), to_prediction.double().numpy()
    hd95 = max(float(np.percentile(to_label, 95)), float(np.percentile(to_prediction, 95)))
    within = np.count_nonzero(to_label <= tolerance_mm) + np.count_nonzero(to_prediction <= tolerance_mm)
    return hd95, within / (to_label.size + to_prediction.size)


def score_case(prediction: np.ndarray, label: np.ndarray, classes: Sequence[int], spacing: Sequence[float],
               tolerance_mm: float = 1.0, surfaces: bool = True) -> list[ClassScores]:
    """Scores of the foreground classes `classes` (label values, e.g. `[1, 2]`) of one case, in that order.

    Args:
        prediction, label: non-negative integer label maps of one shape.
        classes: the label values to score.
        spacing: voxel size in mm per array axis (`spacing_of(affine)`).
        tolerance_mm: NSD tolerance.
        surfaces: also HD95 and NSD (NaN when False: Dice alone is one pass, surfaces a distance transform each).
    """
    size = int(max([0, *classes, int(prediction.max(initial=0)), int(label.max(initial=0))])) + 1
    matrix = confusion(prediction, label, size)
    dice = dice_from_confusion(matrix)
    scores = []
    for c in classes:
        predicted, labelled = int(matrix[:, c].sum()), int(matrix[c].sum())
        hd95 = nsd = float("nan")
        if surfaces and predicted and labelled:
            hd95, nsd = surface_scores(prediction == c, label == c, spacing, tolerance_mm)
        scores.append(ClassScores(float(dice[c - 1]), hd95, nsd, predicted, labelled))
    return scores


def summarise(values: Sequence[float]) -> dict:
    """mean, median, std (numpy's, ddof 0) and n over the finite values; None for a statistic with no value."""
    finite = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)
    if not finite.size:
        return {"mean": None, "median": None, "std": None, "n": 0}
    return {"mean": float(finite.mean()), "median": float(np.median(finite)), "std": float(finite.std()),
            "n": int(finite.size)}
