"""The preprocessing settings a model is trained with, the `preprocessing` dict every checkpoint and ONNX model
carries: its fields (`Preprocessing`), their one validator (`check_preprocessing`, for checkpoints and ONNX
metadata alike) and which normalisation each channel gets.

Plain Python (no MONAI, no torch): `seg plan` decides with it without loading the transform library. On disk the
settings stay a plain JSON-serialisable dict (old checkpoints load as they are); `Preprocessing` types it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TypedDict

from seg.data.checks import MAX_SPACING_MM
from seg.data.codes import parse_codes
from seg.errors import CheckpointError, DataError

# Voxel sizes a checkpoint may resample to: below 0.01 mm (10 micrometres, beyond any CT or MR) a scan of a few
# cm would be resampled to billions of voxels; above `MAX_SPACING_MM`, as check-data, the header's units are off.
MIN_SPACING_MM = 0.01


class Preprocessing(TypedDict, total=False):
    """The `preprocessing` dict (`seg.data.transforms.make_preprocessing` writes it; `seg.data.transforms` applies
    it). Fields marked "absent in older checkpoints" are optional; unknown extra fields are kept (a newer seg may
    add some)."""

    version: int  # 1
    spatial_dims: int  # 2 or 3 (2: the network sees axial slices; the volumes are still resampled in 3D)
    orientation: str  # "RAS"
    spacing: list[float]  # target voxel size in mm along R, A, S; a component <= 0 keeps the scan's own (2D: S)
    # one per channel: {"scheme": "zscore", "nonzero": bool} or {"scheme": "ct", "clip": [low, high], "mean", "std"}
    normalization: list[dict]
    modalities: list[str]  # channel names, e.g. ["CT"] or ["T2", "ADC"]
    in_channels: int  # network input channels
    num_classes: int  # network output channels, background included
    labels: dict[str, str]  # {"0": "background", "1": ...}
    class_names: list[str]  # the foreground names in label order
    patch_size: list[int]  # training patch (2 or 3 values)
    crop_foreground: bool  # crop each scan to the bounding box of its foreground (the body) before normalising
    # per channel, the intensity above which a voxel is body (CT: -500 HU, so air is cropped), or None: any nonzero
    # voxel (MR, whose background is zero); absent in older checkpoints (nonzero)
    crop_threshold: list[float | None]
    # the training scans' spacing range and more (`seg.data.fingerprint.training_summary`), for `seg predict`'s
    # warnings; absent in older checkpoints
    fingerprint: dict
    # label value ("1", ...) -> {"category": [code, scheme, meaning], "type": [...]}: DICOM SEG codes from dataset.json
    # (`seg.data.codes`); absent when the dataset gave none
    codes: dict
    plan: dict[str, str]  # `seg plan`'s reasons, config key -> reason; absent unless the run was planned


def channel_schemes(modalities: Sequence[str], normalization: str = "auto") -> list[str]:
    """Normalisation scheme per channel: "auto" gives CT channels "ct" and every other modality "zscore"."""
    if normalization not in ("auto", "zscore", "ct"):
        raise ValueError(f"normalization must be 'auto', 'zscore' or 'ct', got '{normalization}'")
    if normalization != "auto":
        return [normalization] * len(modalities)
    return ["ct" if m.strip().upper() == "CT" else "zscore" for m in modalities]


def refuse(path: Path | None, field: str, value, expected: str):
    """`CheckpointError`: a stored setting that is not what seg writes."""
    text = repr(value)
    raise CheckpointError(f"checkpoint's {field} is {text[:80] + '...' if len(text) > 80 else text}; expected "
                          f"{expected}: the file was not written by `seg fit` or was edited", path)


def is_int(value, low: int = 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def is_number(value, low: float = -math.inf, high: float = math.inf) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and low <= value <= high)


def check_preprocessing(pre: dict, hparams: dict, path: Path | None) -> Preprocessing:
    """`pre` as a `Preprocessing`, after checking every field the Predictor reads: checkpoints and ONNX metadata.

    Unknown extra fields are left alone (a newer seg may add some); missing or malformed ones, or ones that
    disagree with the network (channels, classes, dimensions), are a `CheckpointError` naming `path` (the
    checkpoint or ONNX file; None for a model built in memory).
    """
    def need(field: str, ok, expected: str):
        if field not in pre:
            raise CheckpointError(f"checkpoint's preprocessing has no '{field}'; use a .ckpt written by `seg fit`",
                                  path)
        if not ok(pre[field]):
            refuse(path, f"preprocessing '{field}'", pre[field], expected)
        key = {"in_channels": "in_channels", "num_classes": "out_channels", "spatial_dims": "spatial_dims"}.get(field)
        if key in hparams and hparams[key] != pre[field]:
            raise CheckpointError(f"checkpoint's preprocessing says {field} {pre[field]!r} but the network has "
                                  f"{key} {hparams[key]!r}; the file was edited or mixed from two runs", path)
        return pre[field]

    dims = need("spatial_dims", lambda v: v in (2, 3), "2 or 3")
    need("orientation", lambda v: isinstance(v, str) and len(v) == 3 and _valid_axcodes(v),
         "three axis codes such as 'RAS'")
    low, high = MIN_SPACING_MM, MAX_SPACING_MM
    need("spacing", lambda v: isinstance(v, (list, tuple)) and len(v) == 3
         and all(is_number(s, low, high) or (dims == 2 and i == 2 and s == 0) for i, s in enumerate(v)),
         f"3 voxel sizes in mm from {low:g} to {high:g} (a 2D model: 0 for the last)")
    channels = need("in_channels", is_int, "a positive integer")
    need("modalities", lambda v: isinstance(v, (list, tuple)) and len(v) == channels
         and all(isinstance(m, str) for m in v), f"{channels} modality names")
    need("normalization", lambda v: isinstance(v, (list, tuple)) and len(v) == channels and all(map(_scheme, v)),
         f"{channels} schemes: {{'scheme': 'zscore', 'nonzero': bool}} or {{'scheme': 'ct', 'clip': [low, high], "
         "'mean': m, 'std': s > 0}")
    classes = need("num_classes", lambda v: is_int(v, 2), "an integer >= 2")
    need("labels", lambda v: isinstance(v, dict) and all(isinstance(k, str) and isinstance(n, str)
                                                           for k, n in v.items()), "label value -> name")
    need("class_names", lambda v: isinstance(v, (list, tuple)) and len(v) == classes - 1
         and all(isinstance(n, str) for n in v), f"{classes - 1} class names")
    need("patch_size", lambda v: isinstance(v, (list, tuple)) and len(v) == dims and all(is_int(p) for p in v),
         f"{dims} positive integers")
    need("crop_foreground", lambda v: isinstance(v, bool), "true or false")
    if "fingerprint" in pre:  # the training scans' spacing range, since fit-time fingerprints; older: none
        need("fingerprint", lambda v: isinstance(v, dict) and all(
            isinstance(v.get(k), (list, tuple)) and len(v[k]) == 3 and all(is_number(s, 0.0) for s in v[k])
            for k in ("spacing_min", "spacing_max")), "{'spacing_min': [3 mm], 'spacing_max': [3 mm], ...}")
    if "codes" in pre:  # DICOM SEG codes per label value (`seg.data.codes`), when the dataset gave some
        labels = {int(k): v for k, v in pre["labels"].items() if str(k).isdigit()}
        try:
            parse_codes(pre["codes"], labels, None)
        except DataError as err:
            raise CheckpointError(f"{'model' if path is None else 'checkpoint'}'s preprocessing: {err}",
                                  path) from None
    if "crop_threshold" in pre:  # added with the CT body crop; older checkpoints crop to nonzero voxels
        need("crop_threshold", lambda v: v is None or (isinstance(v, (list, tuple)) and len(v) == channels and all(
            t is None or is_number(t) for t in v)), f"{channels} thresholds (a number, or null for nonzero)")
    return pre


def _valid_axcodes(codes: str) -> bool:
    pairs = [{"L", "R"}, {"P", "A"}, {"I", "S"}]
    return sorted(next((i for i, p in enumerate(pairs) if c in p), -1) for c in codes) == [0, 1, 2]


def _scheme(s) -> bool:
    if not isinstance(s, dict):
        return False
    if s.get("scheme") == "zscore":
        return isinstance(s.get("nonzero"), bool)
    if s.get("scheme") == "ct":
        clip = s.get("clip")
        return (isinstance(clip, (list, tuple)) and len(clip) == 2 and all(map(is_number, clip))
                and clip[0] < clip[1] and is_number(s.get("mean")) and is_number(s.get("std"))
                and s["std"] > 0)
    return False
