"""Dataset fingerprint: the numbers preprocessing needs, measured once per dataset and cached as JSON.

- median voxel spacing and shape along R, A, S (after reorientation), and each case's, from the NIfTI headers only;
- where the classes lie relative to each other (`class_separation`): per world axis (R, A, S), the median over
  up to 16 labels of the largest distance in mm between two classes' centroids along that axis; the plan mirrors
  left-right in a short run only when that keeps the classes' arrangement;
- on request (CT normalisation), per image channel the 0.5 / 99.5 percentiles, mean and std of the
  intensities under the labels, from up to `max_cases` cases and `voxels_per_case` voxels each (nnU-Net).

The cache file is named by a hash of the dataset folder, its file list, sizes and modification times, so an
edited dataset gets a new fingerprint. It lives in `cache_dir` when given, else in
`$XDG_CACHE_HOME/seg/fingerprints/` (`~/.cache/seg/fingerprints/`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np

from seg.data.guard import guard_file, named_warnings, ras_spacing_shape
from seg.data.layout import Case, DatasetInfo
from seg.errors import DataError
from seg.io import write_text

FINGERPRINT_VERSION = 3  # 2: per-case spacings and shapes; 3: class_separation


def ras_geometry(path: str | os.PathLike) -> tuple[list[float], list[int]]:
    """Voxel spacing (mm) and shape of a scan along R, A, S, i.e. as `Orientationd("RAS")` will lay it out.

    Reads the header only. Spacing is the norm of each affine column, as MONAI's `Spacingd` measures it.
    """
    try:
        with named_warnings(path):
            image = nib.load(os.fspath(path))
    except Exception as err:  # nibabel raises many types for a bad header
        raise DataError(f"cannot read NIfTI header: {err}", path) from None
    return ras_spacing_shape(image.affine, image.shape)


def dataset_key(info: DatasetInfo) -> str:
    """Hash of the dataset folder, its image and label files, their sizes and modification times."""
    entries = []
    for case in info.cases:
        for path in (*case.images, case.label):
            if path is None:
                continue
            try:
                stat = os.stat(path)
            except OSError:
                raise DataError("file listed by the dataset is missing", path) from None
            entries.append([os.fspath(Path(path).relative_to(info.root)), stat.st_size, stat.st_mtime_ns])
    payload = json.dumps([FINGERPRINT_VERSION, os.fspath(Path(info.root).resolve()), entries])
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def fingerprint_path(info: DatasetInfo, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the fingerprint of `info` is cached."""
    name = f"{dataset_key(info)}.json"
    if cache_dir is not None:
        return Path(cache_dir) / f"fingerprint-{name}"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "seg" / "fingerprints" / name


def _channels(case: Case) -> list[np.ndarray]:
    """The image channels of a case as 3D arrays in file voxel order (one file per channel, or one 4D file)."""
    if len(case.images) > 1:
        return [np.asarray(guard_file(p).dataobj) for p in case.images]
    data = np.asarray(guard_file(case.images[0]).dataobj)
    return [data] if data.ndim == 3 else [data[..., c] for c in range(data.shape[-1])]


def evenly_spaced_cases(info: DatasetInfo, max_cases: int) -> list[Case]:
    """At most `max_cases` of the dataset's cases, evenly spaced over its sorted list (the first and last included)."""
    picks = np.unique(np.linspace(0, len(info.cases) - 1, min(max_cases, len(info.cases))).round().astype(int))
    return [info.cases[i] for i in picks]


def foreground_intensities(info: DatasetInfo, max_cases: int = 64, voxels_per_case: int = 10_000,
                           seed: int = 0) -> list[dict[str, float]]:
    """Per channel: 0.5 / 99.5 percentiles, mean and std of the intensities where the label is > 0.

    Cases are an evenly spaced subset of at most `max_cases`; voxels a seeded random subset of each case's
    foreground. Raises `DataError` for a case whose label grid does not match its image.
    """
    rng = np.random.default_rng(seed)
    samples: list[list[np.ndarray]] = [[] for _ in range(info.in_channels)]
    for case in evenly_spaced_cases(info, max_cases):
        try:
            mask = np.asarray(guard_file(case.label).dataobj) > 0
            channels = _channels(case)
        except DataError:
            raise
        except Exception as err:
            raise DataError(f"cannot read case '{case.case_id}': {err}", case.images[0]) from None
        index = np.flatnonzero(mask.reshape(-1))
        if index.size > voxels_per_case:
            index = rng.choice(index, voxels_per_case, replace=False)
        for c, channel in enumerate(channels[: info.in_channels]):
            if channel.shape != mask.shape:
                raise DataError(f"label shape {mask.shape} differs from image shape {channel.shape}", case.label)
            samples[c].append(channel.reshape(-1)[index].astype(np.float64))
    stats = []
    for c, parts in enumerate(samples):
        values = np.concatenate(parts) if parts else np.zeros(0)
        if values.size == 0:
            raise DataError(f"no foreground voxels found to measure channel {c} intensities", info.root)
        lo, hi = np.percentile(values, [0.5, 99.5])
        stats.append({"percentile_00_5": float(lo), "percentile_99_5": float(hi),
                      "mean": float(values.mean()), "std": float(values.std())})
    return stats


