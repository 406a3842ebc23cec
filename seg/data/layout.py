"""Where the scans of a dataset are: Medical Segmentation Decathlon and nnU-Net folder layouts.

A dataset folder (ROOT) is either
- MSD: `dataset.json` with `training` entries `{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}`,
  `labels` (`{"0": "background", "1": "Anterior"}`) and `modality` (`{"0": "MRI"}`); a multi-modal image is
  one 4D file, or (nnU-Net) one file per channel `x_0000.nii.gz`, `x_0001.nii.gz`;
- nnU-Net v2: `dataset.json` with `channel_names` and `labels` as `{"background": 0, "tumour": 1}`, files
  found in `imagesTr/` and `labelsTr/`;
- or no dataset.json at all: `imagesTr/` and `labelsTr/` with matching names.

Only the layout is read here (no voxel data); `seg.data.checks` looks inside the files.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from seg.data.codes import parse_codes
from seg.errors import DataError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
_CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
# The largest label value dataset.json may declare (TotalSegmentator, among the largest label sets, has 117).
MAX_LABEL = 1000
NO_JSON_LABELS = {0: "background", 1: "foreground"}  # what a folder without dataset.json is taken to hold


@dataclass(frozen=True)
class Case:
    """One training case: its image file(s), one per channel or a single 4D file, and its label map."""

    case_id: str
    images: tuple[Path, ...]
    label: Path | None = None


@dataclass
class DatasetInfo:
    """What `dataset.json` (or the folder itself) declares about a dataset.

    Attributes:
        root: the dataset folder.
        cases: the labelled training cases, sorted by `case_id`.
        labels: label value -> class name, background (0) included.
        modalities: one entry per image channel, e.g. `["CT"]` or `["FLAIR", "T1w", "T1gd", "T2w"]`.
        name: the dataset's name.
        test_images: unlabelled `imagesTs` cases, if any.
        labels_valid: False when dataset.json's labels could not be read (`load_dataset` with `problems`):
            `labels` is then a stand-in and label values are not checked against it.
        has_dataset_json: False for a plain imagesTr/ + labelsTr/ folder: `labels` and `modalities` are then
            the stand-ins `NO_JSON_LABELS` and ["unknown"], and a message about them says to write a dataset.json.
        codes: label value ("1", ...) -> {"category", "type"} DICOM code triples, from dataset.json's optional
            "codes" (`seg.data.codes`); empty when it has none.
    """

    root: Path
    cases: list[Case]
    labels: dict[int, str]
    modalities: list[str]
    name: str = ""
    test_images: list[Case] = field(default_factory=list)
    labels_valid: bool = True
    has_dataset_json: bool = True
    codes: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        """Output channels of a network for this dataset: background plus every declared label."""
        return max(self.labels) + 1

    @property
    def class_names(self) -> list[str]:
        """Foreground class names, in label order (label 1 first)."""
        return [self.labels.get(i, f"class_{i}") for i in range(1, self.num_classes)]

    @property
    def in_channels(self) -> int:
        return len(self.modalities)


def strip_nifti_suffix(name: str) -> str | None:
    """`case_0000.nii.gz` -> `case_0000`; None for a file that is not NIfTI."""
    lower = name.lower()
    for suffix in NIFTI_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return None


def inside_root(root: Path, relative: str, what: str = "path") -> Path:
    """Join `relative` onto `root`, refusing anything that leaves it (absolute paths, `..`).

    The check is lexical, like an archive extractor's: a symlink placed inside ROOT by its owner is trusted,
    a path written into dataset.json that climbs out of ROOT is not.
    """
    if not isinstance(relative, str) or not relative:
        raise DataError(f"dataset.json has an empty or non-text {what}: {relative!r}", root / "dataset.json")
    if os.path.isabs(relative):
        raise DataError(f"dataset.json {what} '{relative}' is absolute; paths must stay inside the dataset folder",
                        root / "dataset.json")
    joined = os.path.normpath(os.path.join(root, relative))
    base = os.path.normpath(root)
    if os.path.commonpath([base, joined]) != base:
        raise DataError(f"dataset.json {what} '{relative}' escapes the dataset folder", root / "dataset.json")
    return Path(joined)


def case_channel(stem: str) -> tuple[str, int]:
    """`case_0001` -> ("case", 1); a name without a channel suffix is channel 0 of its own case."""
    match = _CHANNEL_SUFFIX.match(stem)
    return (match["case"], int(match["channel"])) if match else (stem, 0)


def group_channel_files(files: list[Path]) -> dict[str, list[Path]]:
    """Group NIfTI files into cases: nnU-Net `case_0000`, `case_0001` -> one case with two channels.

    A file without a channel suffix is a case of its own (one channel, or one 4D file).
    """
    groups: dict[str, dict[int, Path]] = {}
    for path in sorted(files):
        stem = strip_nifti_suffix(path.name)
        if stem is None:
            continue
        case_id, channel = case_channel(stem)
        groups.setdefault(case_id, {})[channel] = path
    out = {}
    for case_id, channels in groups.items():
        if sorted(channels) != list(range(len(channels))):
            raise DataError(f"case '{case_id}' has channel files {sorted(channels)}; expected 0..{len(channels) - 1}",
                            files[0].parent)
        out[case_id] = [channels[i] for i in range(len(channels))]
    return out


def parse_labels(raw: dict, path: Path) -> dict[int, str]:
    """MSD writes `{"0": "background"}`, nnU-Net v2 `{"background": 0}`; both become `{0: "background"}`.

    A label value must be a whole number from 0 to `MAX_LABEL`: the network gets one output channel per value
    up to the largest, so `100000000` would ask for a network (and logits) 10^8 channels wide.
    """
    if not isinstance(raw, dict):
        raise DataError(f"'labels' must map label values to names, got {_short(raw)}", path)
    labels: dict[int, str] = {}
    for key, value in raw.items():
        if isinstance(value, list):  # nnU-Net v2 region labels: not supported as classes
            raise DataError(f"label '{key}' is a region {_short(value)}; region-based training is not supported", path)
        number, name = (value, key) if isinstance(value, (int, float)) and not isinstance(value, bool) else (key, value)
        labels[_label_value(number, path)] = str(name)
    if 0 not in labels:
        labels[0] = "background"
    return dict(sorted(labels.items()))


def _label_value(raw, path: Path) -> int:
    """A declared label value as an int: a whole number in [0, MAX_LABEL], written as a number or as text."""
    if isinstance(raw, str):  # MSD's keys are text: "1"
        try:
            raw = int(raw.strip())
        except ValueError:
            try:
                raw = float(raw.strip())  # "1.5", "inf": refused below, with the reason
            except ValueError:
                pass
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        raise DataError(f"label value {_short(raw)} is not a number; 'labels' maps values 0, 1, ... to names", path)
    if not math.isfinite(raw) or raw != int(raw):
        raise DataError(f"label value {raw!r} is not a whole number", path)
    if raw < 0:
        raise DataError(f"label values must be >= 0, got {int(raw)}", path)
    if raw > MAX_LABEL:
        raise DataError(f"label value {int(raw)} is above {MAX_LABEL}; a network gets one output per value up to "
                        "the largest: number the labels 0, 1, 2, ...", path)
    return int(raw)


def _short(value, limit: int = 80) -> str:
    """`repr` of a value from dataset.json, cut to `limit` characters (a malformed file may hold anything)."""
    try:
        text = repr(value)
    except RecursionError:
        text = f"<deeply nested {type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _parse_modalities(meta: dict, path: Path) -> list[str] | None:
    raw = meta.get("modality", meta.get("channel_names"))
    if raw is None:
        return None
    if not isinstance(raw, dict) or not raw:
        raise DataError(f"'modality' must map channel numbers to names, got {raw!r}", path)
    try:
        return [str(raw[k]) for k in sorted(raw, key=int)]
    except ValueError:
        raise DataError(f"'modality' keys must be channel numbers, got {list(raw)}", path) from None


def _resolve_image(root: Path, relative: str) -> tuple[Path, ...]:
    """A dataset.json image entry: the file itself, or its nnU-Net channel files `x_0000.nii.gz`, ..."""
    path = inside_root(root, relative, "image path")
    if path.exists():
        return (path,)
    stem = strip_nifti_suffix(path.name)
    if stem is not None:
        channels = sorted(path.parent.glob(f"{stem}_[0-9][0-9][0-9][0-9].nii*"))
        if channels:
            return tuple(channels)
    return (path,)  # missing: reported by check-data, raised by the loader


def _cases_from_folders(root: Path, images_dir: str = "imagesTr", labels_dir: str | None = "labelsTr") -> list[Case]:
    image_root = root / images_dir
    if not image_root.is_dir():
        return []
    grouped = group_channel_files([p for p in image_root.iterdir() if p.is_file()])
    cases = []
    for case_id, images in sorted(grouped.items()):
        label = None
        if labels_dir is not None:
            for suffix in NIFTI_SUFFIXES:
                candidate = root / labels_dir / f"{case_id}{suffix}"
                if candidate.exists():
                    label = candidate
                    break
            if label is None:  # keep the expected name so check-data can say it is missing
                label = root / labels_dir / f"{case_id}{images[0].name[len(strip_nifti_suffix(images[0].name)):]}"
        cases.append(Case(case_id, tuple(images), label))
    return cases


def load_dataset(root: str | os.PathLike, problems: list[DataError] | None = None) -> DatasetInfo:
    """Read a dataset folder's layout. Raises `DataError` naming the file and the problem.

    Args:
        root: the dataset folder.
        problems: when given, a bad entry of dataset.json (a path that leaves the folder, a wrong type, a bad
            label) is appended to it and left out, and the rest is read: `seg check-data` reports every problem
            of a dataset in one pass. A dataset.json that cannot be parsed at all still raises.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError("dataset folder not found", root)
    meta_path = root / "dataset.json"
    if not meta_path.exists():
        cases = _cases_from_folders(root)
        if not cases:
            raise DataError("no dataset.json and no NIfTI files in imagesTr/; see data/README.md for the layouts", root)
        return DatasetInfo(root, cases, labels=dict(NO_JSON_LABELS), modalities=["unknown"], name=root.name,
                           test_images=_cases_from_folders(root, "imagesTs", None), has_dataset_json=False)

    def bad(err: DataError) -> None:
        if problems is None:
            raise err
        problems.append(err)

    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"cannot read dataset.json: {err}", meta_path) from None
    except RecursionError:  # Python's parser recurses once per level: 200,000 nested lists exhaust the stack
        raise DataError("cannot read dataset.json: nested too deeply to be a dataset description", meta_path) from None
    if not isinstance(meta, dict):
        raise DataError("dataset.json must hold a JSON object", meta_path)
    labels, labels_valid = {0: "background", 1: "foreground"}, False
    if "labels" not in meta:
        bad(DataError("dataset.json has no 'labels'", meta_path))
    else:
        try:
            labels, labels_valid = parse_labels(meta["labels"], meta_path), True
        except DataError as err:
            bad(err)
    try:
        modalities = _parse_modalities(meta, meta_path) or ["unknown"]
    except DataError as err:
        bad(err)
        modalities = ["unknown"]

    entries = meta.get("training")
    cases = []
    if entries is None:  # nnU-Net v2 does not list files: find them
        cases = _cases_from_folders(root)
    elif not isinstance(entries, list):
        bad(DataError(f"'training' must be a list of {{image, label}} entries, got {_short(entries)}", meta_path))
    else:
        for i, entry in enumerate(entries):
            try:
                if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
                    raise DataError(f"training entry {i} must have 'image' and 'label', got {_short(entry)}", meta_path)
                images = _resolve_image(root, entry["image"])
                label = inside_root(root, entry["label"], "label path")
            except DataError as err:
                bad(err)
                continue
            stem = strip_nifti_suffix(label.name) or label.name
            if any(c.case_id == stem for c in cases):
                bad(DataError(f"dataset.json lists case(s) ['{stem}'] more than once (training entry {i})", meta_path))
                continue
            cases.append(Case(stem, images, label))
        if not entries:
            bad(DataError("dataset.json lists no training cases", meta_path))
    if entries is None and not cases:
        bad(DataError("dataset.json lists no training cases and imagesTr/ has none", meta_path))
    test = []
    if meta.get("test") is None:  # nnU-Net v2 does not list its test images either: find them
        test = _cases_from_folders(root, "imagesTs", None)
    elif not isinstance(meta["test"], list):
        bad(DataError(f"'test' must be a list of image paths, got {_short(meta['test'])}", meta_path))
    for i, entry in enumerate(meta["test"] if isinstance(meta.get("test"), list) else []):
        relative = entry.get("image") if isinstance(entry, dict) else entry
        try:
            if not isinstance(relative, str):
                raise DataError(f"test entry {i} must be an image path or {{\"image\": path}}, got {_short(entry)}",
                                meta_path)
            images = _resolve_image(root, relative)
        except DataError as err:
            bad(err)
            continue
        # the case is named by the entry, not by its first channel file (`x_0000`)
        test.append(Case(strip_nifti_suffix(Path(relative).name) or f"test_{i}", images))
    codes = {}
    if meta.get("codes") is not None and labels_valid:
        try:
            codes = parse_codes(meta["codes"], labels, meta_path)
        except DataError as err:
            bad(err)
    name = meta.get("name")
    return DatasetInfo(root, sorted(cases, key=lambda c: c.case_id), labels, modalities,
                       name=name if isinstance(name, str) else root.name, test_images=test,
                       labels_valid=labels_valid, codes=codes)
