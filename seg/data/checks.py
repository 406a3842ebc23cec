"""Check a dataset before training on it: every file of every case, opened and read to the last voxel.

What is checked, per case (the integrity check nnU-Net runs before planning, in our words):
- dataset.json parses and its paths stay inside the dataset folder (`seg.data.layout`);
- every listed file exists, is not empty, is NIfTI, its gzip stream is complete with a matching CRC, and its
  voxel data reads to the end (a truncated `.nii.gz` has a valid header and fails only there);
- the image is 3D, or 4D with one channel per declared modality, or one 3D file per channel, and channel
  files agree with each other in shape and affine;
- image and label have the same shape and affine (within `AFFINE_TOLERANCE_MM` plus `AFFINE_TOLERANCE_REL`
  of the voxel size), and the voxel spacing is positive, finite and below `MAX_SPACING_MM`;
- no NaN or infinite voxels; the label is 3D, whole-numbered, and uses only declared label values;
- what `seg fit` will do with it: before any voxel is read, the header's claim against the file size and the
  memory, and the size after resampling to the dataset's median spacing (`seg.data.guard`); a voxel size more
  than `SPACING_FACTOR` times off the dataset's median along an axis.
A malformed file or dataset.json entry is one problem line; the check goes on with the rest.
Extreme anisotropy and an all-background label are notes, not problems: the data can still be used.
What makes a dataset untrainable is a problem too (`trainability_problems`): fewer than `MIN_CASES` labelled
cases, no foreground in any label, a class labelled in one case only (it is then missing from training or from
validation), and, for `seg fit`, a split that leaves no case for validation or a class in no training case.

    seg check-data data/Task04_Hippocampus

(About 500 lines: every check of a case reads its files once, so the checks share one reader and one report,
and the command that prints them is the last 20 lines.)
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from seg.data.fingerprint import ras_geometry
from seg.data.guard import GZIP_MAX_RATIO, format_bytes, guard_file, named_warnings, ras_spacing_shape
from seg.data.layout import Case, DatasetInfo, load_dataset, strip_nifti_suffix
from seg.data.split import Split
from seg.errors import DataError, escape, first_line, one_line

AFFINE_TOLERANCE_MM = 1e-4
AFFINE_TOLERANCE_REL = 1e-3  # of the smallest voxel size
MAX_SPACING_MM = 50.0
ANISOTROPY_NOTE = 10.0  # largest / smallest voxel size above which a note is printed
SHOWN_IN_ERROR = 3  # problems quoted by `check_or_raise`
# A case whose voxels are this many times larger (or smaller) than the dataset's median along an axis: resampling
# it to the median multiplies (or divides) its voxel count by as much per axis (a 45 mm case among 1 mm ones:
# 45^3, 22 GB for 48 x 48 x 32 voxels). MSD's most varied task (Liver, 0.7 to 5 mm slices) stays under 8.
SPACING_FACTOR = 10.0
GZIP_SLACK = 1 << 20  # bytes a gzip stream may hold past the image it describes before the check stops reading
MAX_CHANNELS_4D = 4  # channels in one 4D file beyond which a time axis is suspected (BraTS has 4 contrasts)
MIN_CASES = 2  # labelled cases a training run needs: one to train on, one to validate on


@dataclass
class Problem:
    """Something wrong with one file of one case (`case_id` "dataset" for dataset.json itself)."""

    case_id: str
    path: str
    message: str

    def __str__(self) -> str:
        return one_line(f"{escape(self.case_id)}: {escape(self.path)}: {self.message}")


@dataclass
class _Report:
    info: DatasetInfo | None
    cases: int = 0
    problems: list[Problem] = field(default_factory=list)
    notes: list[Problem] = field(default_factory=list)
    case_labels: dict[str, set[int]] = field(default_factory=dict)  # labelled case -> label values it holds


def check_dataset(root, progress: bool = False, workers: int = 1, notes: list[Problem] | None = None) -> list[Problem]:
    """Check every case of a dataset; never raises for bad data.

    Args:
        root: the dataset folder.
        progress: show a progress bar on stderr, only when stderr is a terminal.
        workers: cases read at the same time (threads: decompression and numpy release the GIL); memory grows
            with it, one case each.
        notes: if given, remarks that do not stop training (anisotropy, empty labels) are appended to it.

    Returns:
        The problems, in case order; empty when the dataset is usable.
    """
    report = _run(Path(root), progress, workers)
    if notes is not None:
        notes.extend(report.notes)
    return report.problems


def check_or_raise(root, workers: int = 1, split: Callable[[DatasetInfo], Split] | None = None) -> DatasetInfo:
    """Check a dataset and return its layout, or raise one `DataError` quoting the first few problems.

    Args:
        root: the dataset folder.
        workers: cases read at the same time.
        split: when given, makes the training run's split of the checked dataset, which is then checked too
            (`trainability_problems`): `seg fit` refuses a split it cannot train on before anything is written.
    """
    report = _run(Path(root), progress=False, workers=workers)
    if split is not None and not report.problems:
        report.problems += trainability_problems(report.info, report.case_labels, split(report.info))
    if report.problems:
        shown = "; ".join(str(p) for p in report.problems[:SHOWN_IN_ERROR])
        more = len(report.problems) - SHOWN_IN_ERROR
        raise DataError(f"{_summary(report)}: {shown}{f'; and {more} more' if more > 0 else ''}. "
                        f"Run `seg check-data {root}` for the full list", root)
    return report.info


def _run(root: Path, progress: bool, workers: int) -> _Report:
    errors: list[DataError] = []
    try:
        info = load_dataset(root, problems=errors)
    except DataError as err:
        return _Report(None, problems=[_dataset_problem(err, root)])
    report = _Report(info, problems=[_dataset_problem(err, root) for err in errors])
    cases = [(case, True) for case in info.cases] + [(case, False) for case in info.test_images]
    report.cases = len(cases)
    seen_labels: set[int] = set()
    spacing = _median_spacing(info)

    def one(item):
        case, labelled = item
        try:
            return _check_case(case, info, labelled, spacing)
        except Exception as err:  # noqa: BLE001 - one case that trips a check must not lose the whole report
            path = str(case.images[0]) if case.images else str(root)
            return [Problem(case.case_id, path, f"could not be checked: {_one_line(err)}")], [], set()

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = _progress(pool.map(one, cases), len(cases), progress)
        for (case, labelled), (problems, notes, labels) in zip(cases, results):
            report.problems += problems
            report.notes += notes
            seen_labels |= labels
            if labelled:
                report.case_labels[case.case_id] = labels
    if not report.problems:  # the label values are known for every case: can these data train at all?
        report.problems += trainability_problems(info, report.case_labels)
    if info.cases and not report.problems:
        for value in sorted(set(info.labels) - seen_labels - {0}):
            report.notes.append(Problem("dataset", str(root / "dataset.json"),
                                        f"label {value} ({info.labels[value]}) appears in no case"))
    return report


def trainability_problems(info: DatasetInfo, case_labels: dict[str, set[int]],
                          split: Split | None = None) -> list[Problem]:
    """Why these cases cannot train a model, one problem each; empty when they can.

    Args:
        info: the dataset.
        case_labels: every labelled case's label values.
        split: the run's train / validation split, when known (`seg fit`).
    """
    def problem(message: str) -> Problem:
        return Problem("dataset", str(info.root), message)

    if len(info.cases) < MIN_CASES:
        return [problem(f"{_plural(len(info.cases), 'labelled case')}: training needs at least {MIN_CASES}, one to "
                        "train on and one to validate on; add labelled cases to imagesTr/ and labelsTr/")]
    holders: dict[int, list[str]] = {}  # foreground label value -> the cases holding it
    for case_id, values in sorted(case_labels.items()):
        for value in values - {0}:
            holders.setdefault(value, []).append(case_id)
    if not holders:
        return [problem("no label map holds any foreground (every label is all background): there is nothing to "
                        "learn; check that labelsTr/ holds the segmentations, not empty masks")]
    problems = []
    for value, cases in sorted(holders.items()):
        name = f"label {value} ({info.labels.get(value, '?')})"
        if len(cases) == 1:
            problems.append(problem(f"{name} is in one case only ({cases[0]}): it would be missing from training or "
                                    "from validation; label it in at least one more case, or merge it into another "
                                    "label"))
        elif split is not None and not set(cases) & set(split.train):
            problems.append(problem(f"{name} is only in validation cases {cases[:5]}: the network would never see it "
                                    "in training; choose data.val_cases (or another data.seed) to keep one in "
                                    "training"))
    if split is not None and not split.val:
        problems.append(problem("no case is left for validation (data.val_fraction 0, no data.val_cases): `seg fit` "
                                "keeps the checkpoint with the best validation Dice; hold out at least one case "
                                "(data.val_fraction 0.2)"))
    return problems


def _dataset_problem(err: DataError, root: Path) -> Problem:
    """A layout error as a problem of "dataset", its file apart from its message."""
    path = err.path or str(root)
    prefix = f"{escape(path)}: "
    message = str(err)[len(prefix):] if str(err).startswith(prefix) else str(err)
    return Problem("dataset", path, message)


def _median_spacing(info: DatasetInfo) -> list[float] | None:
    """The dataset's median voxel spacing along R, A, S, from the headers: what `seg fit` resamples to by default."""
    spacings = []
    for case in info.cases:
        try:
            spacing, _ = ras_geometry(case.images[0])
        except (DataError, OSError, ValueError):
            continue  # an unreadable case is reported by its own check
        if all(np.isfinite(spacing)) and min(spacing) > 0:
            spacings.append(spacing)
    return [float(v) for v in np.median(spacings, axis=0)] if spacings else None


