"""Training augmentation at nnU-Net's strength, from MONAI's transforms (`data.augmentation strong`).

nnU-Net v2's default training transforms (Isensee et al., Nature Methods 2021, supplementary "Data augmentation";
`nnUNetTrainer.get_training_transforms`), in MONAI:

| nnU-Net | here | probability |
| --- | --- | --- |
| rotation +-30 deg per axis (in-plane +-180 deg for 2D and thick-slice 3D) | `RandAffined` rotate_range | 0.2 |
| scaling 0.7-1.4 | `RandAffined` scale_range | 0.2 |
| Gaussian noise, variance U(0, 0.1) | `RandGaussianNoised` std <= 0.32 | 0.1 |
| Gaussian blur, sigma 0.5-1 | `RandGaussianSmoothd` | 0.2 |
| brightness x 0.75-1.25 | `RandScaleIntensityd` | 0.15 |
| contrast x 0.75-1.25 about the mean, range kept | `RandScaleIntensityFixedMeand` | 0.15 |
| low resolution, zoom 0.5-1 | `RandSimulateLowResolutiond` | 0.25 |
| gamma 0.7-1.5, statistics kept; inverted | `RandAdjustContrastd` (retain_stats) | 0.3; 0.1 |
| mirroring on every axis | `RandFlipd` on `data.flip_axes` (the plan lists every axis) | 0.5 each |

Like nnU-Net, the patch is cut larger than the network's (`augmented_crop`) and the rotation and scaling resample
it back to the patch size about its centre, so a rotated patch has image at its corners instead of padding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from monai.transforms import (
    MapTransform,
    RandAdjustContrastd,
    RandAffined,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandScaleIntensityd,
    RandScaleIntensityFixedMeand,
    RandSimulateLowResolutiond,
)

from seg.data.plan import ANISOTROPY  # nnU-Net's thick-axis ratio: a 3D patch this anisotropic turns in-plane only

CROP_MARGIN = 1.4  # the cut patch is this much larger per rotated axis: a 30 deg turn needs 1.37x, scaling eats more


def thick_axis(spacing: Sequence[float] | None, dims: int) -> int | None:
    """The axis of a 3D patch that is over `ANISOTROPY` x thicker than the finest; None when near-isotropic or 2D."""
    if dims != 3 or not spacing or len(spacing) < 3 or min(spacing[:3]) <= 0:
        return None
    spacing = list(spacing[:3])
    thickest = max(range(3), key=lambda a: spacing[a])
    return thickest if spacing[thickest] > ANISOTROPY * min(spacing) else None


def augmented_crop(patch: Sequence[int], spacing: Sequence[float] | None = None) -> list[int]:
    """The size cut from the scan for a `patch`: larger along the axes that rotate (all but a thick one)."""
    thick = thick_axis(spacing, len(patch))
    return [p if a == thick else int(math.ceil(p * CROP_MARGIN)) for a, p in enumerate(patch)]


def rotation_range(dims: int, thick: int | None) -> list[float]:
    """Radians per rotation axis for MONAI's `RandAffine` (2D: one angle; 3D: about x, y, z)."""
    if dims == 2:
        return [math.pi]
    if thick is not None:  # turn within the slices only: about the thick axis
        return [math.pi if a == thick else 0.0 for a in range(3)]
    return [math.pi / 6] * 3


def strong_augmentations(patch: Sequence[int], spacing: Sequence[float] | None = None,
                         keys: Sequence[str] = ("image", "label")) -> tuple[MapTransform, list[MapTransform]]:
    """nnU-Net-strength spatial and intensity transforms (module docstring) for a cut of `augmented_crop(patch)`.

    Args:
        patch: the network's patch (2 or 3 values); the output size of the spatial transform.
        spacing: the patch's voxel size (mm), to find a thick axis.
        keys: image, then label (resampled nearest).

    Returns:
        the spatial transform, from a `(C, *augmented_crop)` image and `(1, *augmented_crop)` label to `(C, *patch)`,
        `(1, *patch)`; then the intensity transforms of the image (mirroring goes between the two, `data.flip_axes`).
    """
    dims = len(patch)
    image = keys[0]
    thick = thick_axis(spacing, dims)
    # one RandAffine for both: nnU-Net draws rotation and scaling each with p 0.2, so either happens with p 0.36.
    # It always resamples (to `patch`, about the centre), also when neither is drawn: the cut is larger.
    # Scale 0.7-1.4 (MONAI's factor is 1 + the drawn value), the same on every axis in nnU-Net; drawn per axis here.
    spatial = RandAffined(keys, prob=0.36, rotate_range=rotation_range(dims, thick), scale_range=[(-0.3, 0.4)] * dims,
                          mode=("bilinear", "nearest"), padding_mode="zeros", spatial_size=list(patch),
                          cache_grid=True)
    return spatial, [
        RandGaussianNoised(image, std=0.1**0.5, prob=0.1),  # variance up to 0.1 (nnU-Net), std drawn in [0, 0.32]
        RandGaussianSmoothd(image, sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0), prob=0.2),
        RandScaleIntensityd(image, factors=0.25, prob=0.15),
        RandScaleIntensityFixedMeand(image, factors=0.25, fixed_mean=True, preserve_range=True, prob=0.15),
        RandSimulateLowResolutiond(image, zoom_range=(0.5, 1.0), prob=0.25,
                                   upsample_mode="bilinear" if dims == 2 else "trilinear"),
        RandAdjustContrastd(image, gamma=(0.7, 1.5), invert_image=True, retain_stats=True, prob=0.1),
        RandAdjustContrastd(image, gamma=(0.7, 1.5), retain_stats=True, prob=0.3),
    ]


__all__ = ["CROP_MARGIN", "augmented_crop", "rotation_range", "strong_augmentations", "thick_axis"]
