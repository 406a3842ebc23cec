"""Per-axis strides that suit the data: how far a U-Net may downsample each axis of a patch.

A thin volume (16 slices of 4 mm under 0.8 mm pixels) cannot be halved along its slice axis as often as in-plane:
after three halvings 16 slices are 2, and a 3 x 3 x 3 convolution there sees mostly padding. The one rule, used
by `seg plan` to choose strides and by `seg fit` to suggest them (`plan_strides`): halve an axis while its feature
map stays >= `PLANNED_FEATURE_SIZE` voxels and its spacing is at most twice the finest axis's. `seg fit` refuses
only strides that take the data a patch sees (the patch, or the scan where the scan is smaller, since the rest of
the patch is padding) below `MIN_FEATURE_SIZE`: a user's choice between the two is allowed, not planned.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from seg.errors import SegError

# Refused below this: a 3-wide kernel needs 3 voxels along an axis to see a neighbourhood that is not padding.
MIN_FEATURE_SIZE = 3
# Planned and suggested at least this: nnU-Net's smallest feature map edge, one voxel of margin over the kernel.
PLANNED_FEATURE_SIZE = 4
AXIS_NAMES = ("0 (R-L)", "1 (A-P)", "2 (S-I)")


def per_axis(strides: Sequence[int | Sequence[int]], spatial_dims: int) -> list[tuple[int, ...]]:
    """Strides as one tuple per level with one value per axis (`2` -> `(2, 2, 2)` in 3D)."""
    return [(int(s),) * spatial_dims if np.isscalar(s) else tuple(int(v) for v in s) for s in strides]


def plan_strides(patch: Sequence[float], spacing: Sequence[float], max_levels: int,
                 min_feature: int = PLANNED_FEATURE_SIZE) -> list[list[int]]:
    """Per-level, per-axis strides for `patch` (voxels) at `spacing` (mm), at most `max_levels` of them.

    Halve an axis while its feature map stays >= `min_feature` voxels and its spacing is at most twice the finest
    axis's (thin slices are first brought to the in-plane resolution); stop when no axis can be halved, or when
    only one short axis could (nnU-Net: a level for one axis alone only while it is >= 12 voxels).

    Returns:
        one `[s_0, s_1, ...]` per level, each 2 or 1.
    """
    size = np.array(patch, dtype=np.float64)  # copies: the caller's patch stays as it is
    mm = np.array(spacing, dtype=np.float64)
    strides = []
    for _ in range(max_levels):
        step = [2 if size[a] / 2 >= min_feature and mm[a] <= 2 * mm.min() else 1 for a in range(len(size))]
        if all(s == 1 for s in step):
            break
        if sum(s == 2 for s in step) == 1 and len(size) > 1 and size[step.index(2)] < 12:
            break  # a level for one axis alone only while it is long (nnU-Net: 12 voxels); else it adds little
        size /= step
        mm *= step
        strides.append(step)
    return strides


def suggest_strides(extent: Sequence[float], levels: int, spacing: Sequence[float] | None = None) -> list[list[int]]:
    """The strides `seg plan` would choose for `extent` voxels at `spacing` (None: isotropic), `levels` at most.

    Args:
        extent: voxels per axis that the network sees (see the module docstring).
        levels: downsampling steps (`len(channels) - 1`).
    """
    return plan_strides(extent, np.ones(len(extent)) if spacing is None else spacing, levels)


def check_strides(strides: Sequence[int | Sequence[int]], patch_size: Sequence[int], extent: Sequence[float],
                  min_size: int = MIN_FEATURE_SIZE, spacing: Sequence[float] | None = None) -> None:
    """Refuse strides that the patch cannot be divided by, or that shrink an axis of the data below `min_size`.

    Args:
        strides: the model's strides (`--model.strides`).
        patch_size: the training patch and sliding window (`--data.patch_size`), one value per spatial axis.
        extent: per axis, the voxels of data a patch holds: the patch, or the median resampled scan when smaller.
        spacing: the voxel size (mm) per patch axis, for the suggestion; None: isotropic.

    Raises:
        SegError: one line naming the axis, what it shrinks to, and a stride list that works.
    """
    dims = len(patch_size)
    levels = per_axis(strides, dims)
    if any(len(level) != dims for level in levels):
        raise SegError(f"--model.strides {list(strides)}: every entry needs one value per spatial axis ({dims})")
    total = np.prod(np.asarray(levels), axis=0) if levels else np.ones(dims, dtype=int)
    seen = np.minimum(np.asarray(patch_size, dtype=np.float64), np.asarray(extent, dtype=np.float64))
    suggestion = suggest_strides(seen, len(levels), spacing)
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
                f"--model.strides '{_compact(suggestion)}'" + _fewer_levels(len(suggestion), len(levels)))


def _fewer_levels(planned: int, levels: int) -> str:
    return f" with {planned + 1} --model.channels (fewer levels)" if planned < levels else ""


def _compact(strides: list[list[int]]) -> str:
    return "[" + ",".join("[" + ",".join(str(v) for v in level) + "]" for level in strides) + "]"
