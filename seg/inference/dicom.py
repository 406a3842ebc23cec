"""DICOM in for `seg predict`: find the image series of a folder, check them, and read one as a NIfTI file
(the way back, a label map as a DICOM Segmentation, is `seg.inference.dicom_seg`).

A series is read by SimpleITK's `ImageSeriesReader` (GDCM: rescale slope/intercept applied, geometry from
ImageOrientationPatient, ImagePositionPatient and PixelSpacing) from files sorted here along the slice
normal, and written to a temporary NIfTI with `sitk.WriteImage`, which turns DICOM's LPS into NIfTI's RAS.
From there the case takes the NIfTI path, so its outputs land on the series' grid as a NIfTI scan's do.
The geometry computed here (`series_affine`) only checks that reading: gaps, varying spacing, gantry tilt
and mixed orientations are refused before any voxel is read, since a reader would silently stack them.

(About 500 lines: a series from elsewhere is checked from its tags alone, before SimpleITK reads a pixel, and
those checks use the same grouping, sorting and geometry as the reading; split apart they would parse each file
twice.)
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from seg.data.guard import MAX_VOXELS, MEMORY_ENV, WORKING_COPIES, format_bytes, memory_limit
from seg.errors import DataError, SegError, escape, first_line
from seg.io import atomic_path, temporary_path

# Slice spacing may vary by this fraction of the median (or 0.01 mm) before a series is refused: scanners
# write positions as decimal strings, rounded to a few micrometres.
SPACING_TOLERANCE = 0.01
# Positions further off the line along the slice normal through the first slice than this (mm, plus 0.1 %
# of the distance along the normal, about 0.06 degrees): gantry tilt.
TILT_TOLERANCE_MM = 0.01
ORIENTATION_TOLERANCE = 1e-4
# Folders below the input searched for DICOM files: exports nest a handful (patient/study/series); far more is
# a loop of copies or a hostile tree, and the search refuses it in one line rather than recursing without end.
MAX_DEPTH = 64
# Case ids (output file names) are cut to this many characters, plus a hash of the whole id to keep them apart.
MAX_NAME = 64
# Secondary Capture and its multi-frame kinds: screenshots and scanned documents, no patient geometry.
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


@dataclass
class Skipped:
    """A DICOM file (or series) that is not predicted, with why: "ignored" (not an image) or "failed"."""

    name: str
    status: str
    paths: list[Path]
    message: str


def special_file(path: Path) -> str | None:
    """Why `path` must not be opened (a fifo, socket or device: reading could block or never end), or None."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None  # a dangling link: opening it fails at once
    return None if stat.S_ISREG(mode) or stat.S_ISDIR(mode) else "not a regular file (a fifo, socket or device)"