def class_separation(info: DatasetInfo, max_cases: int = 16) -> list[float] | None:
    """How far apart the foreground classes lie along each world axis: `[R, A, S]` mm, or None when no case holds
    two classes (a one-class dataset).

    Per case (an evenly spaced subset of at most `max_cases`), each class's centroid in world (RAS) mm through the
    label's affine, and per axis the largest distance between two of them; then the median over the cases. The
    hippocampus's anterior and posterior parts lie about 18 mm apart front to back and 2 mm apart left to right;
    a heart's ventricles lie side by side left to right.
    """
    from scipy import ndimage

    separations = []
    for case in evenly_spaced_cases(info, max_cases):
        try:
            image = guard_file(case.label)
            label = np.asarray(image.dataobj)
            label = label.reshape(label.shape[:3])  # a trailing axis of 1
            if not np.issubdtype(label.dtype, np.integer):
                label = np.rint(label).astype(np.int32)
            values = [int(v) for v in np.unique(label) if v > 0]
            if len(values) < 2:
                continue
            # (classes, 3) voxel centroids; the mask as weights costs a byte a voxel
            voxels = np.asarray(ndimage.center_of_mass(label > 0, label, values), dtype=np.float64)
        except DataError:
            raise
        except Exception as err:
            raise DataError(f"cannot measure where the classes lie in case '{case.case_id}': {err}",
                            case.label) from None
        world = voxels @ image.affine[:3, :3].T + image.affine[:3, 3]
        separations.append(world.max(axis=0) - world.min(axis=0))
    if not separations:
        return None
    return [round(float(v), 2) for v in np.median(separations, axis=0)]


def compute_fingerprint(info: DatasetInfo, intensities: bool = False) -> dict:
    """Measure a dataset: median RAS spacing and shape; foreground intensity statistics when asked."""
    geometry = [ras_geometry(case.images[0]) for case in info.cases]
    return {
        "version": FINGERPRINT_VERSION,
        "key": dataset_key(info),
        "root": os.fspath(info.root),
        "num_cases": len(info.cases),
        # rounded: float32 affines give 0.99999998 mm for 1 mm
        "spacing": [round(float(v), 5) for v in np.median([g[0] for g in geometry], axis=0)],
        "shape": [float(v) for v in np.median([g[1] for g in geometry], axis=0)],
        # per case, for planning (percentiles of the thick axis, resampled sizes): a few numbers per case
        "spacings": [[round(float(v), 5) for v in g[0]] for g in geometry],
        "shapes": [[int(v) for v in g[1]] for g in geometry],
        "class_separation": class_separation(info),
        "intensity": foreground_intensities(info) if intensities else None,
    }


def training_summary(fingerprint: dict) -> dict:
    """What a model keeps of its training data's fingerprint (preprocessing["fingerprint"]), so that `seg predict`
    can say when a scan is unlike them: the range of voxel spacings (mm, R A S) and, when measured (CT), the
    foreground intensity statistics per channel."""
    spacings = np.asarray(fingerprint["spacings"], dtype=np.float64)
    return {"spacing_min": [round(float(v), 5) for v in spacings.min(axis=0)],
            "spacing_max": [round(float(v), 5) for v in spacings.max(axis=0)],
            "intensity": fingerprint.get("intensity")}


def load_fingerprint(info: DatasetInfo, cache_dir: str | os.PathLike | None = None,
                     intensities: bool = False) -> dict:
    """The cached fingerprint of `info`, measured and written first when missing (or lacking intensities).

    Safe with several processes: each writes a temporary file and renames it, so readers see whole files.
    """
    path = fingerprint_path(info, cache_dir)
    try:
        cached = json.loads(path.read_text())
        if cached.get("version") == FINGERPRINT_VERSION and (cached.get("intensity") or not intensities):
            return cached
    except (OSError, ValueError):
        pass  # missing or unreadable: measure again
    fingerprint = compute_fingerprint(info, intensities=intensities)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(fingerprint, indent=1), durable=False)  # a cache: losing it costs a re-measure
    return fingerprint
