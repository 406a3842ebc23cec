"""Where a gate map's mass lies: on the target against chance (concentration), and its share inside each class."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage


def ellipsoid(radius_mm: float, spacing: Sequence[float]) -> np.ndarray:
    """Boolean structuring element: the voxels within `radius_mm` of the centre, on a grid of `spacing` (mm)."""
    spacing = np.asarray(spacing, dtype=np.float64)
    half = np.floor(radius_mm / spacing + 1e-9).astype(int)
    grids = np.meshgrid(*[np.arange(-h, h + 1) * s for h, s in zip(half, spacing)], indexing="ij")
    return sum(g**2 for g in grids) <= radius_mm**2 + 1e-9


def dilate_mm(mask: np.ndarray, radius_mm: float, spacing: Sequence[float]) -> np.ndarray:
    """`mask` grown by `radius_mm` in world distance (an ellipsoid in voxels on an anisotropic grid)."""
    mask = np.asarray(mask, dtype=bool)
    structure = ellipsoid(radius_mm, spacing) if radius_mm > 0 else None
    if structure is None or structure.size == 1:
        return mask.copy()
    # Only the target's bounding box (plus the radius) can change: dilating that box, not the whole scan,
    # keeps this cheap on a 512 x 512 x 300 CT with a small lesion.
    pad = np.array(structure.shape) // 2
    nonzero = np.argwhere(mask)
    if nonzero.size == 0:
        return mask.copy()
    lo = np.maximum(nonzero.min(0) - pad, 0)
    hi = np.minimum(nonzero.max(0) + pad + 1, mask.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    out = mask.copy()
    out[box] = ndimage.binary_dilation(mask[box], structure=structure)
    return out


def attention_concentration(gate: np.ndarray, target: np.ndarray, spacing: Sequence[float],
                            dilation_mm: float = 2.0) -> float:
    """(share of the gate's mass inside the dilated target) / (that region's share of the volume).

    1 means the gate looks no more at the target than anywhere else, above 1 that it focuses on it (at most
    `volume / region`, all mass inside), below 1 that it looks away. NaN when the target is empty or the gate is
    zero everywhere: there is nothing to measure.

    Args:
        gate: gate map `(*S)`, values >= 0.
        target: ground truth `(*S)`, nonzero = target (every foreground class).
        spacing: voxel size in mm per axis of `S`, for the dilation.
        dilation_mm: grow the target by this distance first, so a gate on the target's rim counts as on it.
    """
    gate = np.asarray(gate, dtype=np.float64)
    if gate.shape != np.shape(target):
        raise ValueError(f"gate {gate.shape} and target {np.shape(target)} differ in shape")
    region = dilate_mm(np.asarray(target) != 0, dilation_mm, spacing)
    region_share = region.mean()
    mass = gate.sum()
    if region_share == 0 or mass <= 0:
        return float("nan")
    return float(gate[region].sum() / mass / region_share)


def class_energy_share(gate: np.ndarray, label: np.ndarray, spacing: Sequence[float], class_names: Sequence[str],
                       dilation_mm: float = 2.0) -> dict[str, float]:
    """Per foreground class c, the share of the gate map's mass inside that class grown by `dilation_mm`:

        E_c = sum_{x in D(L == c)} g(x) / sum_x g(x)

    A thin class (the myocardium, the right ventricle) can hold little of a map that concentrates on the target as a
    whole: E_c says which class a gate looks at. The dilated classes may overlap, so the shares can sum past 1.
    NaN for a class absent from the label, and for every class when the map is zero everywhere.

    Args:
        gate: gate map `(*S)`, values >= 0.
        label: class indices `(*S)`; class c is `class_names[c - 1]`.
        spacing: voxel size in mm per axis of `S`, for the dilation.
        class_names: foreground class names.
        dilation_mm: grow each class by this distance first, so a gate on its rim counts as on it.
    """
    gate = np.asarray(gate, dtype=np.float64)
    label = np.asarray(label)
    if gate.shape != label.shape:
        raise ValueError(f"gate {gate.shape} and label {label.shape} differ in shape")
    mass = gate.sum()
    shares = {}
    for c, name in enumerate(class_names, start=1):
        region = dilate_mm(label == c, dilation_mm, spacing)
        shares[name] = float(gate[region].sum() / mass) if mass > 0 and region.any() else float("nan")
    return shares