def is_dicom(path: Path) -> bool:
    """True for a regular file with the DICOM preamble ("DICM" after 128 bytes); never opens a special file."""
    if special_file(path) is not None:
        return False
    try:  # O_NONBLOCK: a fifo swapped in after the check still cannot block the open
        with os.fdopen(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


class DicomTree(NamedTuple):
    """The files under an input folder: DICOM files, other files, and entries refused without being opened."""

    found: list[Path]
    others: list[Path]
    refused: list[Skipped]


def dicom_files(folder: Path) -> DicomTree:
    """The DICOM files under `folder` (recursively, hidden entries and links to folders left out), the other files,
    and a "failed" entry for each special file (never opened) and each folder deeper than `MAX_DEPTH`."""
    found, others, refused = [], [], []
    stack = [(Path(folder), 0)]
    while stack:  # depth first with a stack of our own: a deep tree cannot exhaust Python's recursion limit
        root, depth = stack.pop()
        try:
            entries = sorted(os.scandir(root), key=lambda e: e.name)
        except OSError as err:
            refused.append(Skipped(root.name, "failed", [root], f"{escape(str(root))}: cannot list the folder "
                                                               f"({err.strerror or err})"))
            continue
        folders = []
        for entry in entries:
            path = Path(entry.path)
            if entry.name.startswith("."):
                continue
            if entry.is_dir(follow_symlinks=False):
                folders.append(path)
            elif entry.is_symlink() and path.is_dir():
                continue  # as `os.walk`: links to folders are not followed (no loops)
            elif (why := special_file(path)) is not None:
                refused.append(Skipped(entry.name, "failed", [path], f"{escape(str(path))}: not read: {why}"))
            else:
                (found if is_dicom(path) else others).append(path)
        if folders and depth >= MAX_DEPTH:
            refused.append(Skipped(root.name, "failed", [root], f"{escape(str(root))}: folders nested more than "
                                   f"{MAX_DEPTH} deep below the input; not searched below this one"))
            continue
        stack.extend((path, depth + 1) for path in reversed(folders))
    return DicomTree(found, others, refused)


def require(module: str):
    """Import one of the DICOM packages, or say in one line how to install it (a trimmed install lacks them)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise SegError(f"DICOM input and output need {module}, a dependency of seg: reinstall seg "
                       "(pip install seg) or pip install pydicom highdicom SimpleITK") from None


def tag_floats(value, n: int) -> np.ndarray | None:
    try:
        array = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return array if array.shape == (n,) and np.all(np.isfinite(array)) else None


def tag_int(ds, keyword: str, default: int | None = None) -> int | None:
    """An integer attribute, `default` when absent or empty, None when its value is not an integer."""
    try:
        value = ds.get(keyword)
        return default if value is None or str(value).strip() == "" else int(value)
    except (TypeError, ValueError, OverflowError):
        return None


def tag_text(ds, keyword: str) -> str:
    """An attribute as text ("" when absent or unreadable): pydicom may raise on a value it cannot decode."""
    try:
        value = ds.get(keyword)
    except Exception:  # noqa: BLE001 - a value in a character set or format pydicom cannot decode
        return ""
    return "" if value is None else str(value).strip()


def _not_an_image(ds) -> str | None:
    """Why a DICOM dataset is not a slice of a volume that can be segmented, or None."""
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        kind = getattr(getattr(ds, "SOPClassUID", None), "name", "") or "no SOP class"
        return f"no pixel data ({kind}): not an image"
    if any(str(v).upper() == "LOCALIZER" for v in (ds.get("ImageType") or [])):
        return "a localizer (ImageType LOCALIZER), not part of a volume"
    if tag_int(ds, "SamplesPerPixel", 1) not in (1, None):  # None: refused with the series' other checks
        return f"a colour image ({tag_text(ds, 'PhotometricInterpretation') or '?'}), not a scan"
    if tag_text(ds, "SOPClassUID").startswith(SECONDARY_CAPTURE) and not _has_geometry(ds):
        return "a secondary capture without patient geometry (a screenshot or scanned document), not a scan"
    return None


def _has_geometry(ds) -> bool:
    return tag_floats(ds.get("ImageOrientationPatient"), 6) is not None and tag_floats(
        ds.get("ImagePositionPatient"), 3) is not None


def _multi_frame(ds) -> bool:
    """An enhanced (functional groups) or multi-frame object: several slices, or their geometry, in one file."""
    return tag_int(ds, "NumberOfFrames", 1) != 1 or "PerFrameFunctionalGroupsSequence" in ds


def modality(path: Path) -> str | None:
    """The Modality of a DICOM file ("CT", "MR", ...), or None."""
    pydicom = require("pydicom")

    return tag_text(pydicom.dcmread(path, stop_before_pixels=True), "Modality") or None


def safe_name(text: str, limit: int = MAX_NAME) -> str:
    """`text` usable as a file name: runs of other characters than letters, digits, `.`, `_`, `-` become `-`;
    longer than `limit`, cut and ended by a hash of the whole text, so that two long names stay apart."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "series"
    if len(name) > limit:
        name = f"{name[:limit - 9].rstrip('-.')}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"
    return name


def case_name(ds) -> str:
    """A series' case id before it is made unique: `<PatientID>_<SeriesNumber>`, safe for file names."""
    number = tag_int(ds, "SeriesNumber")
    return safe_name(f"{tag_text(ds, 'PatientID') or 'anonymous'}_{number if number is not None else 'x'}")


def find_series(folder: Path, files: DicomTree | None = None) -> tuple[dict[str, list[Path]], list[Skipped]]:
    """The image series under `folder`, each checked (`check_series`, `sorted_slices`) and named
    `<PatientID>_<SeriesNumber>`.

    Files sharing a SeriesInstanceUID are one series; when they cannot be read as one, they are split by what
    tells series apart (folder, patient, study, series number, frame of reference, image size) and each part
    is checked on its own.

    Args:
        folder: searched recursively.
        files: its files, when already listed (`dicom_files`).

    Returns:
        series: case id -> the series' files sorted along the slice normal; ids made safe for file names and
            unique (`_2`, `_3`, ... for a repeat);
        skipped: one entry per file that is not an image slice ("ignored": SR, reports, localizers, no pixel
            data, screenshots, files that are not DICOM) or cannot be read, one per special file or folder
            too deep ("failed", `dicom_files`), and one per series that cannot be used ("failed", the reason).
    """
    pydicom = require("pydicom")
    tree = dicom_files(folder) if files is None else files
    skipped = [Skipped(p.name, "ignored", [p], f"{escape(str(p))}: skipped: not a DICOM file") for p in tree.others]
    skipped += tree.refused
    groups: dict[str, list] = {}
    for path in tree.found:
        try:
            ds = pydicom.dcmread(path, defer_size="1 KB")
        except Exception as err:  # pydicom raises several types for a truncated or corrupt file
            message = f"{escape(str(path))}: cannot read as DICOM ({first_line(err)})"
            skipped.append(Skipped(path.name, "failed", [path], message))
            continue
        why = _not_an_image(ds)
        if why is not None:
            skipped.append(Skipped(path.name, "ignored", [path], f"{escape(str(path))}: skipped: {why}"))
            continue
        groups.setdefault(tag_text(ds, "SeriesInstanceUID") or f"no-uid:{path.parent}", []).append((path, ds))
    parts = []  # (uid, members, how many series share the uid)
    for uid, members in groups.items():
        split = _split_series(members) if len(members) > 1 and _problem(members, uid) else [members]
        parts += [(uid, part, len(split)) for part in split]
    taken: set[str] = set()
    series: dict[str, list[Path]] = {}
    for uid, members, shared in sorted(parts, key=lambda k: (case_name(k[1][0][1]), k[0], str(k[1][0][0]))):
        base = case_id = case_name(members[0][1])
        n = 1
        while case_id in taken:
            n += 1
            case_id = f"{base}_{n}"
        taken.add(case_id)
        paths = [p for p, _ in members]
        datasets = [ds for _, ds in members]
        where = _where(datasets, paths, case_id, shared)
        try:
            check_series(datasets, paths, where)
        except DataError as err:
            skipped.append(Skipped(case_id, "failed", sorted(paths), str(err)))
            continue
        if _is_multiplane_localizer(datasets):
            skipped.append(Skipped(case_id, "ignored", sorted(paths), f"{where}: skipped: a localizer ({len(paths)} "
                                   f"slices in {len(_orientation_groups(datasets))} orientations)"))
            continue
        try:
            order = sorted_slices(datasets, paths, case_id, where)
        except DataError as err:
            skipped.append(Skipped(case_id, "failed", sorted(paths), str(err)))
            continue
        series[case_id] = [paths[i] for i in order]
    return series, skipped


def _where(datasets: list, paths: list[Path], name: str, shared: int = 1) -> str:
    """How messages name a series: its folder, case id, SeriesInstanceUID and file count."""
    uid = tag_text(datasets[0], "SeriesInstanceUID") or "none"
    also = f"; one of {shared} series sharing this UID" if shared > 1 else ""
    return f"{escape(str(paths[0].parent))}: series {name} (SeriesInstanceUID {uid}{also}, {len(paths)} files)"


def _problem(members: list, uid: str) -> str | None:
    """Why the files of `members` cannot be read as one series, or None."""
    paths, datasets = [p for p, _ in members], [ds for _, ds in members]
    try:
        check_series(datasets, paths, uid)
        if not _is_multiplane_localizer(datasets):
            sorted_slices(datasets, paths, where=uid)
    except DataError as err:
        return str(err)
    return None


def _split_series(members: list) -> list[list]:
    """`members` (path, dataset) split by what tells two series apart when they share a SeriesInstanceUID."""
    parts: dict[tuple, list] = {}
    for path, ds in members:
        key = (str(path.parent), *(tag_text(ds, k) for k in ("PatientID", "StudyInstanceUID", "SeriesNumber",
                                                          "FrameOfReferenceUID", "Rows", "Columns")))
        parts.setdefault(key, []).append((path, ds))
    return list(parts.values())


def check_series(datasets: list, paths: list[Path], where: str) -> None:
    """Refuse a series whose tags cannot give a volume, from the tags alone, before any pixel is read.

    Raises `DataError` (with `where`) for: an enhanced or multi-frame object; slices without patient geometry;
    a missing, non-positive or non-finite PixelSpacing; Rows, Columns, BitsAllocated or SamplesPerPixel that are
    not usable; a claimed size beyond `seg.data.guard`'s bounds (`MAX_VOXELS`, the memory); pixel data whose
    length is not what Rows x Columns x SamplesPerPixel x BitsAllocated claim (it would decode to garbage).
    """
    multi = [ds for ds in datasets if _multi_frame(ds)]
    if multi:
        kinds = sorted({getattr(ds.get("SOPClassUID"), "name", "") or "?" for ds in multi})
        frames = sum(tag_int(ds, "NumberOfFrames", 1) or 1 for ds in multi)
        raise DataError(f"is enhanced multi-frame DICOM ({', '.join(kinds)}; {len(multi)} multi-frame files, "
                        f"{frames} frames): not supported yet; convert it with dcm2niix and predict the NIfTI", where)
    flat = [ds for ds in datasets if not _has_geometry(ds)]
    if flat:
        raise DataError(f"has no patient geometry (ImagePositionPatient / ImageOrientationPatient) in {len(flat)} "
                        f"of {len(datasets)} files: the slices cannot be placed in a volume", where)
    for ds in datasets:
        if "PixelSpacing" not in ds:
            raise DataError("has no PixelSpacing: the in-plane voxel size is unknown", where)
        try:
            spacing = [float(v) for v in ds.PixelSpacing]
        except (TypeError, ValueError):
            spacing = []
        if len(spacing) != 2 or not all(math.isfinite(v) and v > 0 for v in spacing):
            raise DataError(f"has a non-positive or non-finite PixelSpacing: {tag_text(ds, 'PixelSpacing')}", where)
    first = datasets[0]
    rows, columns, samples = tag_int(first, "Rows"), tag_int(first, "Columns"), tag_int(first, "SamplesPerPixel", 1)
    bits = tag_int(first, "BitsAllocated")
    if not (rows and rows > 0 and columns and columns > 0 and samples == 1 and bits in (1, 8, 16, 32, 64)):
        raise DataError(f"has unusable pixel attributes (Rows {tag_text(first, 'Rows') or 'none'}, Columns "
                        f"{tag_text(first, 'Columns') or 'none'}, SamplesPerPixel {tag_text(first, 'SamplesPerPixel')}, "
                        f"BitsAllocated {tag_text(first, 'BitsAllocated') or 'none'})", where)
    voxels = rows * columns * len(datasets)
    claim = f"claims {len(datasets)} slices of {rows} x {columns} pixels ({voxels:,} voxels)"
    if voxels > MAX_VOXELS:
        raise DataError(f"{claim}, more than the limit of {MAX_VOXELS:,}: a forged or broken header", where)
    need, limit = voxels * 4 * WORKING_COPIES, memory_limit()
    if need > limit:
        raise DataError(f"{claim}; reading it as float32 takes about {format_bytes(need)}, more than the "
                        f"{format_bytes(limit)} of memory available (set {MEMORY_ENV} to change the limit)", where)
    expected = math.ceil(rows * columns * bits / 8)
    for ds, path in zip(datasets, paths):
        if (tag_int(ds, "Rows"), tag_int(ds, "Columns"), tag_int(ds, "BitsAllocated")) != (rows, columns, bits):
            raise DataError(f"has slices of different sizes or BitsAllocated ({escape(path.name)}: "
                            f"{tag_text(ds, 'Rows')} x {tag_text(ds, 'Columns')}, {tag_text(ds, 'BitsAllocated')} bits; "
                            f"{paths[0].name}: {rows} x {columns}, {bits} bits)", where)
        length = _native_pixel_bytes(ds)
        if length is not None and not expected <= length <= expected + 1:  # + 1: padding to an even length
            raise DataError(f"{escape(path.name)} holds {length:,} bytes of pixel data where Rows x Columns x "
                            f"BitsAllocated ({rows} x {columns} x {bits}) claim {expected:,}: it would decode to "
                            "wrong values", where)


def _native_pixel_bytes(ds) -> int | None:
    """The length of uncompressed PixelData as stored (not read: `dcmread(defer_size=...)`), or None."""
    if "PixelData" not in ds:
        return None
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is not None and getattr(syntax, "is_encapsulated", False):
        return None
    element = ds.get_item("PixelData")
    value = getattr(element, "value", None)
    if isinstance(value, (bytes, bytearray)):
        return len(value)
    length = getattr(element, "length", None)
    return None if length is None or length == 0xFFFFFFFF else int(length)


# A series whose slices lie in several orientations, none holding more than this many, is a multi-plane
# localizer (scout), not a broken volume: MR localizers are often not marked LOCALIZER in ImageType.
LOCALIZER_SLICES = 4


def _orientation_groups(datasets: list) -> list[int]:
    """Slices per distinct ImageOrientationPatient (within `ORIENTATION_TOLERANCE`)."""
    seen: list[tuple[np.ndarray, int]] = []
    for ds in datasets:
        iop = tag_floats(ds.ImageOrientationPatient, 6)
        for i, (other, n) in enumerate(seen):
            if np.abs(iop - other).max() <= ORIENTATION_TOLERANCE:
                seen[i] = (other, n + 1)
                break
        else:
            seen.append((iop, 1))
    return [n for _, n in seen]


def _is_multiplane_localizer(datasets: list) -> bool:
    groups = _orientation_groups(datasets)
    return len(groups) > 1 and max(groups) <= LOCALIZER_SLICES


def sorted_slices(datasets: list, paths: list[Path], name: str = "", where: str | None = None) -> list[int]:
    """The order of a series' slices along its slice normal, after checking they stack into one volume.

    Raises `DataError` naming the series for: slices of several orientations, sizes or pixel spacings; two
    slices at one position; a gap (missing slice) or spacing that varies beyond `SPACING_TOLERANCE`; positions
    that drift in-plane along the stack (gantry tilt). The slices have passed `check_series`.
    """
    where = where or _where(datasets, paths, name)
    orientations = np.stack([tag_floats(ds.ImageOrientationPatient, 6) for ds in datasets])
    if np.abs(orientations - orientations[0]).max() > ORIENTATION_TOLERANCE:
        raise DataError("has slices in mixed orientations (ImageOrientationPatient differs); split the series", where)
    sizes = {(int(ds.Rows), int(ds.Columns)) for ds in datasets}
    spacings = {tuple(float(v) for v in np.round(tag_floats(ds.PixelSpacing, 2), 5)) for ds in datasets}
    if len(sizes) > 1 or len(spacings) > 1:
        shown = [", ".join(f"{a:g} x {b:g}" for a, b in sorted(values)) for values in (sizes, spacings)]
        raise DataError(f"has slices of different sizes ({shown[0]}) or pixel spacings ({shown[1]} mm)", where)
    row, col = orientations[0, :3], orientations[0, 3:]
    normal = np.cross(row, col)
    positions = np.stack([tag_floats(ds.ImagePositionPatient, 3) for ds in datasets])
    depth = positions @ normal
    order = np.argsort(depth, kind="stable")
    depth, positions = depth[order], positions[order]
    if len(datasets) == 1:
        return [int(i) for i in order]
    steps = np.diff(depth)
    if steps.min() < 1e-3:
        raise DataError("has two slices at one position (several echoes, phases or a repeat in one series); "
                        "split the series", where)
    drift = positions - positions[0] - np.outer(depth - depth[0], normal)
    if np.any(np.linalg.norm(drift, axis=1) > TILT_TOLERANCE_MM + 1e-3 * (depth - depth[0])):
        tilt = datasets[0].get("GantryDetectorTilt", "?")
        raise DataError(f"has a gantry tilt (slices shift in-plane along the stack; GantryDetectorTilt {tilt}): "
                        "resample it to an untilted grid first", where)
    median = float(np.median(steps))
    tolerance = max(0.01, SPACING_TOLERANCE * median)
    if steps.max() > 1.5 * median:
        k = int(np.argmax(steps))
        raise DataError(f"has a missing slice: a gap of {steps[k]:.3g} mm between slices at {depth[k]:.3g} and "
                        f"{depth[k + 1]:.3g} mm along the normal, where the spacing is {median:.3g} mm", where)
    if steps.max() - steps.min() > tolerance:
        raise DataError(f"has varying slice spacing ({steps.min():.4g} to {steps.max():.4g} mm, tolerance "
                        f"{tolerance:.2g} mm); resample it first", where)
    return [int(i) for i in order]


def series_affine(datasets: list) -> np.ndarray:
    """The RAS voxel -> world affine of sorted slices (column, row, slice index), from the DICOM tags alone.

    For checking the reader: NIfTI voxel (i, j, k) is column i, row j of slice k; DICOM's LPS world is RAS
    with x and y negated.
    """
    first = datasets[0]
    iop = tag_floats(first.ImageOrientationPatient, 6)
    row_spacing, col_spacing = tag_floats(first.get("PixelSpacing", [1, 1]), 2)
    origin = tag_floats(first.ImagePositionPatient, 3)
    if len(datasets) > 1:
        step = tag_floats(datasets[1].ImagePositionPatient, 3) - origin
    else:
        step = np.cross(iop[:3], iop[3:]) * float(first.get("SpacingBetweenSlices") or first.get("SliceThickness") or 1)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = iop[:3] * col_spacing, iop[3:] * row_spacing, step, origin
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def series_to_nifti(files: list[Path], target: Path) -> Path:
    """Read a series (files sorted along the normal, as `find_series` gives them) and write it as NIfTI.

    The voxels are the stored values with RescaleSlope / RescaleIntercept applied (HU for CT). Raises
    `DataError` naming the series when the pixel data cannot be decoded (a compression without a decoder)
    or the reader's geometry disagrees with the DICOM tags.
    """
    pydicom = require("pydicom")
    sitk = require("SimpleITK")

    sitk.ProcessObject_SetGlobalWarningDisplay(False)  # ITK's multi-line warnings would break one-line reports
    where = f"{escape(str(files[0].parent))} ({len(files)} files, first {escape(files[0].name)})"
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([os.fspath(f) for f in files])
    try:
        image = reader.Execute()
    except RuntimeError as err:
        ds = pydicom.dcmread(files[0], stop_before_pixels=True)
        syntax = ds.file_meta.get("TransferSyntaxUID")
        name = getattr(syntax, "name", syntax) or "unknown transfer syntax"
        detail = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise DataError(f"cannot decode the pixel data ({name}): {detail}; decompress it (e.g. `gdcmconv --raw`)",
                        where) from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise DataError(f"has {image.GetNumberOfComponentsPerPixel()} components per pixel; expected greyscale", where)
    if image.GetPixelID() not in (sitk.sitkFloat32, sitk.sitkFloat64):
        image = sitk.Cast(image, sitk.sitkFloat32)  # stored ints after rescaling: float, as a NIfTI scan is read
    with atomic_path(target, durable=False) as tmp:  # a scratch file
        sitk.WriteImage(image, os.fspath(tmp))
    import nibabel as nib

    datasets = [pydicom.dcmread(f, stop_before_pixels=True) for f in files[:2]]
    expected = series_affine(datasets)
    columns = [0, 1, 2, 3] if len(files) > 1 else [0, 1, 3]  # one slice: its thickness is the reader's guess
    if not np.allclose(nib.load(target).affine[:, columns], expected[:, columns], atol=1e-3):  # a bug
        raise RuntimeError(f"{where}: the reader's affine differs from the DICOM geometry")
    return target


class Scratch:
    """A hidden folder in the output folder for the converted series, `.tmp-<pid>-dicom/<n>.nii`.

    Files are named by the case's index, never by its id (a PatientID), and stay beside the predictions rather
    than in a shared /tmp. `cleanup` removes the folder; if the process is killed, the next run into the
    output folder removes it (`seg.io.remove_stale_temporaries`: the pid is gone).
    """

    def __init__(self, output: Path, case_ids):
        self.folder = temporary_path(Path(output) / "dicom")
        self.folder.mkdir(exist_ok=True)
        self._index = {case_id: n for n, case_id in enumerate(sorted(case_ids))}

    def path(self, case_id: str) -> Path:
        """Where the case's series is converted to."""
        return self.folder / f"{self._index[case_id]}.nii"

    def cleanup(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
