"""Per-axis strides that suit the data: how far a U-Net may downsample each axis of a patch.

A thin volume (16 slices of 4 mm under 0.8 mm pixels) cannot be halved along its slice axis as often as in-plane:
after three halvings 16 slices are 2, and a 3 x 3 x 3 convolution there sees mostly padding. The rule used here:
the coarsest feature map keeps at least `MIN_FEATURE_SIZE` voxels along every axis of the data it sees (the
patch, or the scan where the scan is smaller, since the rest of the patch is padding).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from seg.errors import SegError

# A 3-wide kernel needs 3 voxels along an axis to see a neighbourhood that is not padding.
MIN_FEATURE_SIZE = 3
AXIS_NAMES = ("0 (R-L)", "1 (A-P)", "2 (S-I)")


def per_axis(strides: Sequence[int | Sequence[int]], spatial_dims: int) -> list[tuple[int, ...]]:
    """Strides as one tuple per level with one value per axis (`2` -> `(2, 2, 2)` in 3D)."""
    return [(int(s),) * spatial_dims if np.isscalar(s) else tuple(int(v) for v in s) for s in strides]


def suggest_strides(extent: Sequence[float], levels: int, min_size: int = MIN_FEATURE_SIZE) -> list[list[int]]:
    """Strides for `levels` downsamplings: halve an axis while its feature map stays >= `min_size` voxels.

    Args:
        extent: voxels per axis that the network sees (see the module docstring).
        levels: downsampling steps (`len(channels) - 1`).

    Returns:
        one `[s_0, s_1, ...]` per level, each 2 or 1.
    """
    size = np.asarray(extent, dtype=np.float64)
    strides = []
    for _ in range(levels):
        step = [2 if s / 2 >= min_size else 1 for s in size]
        size = size / np.asarray(step)
        strides.append(step)
    return strides


def check_strides(strides: Sequence[int | Sequence[int]], patch_size: Sequence[int], extent: Sequence[float],
                  min_size: int = MIN_FEATURE_SIZE) -> None:
    """Refuse strides that the patch cannot be divided by, or that shrink an axis of the data below `min_size`.

    Args:
        strides: the model's strides (`--model.strides`).
        patch_size: the training patch and sliding window (`--data.patch_size`), one value per spatial axis.
        extent: per axis, the voxels of data a patch holds: the patch, or the median resampled scan when smaller.

    Raises:
        SegError: one line naming the axis, what it shrinks to, and a stride list that works.
    """
    dims = len(patch_size)
    levels = per_axis(strides, dims)
    if any(len(level) != dims for level in levels):
        raise SegError(f"--model.strides {list(strides)}: every entry needs one value per spatial axis ({dims})")
    total = np.prod(np.asarray(levels), axis=0) if levels else np.ones(dims, dtype=int)
    seen = np.minimum(np.asarray(patch_size, dtype=np.float64), np.asarray(extent, dtype=np.float64))
    suggestion = suggest_strides(seen, len(levels), min_size)
    for axis in range(dims):
        name = AXIS_NAMES[axis]  # 2D patches are axial slices: R-L and A-P
        if patch_size[axis] % total[axis]:
            raise SegError(f"--data.patch_size {list(patch_size)}: axis {name} is not a multiple of "
                           f"{int(total[axis])}, the product of --model.strides along it; use a multiple of "
                           f"{int(total[axis])}")
        if seen[axis] / total[axis] < min_size and total[axis] > 1:
            raise SegError(
                f"--model.strides {_compact([list(s) for s in levels])} shrink axis {name} from {seen[axis]:g} voxels "
                f"of data to {seen[axis] / total[axis]:g} (a 3x3x3 convolution needs at least {min_size}); use "
                f"--model.strides '{_compact(suggestion)}'")


def _compact(strides: list[list[int]]) -> str:
    return "[" + ",".join("[" + ",".join(str(v) for v in level) + "]" for level in strides) + "]"
