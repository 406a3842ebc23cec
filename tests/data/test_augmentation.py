"""Every training augmentation keeps image and label aligned, in 2D and 3D, isotropic and thick-slice.

The volume's label is a function of its intensity (three flat levels), so after any spatial augmentation the
label must still be that function of the augmented image, away from the edges where the image is interpolated and
the label is not. Intensity-only transforms (those that do not name the label) are left out: they change the
levels, not where they are.
"""

import albumentations as A
import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import RandAffined, RandFlipd, Randomizable
from scipy import ndimage

from seg.data.albumentations_transform import Albumentationsd
from seg.data.augmentation import CROP_MARGIN, augmented_crop, rotation_range, thick_axis
from seg.data.transforms import train_transforms

LEVELS = (10.0, 20.0, 30.0)  # intensity of background, class 1, class 2 inside the scan; 0 outside it


def _case(tmp_path, shape, spacing):
    label = np.zeros(shape, np.uint8)
    x, y, z = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    c = [n / 2 for n in shape]
    r = (((x - c[0]) / (shape[0] / 3)) ** 2 + ((y - c[1]) / (shape[1] / 4)) ** 2 + ((z - c[2]) / (shape[2] / 3)) ** 2)
    label[r < 1] = 1  # an ellipsoid, with an off-centre box of class 2 inside it: no symmetry hides a wrong turn
    label[int(c[0]) : int(c[0]) + shape[0] // 6, int(c[1]) - shape[1] // 8 : int(c[1]),
          int(c[2]) - shape[2] // 6 : int(c[2]) + 1] = 2
    image = np.asarray(LEVELS, np.float32)[label]
    affine = np.diag([*spacing, 1.0])
    nib.save(nib.Nifti1Image(image, affine), tmp_path / "image.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), tmp_path / "label.nii.gz")
    return {"image": str(tmp_path / "image.nii.gz"), "label": str(tmp_path / "label.nii.gz")}


def _preprocessing(dims, patch, spacing):
    return {"spatial_dims": dims, "orientation": "RAS", "spacing": list(spacing[:2]) + [spacing[2] if dims == 3 else 0.0],
            "normalization": [{"scheme": "zscore", "nonzero": True}], "patch_size": patch, "crop_foreground": False,
            "num_classes": 3}


def _spatial_only(transforms):
    """The pipeline without its random intensity steps, and with every spatial step always applied."""
    kept = []
    for t in transforms.transforms:
        if isinstance(t, Albumentationsd):  # keep its geometric (image-and-mask) transforms, always applied
            t.transform = A.Compose([a for a in t.transform.transforms if isinstance(a, A.DualTransform)])
            for a in t.transform.transforms:
                a.p = 1.0
        elif isinstance(t, Randomizable) and "label" not in getattr(t, "keys", ("label",)):
            continue  # a random intensity change (normalisation, also image-only, stays: it is not random)
        if isinstance(t, (RandAffined, RandFlipd)):
            t.prob = 1.0
        kept.append(t)
    transforms.transforms = tuple(kept)
    return transforms


def _levels(item, preprocessing):
    """The three class levels after normalisation (the same for every patch: z-scored once per scan)."""
    plain = train_transforms(preprocessing, samples_per_volume=1, augment=False)
    plain.set_random_state(seed=0)
    sample = plain(item)[0]
    return [sample["image"][sample["label"] == k].mean().item() for k in range(3)]


def _agreement(sample, levels):
    """Share of voxels, away from label edges and not background on both sides, whose label is the class of the
    nearest level (0 outside the scan); and how many voxels that was."""
    image, label = (sample[k][0].detach().as_subclass(torch.Tensor).numpy() for k in ("image", "label"))
    candidates = np.asarray([*levels, 0.0])  # padding: zero after z-scoring, the background's side
    predicted = np.asarray([0, 1, 2, 0])[np.abs(image[..., None] - candidates).argmin(-1)]
    edge = ndimage.grey_dilation(label, size=3) != ndimage.grey_erosion(label, size=3)
    counted = ~edge & ((label > 0) | (predicted > 0))
    return float((predicted == label)[counted].mean()) if counted.any() else 1.0, int(counted.sum())


CASES = [  # dims, patch, scan shape, spacing (mm), strength, albumentations
    (3, [24, 24, 24], (40, 40, 40), (1.0, 1.0, 1.0), "strong", False),
    (3, [24, 24, 8], (40, 40, 12), (1.0, 1.0, 4.0), "strong", False),  # thick slices: turns in-plane only
    (2, [32, 32], (40, 40, 12), (1.0, 1.0, 4.0), "strong", False),
    (3, [24, 24, 24], (40, 40, 40), (1.0, 1.0, 1.0), "light", False),
    (3, [24, 24, 8], (40, 40, 12), (1.0, 1.0, 4.0), "light", False),
    (2, [32, 32], (40, 40, 12), (1.0, 1.0, 4.0), "light", True),  # the 2D default: albumentations' affine
    (2, [32, 32], (40, 40, 12), (1.0, 1.0, 4.0), "light", False),
]


@pytest.mark.parametrize("dims,patch,shape,spacing,strength,albumentations", CASES)
def test_augmented_label_is_still_the_function_of_the_augmented_image(tmp_path, dims, patch, shape, spacing,
                                                                     strength, albumentations):
    item = _case(tmp_path, shape, spacing)
    preprocessing = _preprocessing(dims, patch, spacing)
    levels = _levels(item, preprocessing)
    transforms = _spatial_only(train_transforms(preprocessing, samples_per_volume=4, flip_axes=list(range(dims)),
                                                augment=True, albumentations=albumentations, strength=strength))
    transforms.set_random_state(seed=3)
    checked = 0
    for _ in range(3):
        for sample in transforms(item):
            assert tuple(sample["image"].shape) == (1, *patch) and tuple(sample["label"].shape) == (1, *patch)
            agreement, counted = _agreement(sample, levels)
            if counted < 20:
                continue  # a patch centred on background far from the structures
            assert agreement > 0.99, agreement
            checked += 1
            # the control: the same label against an image that moved alone fails the check
            shifted = {"image": torch.roll(sample["image"].as_subclass(torch.Tensor), shifts=patch[0] // 3, dims=1),
                       "label": sample["label"]}
            assert _agreement(shifted, levels)[0] < 0.9
    assert checked >= 3


def test_strong_augmentation_cuts_a_larger_patch_and_turns_thick_slices_in_plane_only():
    assert thick_axis([1.0, 1.0, 1.0], 3) is None and thick_axis([0.7, 0.7, 5.0], 3) == 2
    assert thick_axis([1.0, 1.0, 0.0], 2) is None
    assert augmented_crop([40, 56, 40], [1.0, 1.0, 1.0]) == [56, 79, 56]
    assert augmented_crop([160, 160, 16], [1.5, 1.5, 5.0]) == [224, 224, 16]  # the thick axis is not turned
    assert augmented_crop([224, 256]) == [int(np.ceil(224 * CROP_MARGIN)), int(np.ceil(256 * CROP_MARGIN))]
    assert rotation_range(3, 2) == [0.0, 0.0, np.pi] and rotation_range(2, None) == [np.pi]
    assert rotation_range(3, None) == [np.pi / 6] * 3


def test_an_unknown_strength_is_refused(tmp_path):
    with pytest.raises(ValueError, match="light' or 'strong"):
        train_transforms(_preprocessing(3, [8, 8, 8], (1.0, 1.0, 1.0)), strength="heavy")
