"""albumentations pipelines inside MONAI Compose: image and label map augmented together, seeded by MONAI."""

from __future__ import annotations

from collections.abc import Sequence

import albumentations as A
import cv2
import numpy as np
import torch
from monai.transforms import MapTransform, Randomizable
from monai.utils import MAX_SEED, convert_to_dst_type


def default_augmentations(spatial: bool = True, volume: bool = False) -> A.Compose:
    """Intensity changes (brightness/contrast, gamma, blur, noise) and, when `spatial`, a small rotation/scaling.

    Probabilities follow nnU-Net's (0.1-0.3 each), so most patches see one change or none.

    Args:
        spatial: add `A.Affine` (rotation +-15 degrees, scale 0.9-1.1); the label follows (nearest).
        volume: for 3D patches (`volume` target). albumentations 2.0.8's RandomBrightnessContrast and GaussNoise
            read their parameters from an `image` target and fail on a lone `volume`, so they are left out.
    """
    transforms: list[A.BasicTransform] = [
        A.RandomGamma(gamma_limit=(70, 150), p=0.15),
        A.GaussianBlur(sigma_limit=(0.5, 1.0), p=0.1),
    ]
    if not volume:
        transforms += [
            A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.15, p=0.15),
            A.GaussNoise(std_range=(0.01, 0.05), p=0.1),
        ]
    if spatial:
        transforms.append(A.Affine(rotate=(-15, 15), scale=(0.9, 1.1), border_mode=cv2.BORDER_CONSTANT,
                                   fill=0, fill_mask=0, p=0.25))
    return A.Compose(transforms)


class Albumentationsd(MapTransform, Randomizable):
    """Apply an albumentations transform to an image and, if present, its label map.

    2D: image (C, H, W) and label (1, H, W) go in as albumentations' `image` (H, W, C) and `mask` (H, W).
    3D: image (C, X, Y, Z) and label (1, X, Y, Z) go in as `volume` (Z, X, Y, C) and `mask3d` (Z, X, Y), so
    2D transforms act on axial slices, with the same parameters on every slice.

    albumentations clips float images to [0, 1]; each channel is mapped to [0, 1] by its own min and max
    before, and back after, so z-scored intensities keep their scale. Outputs keep the input type, dtype and
    MONAI metadata. The random stream comes from MONAI (`set_random_state`, DataLoader worker seeds), so a
    seeded Compose gives the same augmentations every run.

    Args:
        keys: the image key, then optionally the label key.
        transform: an `A.Compose` or a single albumentations transform.
        allow_missing_keys: skip the label when a sample has none.
    """

    def __init__(self, keys: Sequence[str] = ("image", "label"),
                 transform: A.BaseCompose | A.BasicTransform | None = None, allow_missing_keys: bool = True):
        super().__init__(keys, allow_missing_keys)
        if len(self.keys) not in (1, 2):
            raise ValueError(f"keys must be (image,) or (image, label), got {self.keys}")
        self.transform = transform if transform is not None else default_augmentations()
        self._seed = 0

    def randomize(self, data=None) -> None:
        self._seed = int(self.R.randint(MAX_SEED))

    def __call__(self, data):
        d = dict(data)
        self.randomize()
        self.transform.set_random_seed(self._seed)
        image_key, label_key = self.keys[0], (self.keys[1] if len(self.keys) == 2 else None)
        image = d[image_key]
        if image.ndim not in (3, 4):
            raise ValueError(f"'{image_key}' must be (C, H, W) or (C, X, Y, Z), got shape {tuple(image.shape)}")
        volume = image.ndim == 4
        # (C, H, W) -> (H, W, C); (C, X, Y, Z) -> (Z, X, Y, C)
        order = (3, 1, 2, 0) if volume else (1, 2, 0)
        pixels = torch.as_tensor(image).detach().cpu().float().permute(order).numpy()
        low = pixels.min(axis=tuple(range(pixels.ndim - 1)))
        scale = pixels.max(axis=tuple(range(pixels.ndim - 1))) - low
        scale[scale == 0] = 1.0
        inputs = {"volume" if volume else "image": np.ascontiguousarray((pixels - low) / scale, dtype=np.float32)}
        label = d.get(label_key) if label_key else None
        if label is not None:
            mask = torch.as_tensor(label).detach().cpu()[0]  # (H, W) or (X, Y, Z)
            mask = mask.permute(2, 0, 1) if volume else mask
            # cv2 warps uint8/uint16 masks, not int64 or float label maps
            mask = mask.round().numpy().astype(np.uint8 if mask.max() < 256 else np.uint16)
            inputs["mask3d" if volume else "mask"] = np.ascontiguousarray(mask)
        out = self.transform(**inputs)
        pixels = out["volume" if volume else "image"] * scale + low
        back = (3, 1, 2, 0) if volume else (2, 0, 1)
        d[image_key] = convert_to_dst_type(torch.from_numpy(np.ascontiguousarray(pixels)).permute(back), image,
                                           dtype=image.dtype)[0]
        if label is not None:
            mask = torch.from_numpy(np.ascontiguousarray(out["mask3d" if volume else "mask"]).astype(np.int64))
            mask = (mask.permute(1, 2, 0) if volume else mask)[None]
            d[label_key] = convert_to_dst_type(mask, label, dtype=label.dtype)[0]
        return d