def _check_case(case: Case, info: DatasetInfo, labelled: bool,
                spacing: list[float] | None = None) -> tuple[list[Problem], list[Problem], set[int]]:
    """All checks of one case, reading one file at a time. Returns problems, notes and the label values seen."""
    problems: list[Problem] = []
    notes: list[Problem] = []

    def problem(path, message):
        problems.append(Problem(case.case_id, str(path), message))

    grid = _check_images(case, info, problem, notes, spacing)
    labels: set[int] = set()
    if labelled and case.label is not None:
        labels = _check_label(case, info, grid, problem, notes, spacing)
    return problems, notes, labels


def _check_images(case: Case, info: DatasetInfo, problem, notes: list[Problem], spacing: list[float] | None = None):
    """Channel count, values and geometry of a case's image file(s); returns the first file's grid or None."""
    channels = len(info.modalities)
    declared = f"dataset.json declares {_plural(channels, 'modality')} {info.modalities}"
    single = len(case.images) == 1
    grids = []  # (path, spatial shape, affine) of each readable image file with a usable affine
    for path in case.images:
        image = _read(path, problem, spacing)
        if image is None:
            continue
        data, affine = image
        shape = data.shape
        found = shape[3] if data.ndim == 4 else 1
        if data.ndim < 3 or data.ndim > 4:
            problem(path, f"image is {data.ndim}D {shape}; expected a 3D volume"
                          f"{' or 4D with one channel per modality' if single else ''}")
        elif not single and data.ndim != 3:
            problem(path, f"channel file is {data.ndim}D {shape}; each channel file must be 3D")
        elif single and found != channels:
            series = time_series(nib.load(path).header) if data.ndim == 4 else None
            problem(path, series or f"image has {_plural(found, 'channel')} (shape {shape}) but {declared}")
        _check_values(data, "image", path, problem)
        del data
        if _check_spacing(affine, path, problem, notes, case.case_id, spacing) and len(shape) >= 3:
            grids.append((path, shape[:3], affine))
    if not single and len(case.images) != channels:
        problem(case.images[0], f"{len(case.images)} channel files but {declared}")
    for grid in grids[1:]:
        _compare(grids[0], grid, "channel file", problem)
    return grids[0] if grids else None


