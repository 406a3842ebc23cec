"""MONAI dictionary transforms from NIfTI files to network inputs, built from one `preprocessing` dict.

The deterministic part (`inference_transforms`: load, RAS, resample, crop to the body, normalise)
is shared by validation, testing and the `seg predict` command, and every geometric step in it is
invertible with `monai.transforms.Invertd` back to the scan's own grid. Training adds padding to the patch
size, foreground-weighted patch sampling and augmentation (`train_transforms`).

The `preprocessing` dict (JSON-serialisable, saved with a model): its fields are
`seg.data.preprocessing.Preprocessing`, checked by `seg.data.preprocessing.check_preprocessing`.

(About 430 lines: the MONAI pipelines of training, validation and prediction, kept together so that what is
inverted after prediction is visibly what was applied before it.)
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    CastToTyped,
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    LoadImaged,
    MapTransform,
    Orientationd,
    RandAffined,
    RandCropByLabelClassesd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    Spacingd,
    SpatialPadd,
    SqueezeDimd,
)

from seg.data.augmentation import augmented_crop, strong_augmentations
from seg.data.guard import guard_file, named_warnings
from seg.data.layout import DatasetInfo
from seg.data.preprocessing import Preprocessing, channel_schemes
from seg.errors import DataError, first_line

PREPROCESSING_VERSION = 1


def make_preprocessing(
    info: DatasetInfo,
    fingerprint: dict,
    spatial_dims: int = 3,
    patch_size: Sequence[int] = (96, 96, 96),
    spacing: Sequence[float] | None = None,
    normalization: str = "auto",
    ct_window: Sequence[float] | None = None,
    crop_foreground: bool = True,
) -> Preprocessing:
    """The `preprocessing` settings for a dataset (`seg.data.preprocessing.Preprocessing`).

    Args:
        info: the dataset layout (modalities, labels).
        fingerprint: from `seg.data.fingerprint.load_fingerprint`; needs `intensity` when a channel is CT.
        spatial_dims: 3 for volumes, 2 for axial slices.
        patch_size: training patch, `spatial_dims` values.
        spacing: target spacing along R, A, S; None: the dataset's median spacing.
        normalization: "auto" (CT channels: "ct", others: "zscore"), "zscore" or "ct" for every channel.
        ct_window: HU clip window for "ct"; None: the dataset's foreground 0.5 / 99.5 percentiles.
        crop_foreground: crop to the body: nonzero voxels, or for CT channels voxels above -500 HU (`BodyMask`).
    """
    target = [float(v) for v in (spacing if spacing is not None else fingerprint["spacing"])]
    if spatial_dims == 2:
        target = target[:2] + [0.0]  # slices keep their own thickness: only the plane is resampled
    if len(target) != 3:
        raise DataError(f"spacing needs 3 values (R, A, S), got {list(spacing or [])}", info.root)
    if normalization not in ("auto", "zscore", "ct"):
        raise DataError(f"normalization must be 'auto', 'zscore' or 'ct', got '{normalization}'", info.root)
    schemes = []
    for c, scheme in enumerate(channel_schemes(info.modalities, normalization)):
        if scheme == "zscore":
            # Over nonzero voxels, so a zero background (skull-stripped MR) does not set the scale.
            schemes.append({"scheme": "zscore", "nonzero": True})
        elif scheme == "ct":
            stats = (fingerprint.get("intensity") or [None] * (c + 1))[c]
            if stats is None:
                raise DataError("CT normalisation needs the fingerprint's intensity statistics", info.root)
            low, high = ct_window if ct_window is not None else (stats["percentile_00_5"], stats["percentile_99_5"])
            schemes.append({"scheme": "ct", "clip": [float(low), float(high)], "mean": stats["mean"],
                            "std": max(stats["std"], 1e-8)})
    return {
        "version": PREPROCESSING_VERSION,
        "spatial_dims": int(spatial_dims),
        "orientation": "RAS",
        "spacing": target,
        "normalization": schemes,
        "modalities": list(info.modalities),
        "in_channels": info.in_channels,
        "num_classes": info.num_classes,
        "labels": {str(k): v for k, v in info.labels.items()},
        "class_names": info.class_names,
        "patch_size": [int(v) for v in patch_size],
        "crop_foreground": bool(crop_foreground),
        "crop_threshold": [BODY_HU if m == "ct" else None for m in channel_schemes(info.modalities)],
    }


def nonzero(x):
    """Foreground for cropping: any nonzero voxel (a module-level function so worker processes can pickle it)."""
    return x != 0


# Air is -1000 HU and fat -100: -500 splits them. Lung (-850 to -500) is cut out of the mask but lies inside the
# body's bounding box, which is all the crop uses.
BODY_HU = -500.0
# Labelling connected pieces on a grid of at most this many voxels (a coarser sampling of the mask) keeps the
# speck removal under 0.1 s and a few MB on a 512 x 512 x 400 CT.
_SPECK_GRID = 2**21


class BodyMask:
    """Foreground for cropping: the voxels that belong to the patient, from any channel.

    A channel with a threshold (CT: `BODY_HU`) counts voxels above it, so the air around a CT (-1000 HU, which
    crop-to-nonzero keeps) is cropped; a channel without one counts nonzero voxels, as MR's zero background asks.
    With a threshold, pieces smaller than 1% of the largest (noise and streaks in the air) are dropped first, so
    a single bright voxel in a corner cannot stretch the crop back to the whole scan; arms and the table stay.

    Args:
        thresholds: one per image channel, a float or None.
    """

    def __init__(self, thresholds: Sequence[float | None]):
        self.thresholds = [None if t is None else float(t) for t in thresholds]

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """`(C, *S)` image -> `(1, *S)` bool mask."""
        mask = None
        for c in range(image.shape[0]):
            threshold = self.thresholds[c] if c < len(self.thresholds) else None
            part = image[c] > threshold if threshold is not None else image[c] != 0
            mask = part if mask is None else mask.logical_or_(part)
        if any(t is not None for t in self.thresholds):
            mask = drop_specks(mask)
        return mask[None]


def drop_specks(mask: torch.Tensor, keep: float = 0.01) -> torch.Tensor:
    """`mask` `(*S)` bool, cleared outside the bounding box of its pieces of at least `keep` x the largest one.

    Pieces are found on a regular subsample of the mask (`_SPECK_GRID` voxels at most), and the box grows by one
    sampling step on every side so nothing of a kept piece is lost between samples.
    """
    from scipy import ndimage

    step = max(1, math.ceil((mask.numel() / _SPECK_GRID) ** (1 / mask.ndim)))
    coarse = mask[(slice(None, None, step),) * mask.ndim].cpu().numpy()
    pieces, count = ndimage.label(coarse)
    if count <= 1:
        return mask
    sizes = np.bincount(pieces.ravel())[1:]
    kept = np.isin(pieces, 1 + np.flatnonzero(sizes >= keep * sizes.max()))
    where = np.argwhere(kept)
    lo = np.maximum((where.min(0) - 1) * step, 0)
    hi = np.minimum((where.max(0) + 2) * step, mask.shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    out = torch.zeros_like(mask)
    out[box] = mask[box]
    return out


# Elements per step of the chunked checks and normalisation: temporaries stay under 64 MiB, whatever the scan.
_CHUNK = 2**23


class LoadScand(LoadImaged):
    """`LoadImaged` that turns an unreadable file, or one with NaN or infinite voxels, into a `DataError` naming it.

    The values are checked as loaded, before resampling would smear a NaN over its neighbours. Before that,
    each file's header passes the size guard (`seg.data.guard`), with the size after resampling to `spacing`.
    """

    def __init__(self, keys, *args, spacing: Sequence[float] | None = None, **kwargs):
        # LoadImaged builds every reader MONAI knows, whichever is asked for; with pydicom installed (seg
        # reads DICOM) its nvImageCodec DICOM reader then warns twice on every machine without that GPU codec.
        plugin_log = logging.getLogger("monai.data.nvimgcodec_pydicom_plugin")
        level = plugin_log.level
        plugin_log.setLevel(logging.ERROR)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")
                super().__init__(keys, *args, **kwargs)
        finally:
            plugin_log.setLevel(level)
        self.spacing = spacing

    def __call__(self, data, reader=None):
        files = [p for key in self.key_iterator(dict(data)) for p in self._files(data[key])
                 if isinstance(p, (str, os.PathLike))]
        for path in files:
            guard_file(path, self.spacing)
        try:
            with named_warnings(*files):
                loaded = super().__call__(data, reader)
        except Exception as err:
            for key in self.key_iterator(dict(data)):
                for path in self._files(data[key]):
                    try:  # only on failure: find the file to blame
                        self._loader(path, reader)
                    except Exception as file_err:
                        raise DataError(f"cannot read this scan ({first_line(file_err)}); run `seg check-data`",
                                        path) from err
            raise
        for key in self.key_iterator(loaded):
            if loaded[key].is_floating_point():
                self._check_finite(loaded[key], self._files(data[key]))
        return loaded

    @staticmethod
    def _files(value) -> list:
        return list(value) if isinstance(value, (list, tuple)) else [value]

    @staticmethod
    def _check_finite(image: torch.Tensor, files: list) -> None:
        """Raise a `DataError` naming the file when any voxel is NaN or infinite (one file per channel, or one)."""
        # a chunk at a time: isfinite on a whole volume makes 1.75x its size in temporaries
        bad_per_channel = [sum(int(chunk.numel() - torch.isfinite(chunk).sum()) for chunk in channel.split(_CHUNK))
                           for channel in image.reshape(image.shape[0], -1)] if image.ndim > 1 else [
            int(image.numel() - torch.isfinite(image).sum())]
        bad, voxels, blame = sum(bad_per_channel), image.numel(), files[0]
        if not bad:
            return
        if len(files) > 1 and len(bad_per_channel) == len(files):  # one file per channel, stacked first
            channel = next(c for c, n in enumerate(bad_per_channel) if n)
            bad, voxels, blame = bad_per_channel[channel], image[channel].numel(), files[channel]
        what = "all voxels are" if bad == voxels else f"{bad} of {voxels} voxels are"
        raise DataError(f"{what} NaN or infinite; replace them (e.g. with 0) first", blame)


def zscore_(x: torch.Tensor, nonzero: bool) -> torch.Tensor:
    """Normalise one channel in place to zero mean and unit variance: `x <- (x - mean) / std`.

    As MONAI's `NormalizeIntensity(nonzero=..., channel_wise=True)`: with `nonzero`, the mean and (population)
    std are those of the nonzero voxels, and only those change; a std of 0 counts as 1; an all-zero channel stays.
    Unlike it, no full-size temporaries: MONAI's copies the masked voxels and builds the result out of place,
    5x the volume at its peak (2 GiB for a 512 x 512 x 400 CT; here under 64 MiB). Sums in float64.
    """
    flat = x.view(-1)
    total = squares = 0.0
    count = 0
    for chunk in flat.split(_CHUNK):
        wide = chunk.double()
        total += float(wide.sum())
        squares += float(wide.square_().sum())
        count += int(torch.count_nonzero(chunk)) if nonzero else chunk.numel()
    if count == 0:
        return x
    mean = total / count  # zeros add nothing to the sums: over the nonzero voxels when `nonzero`
    std = math.sqrt(max(squares / count - mean * mean, 0.0)) or 1.0
    for chunk in flat.split(_CHUNK):
        if nonzero:
            chunk.copy_(torch.where(chunk != 0, (chunk - mean) / std, chunk))
        else:
            chunk.sub_(mean).div_(std)
    return x


def ct_normalize_(x: torch.Tensor, low: float, high: float, mean: float, std: float) -> torch.Tensor:
    """Clip one channel to the HU window `[low, high]`, then `(x - mean) / std` with the dataset's statistics, in place.

    The same as MONAI's `ScaleIntensityRange(low, high, (low - mean) / std, (high - mean) / std, clip=True)`,
    without its three full-size temporaries.
    """
    return x.clamp_(low, high).sub_(mean).div_(std)


class NormalizeChannelsd(MapTransform):
    """Normalise each image channel by its own scheme: z-score per volume, or CT clip then dataset mean/std.

    MONAI's normalisers apply one scheme to every channel; a CT + MR dataset needs one per channel. The work is
    done in place on one float32 copy of the image (`zscore_`, `ct_normalize_`), so a volume costs twice its size.

    Args:
        keys: image keys, (C, *spatial) with C == len(schemes).
        schemes: the `normalization` entries of a preprocessing dict.
    """

    def __init__(self, keys, schemes: Sequence[dict], allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.schemes = [dict(s) for s in schemes]
        for s in self.schemes:
            if s["scheme"] not in ("zscore", "ct"):
                raise ValueError(f"unknown normalisation scheme '{s['scheme']}'; expected 'zscore' or 'ct'")

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            if image.shape[0] != len(self.schemes):
                source = getattr(image, "meta", {}).get("filename_or_obj")
                raise DataError(f"scan has {image.shape[0]} channels; the model expects {len(self.schemes)}", source)
            out = image.to(torch.float32, copy=True).contiguous()  # a copy: the input may be a cached item
            voxels = out.as_tensor() if isinstance(out, MetaTensor) else out  # the same memory, without meta per op
            for c, s in enumerate(self.schemes):
                if s["scheme"] == "zscore":
                    zscore_(voxels[c], s["nonzero"])
                else:
                    (low, high), mean, std = s["clip"], s["mean"], s["std"]
                    ct_normalize_(voxels[c], low, high, mean, std)
            d[key] = out
        return d


def inference_transforms(preprocessing: dict, keys: Sequence[str] = ("image",)) -> Compose:
    """The deterministic preprocessing of a scan (and optionally its label), from a preprocessing dict alone.

    Load, channels first, RAS, resample to the target spacing (image bilinear, others nearest), crop to the
    body (`BodyMask`: nonzero voxels, or above -500 HU for CT), normalise. Invert with `Invertd(..., transform=<this>, orig_keys="image")`.

    Args:
        preprocessing: see the module docstring.
        keys: "image" plus any label keys; each holds a file path (a list of paths: one file per channel).

    Returns:
        a Compose giving "image" (C, *spatial) float32 MetaTensor and label keys (1, *spatial).
    """
    keys = tuple(keys)
    if "image" not in keys:
        raise ValueError(f"keys must include 'image', got {keys}")
    modes = ["bilinear" if k == "image" else "nearest" for k in keys]
    steps = [
        LoadScand(keys, reader="NibabelReader", image_only=False, spacing=preprocessing["spacing"]),
        EnsureChannelFirstd(keys),
        Orientationd(keys, axcodes=preprocessing["orientation"], labels=None),  # None: axis names from the file's space
        Spacingd(keys, pixdim=preprocessing["spacing"], mode=modes, dtype=torch.float32),
    ]
    if preprocessing["crop_foreground"]:
        # Before normalising: afterwards the background is no longer zero.
        thresholds = preprocessing.get("crop_threshold")
        select = BodyMask(thresholds) if thresholds and any(t is not None for t in thresholds) else nonzero
        steps.append(CropForegroundd(keys, source_key="image", select_fn=select, allow_smaller=True,
                                     start_coord_key=None, end_coord_key=None))
    steps.append(NormalizeChannelsd("image", preprocessing["normalization"]))
    return Compose(steps)


def label_cast(keys: Sequence[str] = ("label",)) -> CastToTyped:
    """Labels as int64 class indices (some datasets store them as float)."""
    return CastToTyped(keys, dtype=torch.long, allow_missing_keys=True)


def val_transforms(preprocessing: dict, keys: Sequence[str] = ("image", "label")) -> Compose:
    """Validation and test: the inference preprocessing of image and label, label as int64. Whole volumes."""
    # Flat, not nested: CacheDataset looks for its first random step among the top-level transforms only.
    return Compose([*inference_transforms(preprocessing, keys).transforms, label_cast()])


def train_transforms(
    preprocessing: dict,
    samples_per_volume: int = 2,
    foreground_ratio: float = 1 / 3,
    flip_axes: Sequence[int] = (),
    augment: bool = True,
    albumentations: bool = False,
    sampling: str = "classes",
    class_ratios: Sequence[float] | None = None,
    strength: str = "light",
) -> Compose:
    """Training: the inference preprocessing, padding to the patch, patch sampling, augmentation.

    Args:
        preprocessing: see the module docstring.
        samples_per_volume: patches cut from each loaded volume.
        foreground_ratio: share of patches centred on a labelled voxel; the others centre on background.
        sampling: "classes" (MONAI `RandCropByLabelClassesd`): the foreground share is split between the
            foreground classes, so a small class (a lesion inside an organ) gets its own patch centres;
            "posneg" (`RandCropByPosNegLabeld`): centred on any labelled voxel, so a small class is seen only as
            often as its share of the foreground.
        class_ratios: with "classes", the relative share of patches centred on each class, background first
            (`num_classes` values); None: background `1 - foreground_ratio`, each foreground class an equal part
            of `foreground_ratio`. A class missing from a volume gives its share to the others.
        flip_axes: spatial axes (after RAS; in 2D 0 or 1) flipped with probability 0.5 each.
        augment: random rotation/scaling and intensity changes.
        albumentations: do the intensity (and, in 2D, the affine) augmentation with albumentations.
        strength: "light" (rotation +-15 deg and scaling 0.9-1.1 with p 0.25, mild intensity changes) or "strong"
            (nnU-Net's, `seg.data.augmentation`: a larger cut, rotation, scaling 0.7-1.4, gamma, contrast, low
            resolution; always MONAI, `albumentations` is ignored).

    Returns:
        a Compose giving a list of `samples_per_volume` dicts: "image" (C, *patch) float32, "label" (1, *patch) int64.
    """
    from seg.data.albumentations_transform import Albumentationsd, default_augmentations

    keys = ("image", "label")
    dims = preprocessing["spatial_dims"]
    patch = list(preprocessing["patch_size"])
    if len(patch) != dims:
        raise ValueError(f"patch_size {patch} needs {dims} values for spatial_dims={dims}")
    if strength not in ("light", "strong"):
        raise ValueError(f"augmentation strength must be 'light' or 'strong', got '{strength}'")
    strong = augment and strength == "strong"
    spacing = preprocessing.get("spacing")
    # strong: cut larger, the rotation resamples back to the patch (seg.data.augmentation)
    cut = augmented_crop(patch, spacing[:dims] if spacing else None) if strong else patch
    crop = cut + [1] if dims == 2 else cut  # 2D: one axial slice of the RAS volume
    if sampling == "classes":
        num_classes = int(preprocessing.get("num_classes") or 2)
        ratios = list(class_ratios) if class_ratios is not None else (
            [1.0 - foreground_ratio] + [foreground_ratio / (num_classes - 1)] * (num_classes - 1))
        if len(ratios) != num_classes or min(ratios) < 0 or sum(ratios) <= 0:
            raise ValueError(f"class_ratios needs {num_classes} non-negative values (background first), got {ratios}")
        # warn=False: a volume without some class (no lesion in this scan) is normal; MONAI would warn per patch
        sampler = RandCropByLabelClassesd(keys, label_key="label", spatial_size=crop, ratios=ratios,
                                          num_classes=num_classes, num_samples=samples_per_volume, warn=False)
    elif sampling == "posneg":
        sampler = RandCropByPosNegLabeld(keys, label_key="label", spatial_size=crop, pos=foreground_ratio,
                                         neg=1.0 - foreground_ratio, num_samples=samples_per_volume)
    else:
        raise ValueError(f"sampling must be 'classes' or 'posneg', got '{sampling}'")
    steps = [
        *inference_transforms(preprocessing, keys).transforms,  # flat: the cache stops at the first random step
        SpatialPadd(keys, spatial_size=cut + [-1] if dims == 2 else cut),
        sampler,
    ]
    if dims == 2:
        steps.append(SqueezeDimd(keys, dim=3))  # (C, H, W, 1) -> (C, H, W)
    flips = [RandFlipd(keys, prob=0.5, spatial_axis=axis) for axis in flip_axes]
    if strong:
        spatial, intensity = strong_augmentations(patch, spacing[:dims] if spacing else None, keys)
        steps += [spatial, *flips, *intensity]
    else:
        if augment and not (dims == 2 and albumentations):
            steps.append(RandAffined(keys, prob=0.25, rotate_range=[math.pi / 12] * (3 if dims == 3 else 1),
                                     scale_range=[0.1] * dims, mode=("bilinear", "nearest"), padding_mode="zeros",
                                     spatial_size=patch, cache_grid=True))
        steps += flips
        if augment and albumentations:
            steps.append(Albumentationsd(keys, default_augmentations(spatial=dims == 2, volume=dims == 3)))
        elif augment:
            sigma = (0.5, 1.0)
            steps += [
                RandScaleIntensityd("image", factors=0.25, prob=0.15),
                RandShiftIntensityd("image", offsets=0.1, prob=0.15),
                RandGaussianNoised("image", std=0.1, prob=0.1),
                RandGaussianSmoothd("image", sigma_x=sigma, sigma_y=sigma, sigma_z=sigma, prob=0.2),
            ]
    steps.append(label_cast())
    return Compose(steps)