def time_series(header) -> str | None:
    """Why a 4D image is a time series (fMRI, DCE, cine) and not channels of one scan, or None.

    More than `MAX_CHANNELS_4D` volumes along the 4th axis with a time unit or a time step (pixdim[4]) in the
    header: channels of one scan (BraTS's 4 MR contrasts) have neither so many nor a time step between them.
    """
    shape = header.get_data_shape()
    if len(shape) != 4 or shape[3] <= MAX_CHANNELS_4D:
        return None
    unit = header.get_xyzt_units()[1] if hasattr(header, "get_xyzt_units") else "unknown"
    step = float(header["pixdim"][4]) if "pixdim" in header else 0.0
    if unit in ("unknown", None) and not step > 0:
        return None
    timing = f", {step:g}{'' if unit in ('unknown', None) else ' ' + unit} apart" if step > 0 else ""
    return (f"a 4D time series ({shape[3]} volumes{timing}) is not a multi-channel scan: split it (e.g. "
            "`fslsplit`) or give one volume")


def _check_label(case: Case, info: DatasetInfo, grid, problem, notes: list[Problem],
                 spacing: list[float] | None = None) -> set[int]:
    """Dimensions, values and grid of a case's label map; returns the label values it holds."""
    path = case.label
    label = _read(path, problem, spacing)
    if label is None:
        return set()
    data, affine = label
    values: set[int] = set()
    if data.ndim != 3:
        problem(path, f"label is {data.ndim}D {data.shape}; expected a 3D map of label values")
    if _check_values(data, "label", path, problem) and _whole_numbers(data, path, problem):
        values = _label_values(data)
        undeclared = sorted(values - set(info.labels)) if info.labels_valid else []
        if undeclared and not info.has_dataset_json:
            labels = {str(v): "background" if v == 0 else "<name>" for v in range(max(values) + 1)}
            problem(path, f"label values {undeclared} found but no dataset.json (without one only 0 background and 1 "
                          f"foreground are assumed): write {info.root / 'dataset.json'} with labels: "
                          f"{{\"labels\": {json.dumps(labels)}}}")
        elif undeclared:
            declared = ", ".join(f"{k} {v}" for k, v in info.labels.items())
            problem(path, f"label values {undeclared} are not declared in dataset.json labels ({declared})")
        elif values <= {0}:
            notes.append(Problem(case.case_id, str(path), "label is all background"))
    shape = data.shape
    del data
    if grid is not None and _check_spacing(affine, path, problem, None, case.case_id) and len(shape) >= 3:
        _compare(grid, (path, shape[:3], affine), "label", problem)
    return values


def _read(path: Path, problem, spacing: list[float] | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """Voxel data (every byte read) and affine of a NIfTI file, or None after reporting why not.

    The size guard runs first, on the header alone: nothing the header claims is allocated before it is
    checked against the file and the memory (and, with `spacing`, against the size after resampling to it).
    """
    if not path.exists():
        problem(path, "file not found" + (" (broken link)" if path.is_symlink() else ""))
        return None
    if not path.is_file():
        problem(path, "is not a file")
        return None
    if path.stat().st_size == 0:
        problem(path, "file is empty (0 bytes)")
        return None
    if strip_nifti_suffix(path.name) is None:
        problem(path, "not a NIfTI file (.nii or .nii.gz)")
        return None
    gzipped = path.name.lower().endswith(".gz")
    # nibabel's errors for damaged files range over ImageFileError, EOFError, zlib.error, OSError, ValueError
    # and more, depending on where the damage is; any of them means the same to the user.
    try:
        with named_warnings(path):
            image = nib.load(path, mmap=False)  # the header only
    except Exception as err:  # noqa: BLE001 - third-party parser of user files, see above
        damage = _gzip_damage(path, GZIP_MAX_RATIO * path.stat().st_size) if gzipped else None
        problem(path, f"truncated or corrupt gzip stream: {damage}" if damage
                else f"cannot read the NIfTI header: {_one_line(err)}")
        return None
    try:
        guard_file(path, spacing, image=image)
    except DataError as err:
        prefix = f"{escape(str(path))}: "
        problem(path, str(err)[len(prefix):] if str(err).startswith(prefix) else str(err))
        return None
    if gzipped:
        header = image.header
        expected = int(image.dataobj.offset) + int(np.prod(header.get_data_shape())) * header.get_data_dtype().itemsize
        damage = _gzip_damage(path, expected + GZIP_SLACK)
        if damage:
            problem(path, f"truncated or corrupt gzip stream: {damage}")
            return None
    try:
        data = np.asanyarray(image.dataobj)
    except Exception as err:  # noqa: BLE001
        problem(path, f"cannot read the voxel data (truncated or corrupt file?): {_one_line(err)}")
        return None
    return data, image.affine


def _gzip_damage(path: Path, limit: int) -> str | None:
    """Why a .gz file does not decompress to its end with a matching CRC, or None if it does.

    nibabel reads only as many bytes as the header asks for, so it never sees the gzip trailer: a flipped bit
    in the compressed data can give wrong voxels without an error. Streaming the file once more through gzip
    costs a second decompression but no memory; it stops after `limit` bytes, so that a small file that
    inflates to gigabytes past its image (a gzip bomb behind a modest header) costs no more than the image.
    """
    total = 0
    try:
        with gzip.open(path, "rb") as stream:
            while chunk := stream.read(1 << 22):
                total += len(chunk)
                if total > limit:
                    return (f"the stream inflates to more than {format_bytes(limit)}, past the image its header "
                            "describes: a gzip bomb, or not a NIfTI file as any tool writes it")
    except (OSError, EOFError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
        return _one_line(err)
    return None


def _check_values(data: np.ndarray, what: str, path: Path, problem) -> bool:
    """Report NaN and infinite voxels; True when there are none."""
    if data.dtype.kind not in "fc":
        return True
    nan = int(np.count_nonzero(np.isnan(data)))
    inf = int(np.count_nonzero(np.isinf(data)))
    if nan:
        problem(path, f"{what} has {nan} NaN voxel{'s' * (nan != 1)}")
    if inf:
        problem(path, f"{what} has {inf} infinite voxel{'s' * (inf != 1)}")
    return not (nan or inf)


def _whole_numbers(data: np.ndarray, path: Path, problem) -> bool:
    if data.dtype.kind not in "fc":
        return True
    fractional = data[data != np.round(data)]
    if fractional.size:
        problem(path, f"label has {fractional.size} voxels with non-integer values (e.g. {fractional.flat[0]:g}); "
                      "a label map holds whole numbers")
        return False
    return True


def _label_values(data: np.ndarray) -> set[int]:
    values = data.ravel(order="K")
    if values.dtype.kind in "ui" and values.size and values.min() >= 0 and values.max() < 65536:
        return {int(v) for v in np.flatnonzero(np.bincount(values))}  # linear time; np.unique sorts
    return {int(v) for v in np.unique(values)}


def _check_spacing(affine: np.ndarray, path: Path, problem, notes: list[Problem] | None, case_id: str,
                   dataset_spacing: list[float] | None = None) -> bool:
    """Report an unusable affine or voxel size; True when the geometry can be compared and used."""
    if not np.isfinite(affine).all():
        problem(path, "affine has NaN or infinite entries; check the header's sform/qform")
        return False
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    shown = " x ".join(f"{s:.4g}" for s in spacing)
    if spacing.min() <= 1e-6:
        problem(path, f"voxel spacing {shown} mm is not positive; check pixdim and the sform/qform")
        return False
    if spacing.max() > MAX_SPACING_MM:
        problem(path, f"voxel spacing {shown} mm is implausible (> {MAX_SPACING_MM:g} mm); check the header units")
        return False
    if notes is not None and spacing.max() / spacing.min() > ANISOTROPY_NOTE:
        notes.append(Problem(case_id, str(path), f"strongly anisotropic voxels {shown} mm"))
    if dataset_spacing is not None:
        ras, _ = ras_spacing_shape(affine, (1, 1, 1))
        factors = [max(s / m, m / s) for s, m in zip(ras, dataset_spacing) if s > 0 and m > 0]
        if factors and max(factors) > SPACING_FACTOR:
            median = " x ".join(f"{m:.4g}" for m in dataset_spacing)
            problem(path, f"voxel spacing {shown} mm is {max(factors):.3g} times off the dataset's median "
                          f"{median} mm (limit {SPACING_FACTOR:g}x), which `seg fit` resamples every case to: "
                          "check the header, or resample this case first")
            return False
    return True


def _compare(reference, other, what: str, problem) -> None:
    """Same spatial shape and affine as the (first) image, within the tolerance."""
    ref_path, ref_shape, ref_affine = reference
    path, shape, affine = other
    image = f"{ref_path.parent.name}/{ref_path.name}"
    if tuple(shape) != tuple(ref_shape):
        problem(path, f"{what} shape {tuple(shape)} differs from the image's {tuple(ref_shape)} ({image})")
        return
    difference = float(np.abs(affine[:3] - ref_affine[:3]).max())
    tolerance = AFFINE_TOLERANCE_MM + AFFINE_TOLERANCE_REL * float(np.linalg.norm(ref_affine[:3, :3], axis=0).min())
    if difference > tolerance:
        problem(path, f"{what} affine differs from the image's ({image}) by up to {difference:.3g} mm "
                      f"(tolerance {tolerance:.2g} mm): they are not on the same voxel grid")


def _one_line(err: Exception) -> str:
    return f"{type(err).__name__}: {first_line(err)}"


def _progress(results, total: int, enabled: bool):
    """Yield results, with a rich progress bar on stderr when asked and stderr is a terminal."""
    if not (enabled and sys.stderr.isatty()):
        yield from results
        return
    from rich.console import Console
    from rich.progress import track

    yield from track(results, total=total, description="checking", console=Console(stderr=True), transient=True)


def _plural(n: int, word: str) -> str:
    if n == 1:
        return f"1 {word}"
    return f"{n} {word[:-1]}ies" if word.endswith("y") else f"{n} {word}s"


def _summary(report: _Report) -> str:
    if not report.problems:
        return f"checked {_plural(report.cases, 'case')}: all good"
    cases = {p.case_id for p in report.problems} - {"dataset"}
    where = f"in {_plural(len(cases), 'case')}" if cases else "in the dataset as a whole"
    return f"checked {_plural(report.cases, 'case')}: {_plural(len(report.problems), 'problem')} {where}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("root", type=Path, help="dataset folder (dataset.json, imagesTr/, labelsTr/)")
    parser.add_argument("--workers", type=int, default=1, help="cases read in parallel (default 1)")


def run(args: argparse.Namespace) -> int:
    report = _run(args.root, progress=True, workers=args.workers)
    for problem in report.problems:
        print(problem)
    for note in report.notes:
        print(f"note: {note}")
    print(_summary(report))
    return 1 if report.problems else 0
