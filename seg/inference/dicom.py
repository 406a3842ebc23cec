"""DICOM in and out for `seg predict`: find the image series of a folder, check them, read one as a NIfTI
file, and write a label map back as a DICOM Segmentation (highdicom).

A series is read by SimpleITK's `ImageSeriesReader` (GDCM: rescale slope/intercept applied, geometry from
ImageOrientationPatient, ImagePositionPatient and PixelSpacing) from files sorted here along the slice
normal, and written to a temporary NIfTI with `sitk.WriteImage`, which turns DICOM's LPS into NIfTI's RAS.
From there the case takes the NIfTI path, so its outputs land on the series' grid as a NIfTI scan's do.
The geometry computed here (`series_affine`) only checks that reading: gaps, varying spacing, gantry tilt
and mixed orientations are refused before any voxel is read, since a reader would silently stack them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from seg.errors import DataError, SegError, escape, one_line
from seg.io import atomic_path

# Slice spacing may vary by this fraction of the median (or 0.01 mm) before a series is refused: scanners
# write positions as decimal strings, rounded to a few micrometres.
SPACING_TOLERANCE = 0.01
# Positions further off the line along the slice normal through the first slice than this (mm, plus 0.1 %
# of the distance along the normal, about 0.06 degrees): gantry tilt.
TILT_TOLERANCE_MM = 0.01
ORIENTATION_TOLERANCE = 1e-4


@dataclass
class Skipped:
    """A DICOM file (or series) that is not predicted, with why: "ignored" (not an image) or "failed"."""

    name: str
    status: str
    paths: list[Path]
    message: str


def is_dicom(path: Path) -> bool:
    """True for a file with the DICOM preamble ("DICM" after 128 bytes)."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def dicom_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """The DICOM files under `folder` (recursively, hidden entries left out) and the other files, by path."""
    found, others = [], []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(f for f in files if not f.startswith(".")):
            (found if is_dicom(Path(root) / name) else others).append(Path(root) / name)
    return found, others


def require(module: str):
    """Import one of the DICOM packages, or say in one line how to install it (a trimmed install lacks them)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise SegError(f"DICOM input and output need {module}, a dependency of seg: reinstall seg "
                       "(pip install seg) or pip install pydicom highdicom SimpleITK") from None


def _floats(value, n: int) -> np.ndarray | None:
    try:
        array = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return array if array.shape == (n,) and np.all(np.isfinite(array)) else None


def _not_an_image(ds) -> str | None:
    """Why a DICOM dataset is not a slice of a volume that can be segmented, or None."""
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        kind = getattr(getattr(ds, "SOPClassUID", None), "name", "") or "no SOP class"
        return f"no pixel data ({kind}): not an image"
    if any(str(v).upper() == "LOCALIZER" for v in (ds.get("ImageType") or [])):
        return "a localizer (ImageType LOCALIZER), not part of a volume"
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        return f"a colour image ({ds.get('PhotometricInterpretation', '?')}), not a scan"
    if _floats(ds.get("ImageOrientationPatient"), 6) is None or _floats(ds.get("ImagePositionPatient"), 3) is None:
        return "no patient geometry (ImageOrientationPatient / ImagePositionPatient): a screenshot or report"
    return None


def modality(path: Path) -> str | None:
    """The Modality of a DICOM file ("CT", "MR", ...), or None."""
    pydicom = require("pydicom")

    return str(pydicom.dcmread(path, stop_before_pixels=True).get("Modality", "")) or None


def safe_name(text: str) -> str:
    """`text` usable as a file name: runs of other characters than letters, digits, `.`, `_`, `-` become `-`."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")
    return name or "series"


def find_series(folder: Path, files: tuple[list[Path], list[Path]] | None = None,
                ) -> tuple[dict[str, list[Path]], list[Skipped]]:
    """The image series under `folder`, each checked (`sorted_slices`) and named `<PatientID>_<SeriesNumber>`.

    Args:
        folder: searched recursively.
        files: its DICOM and other files, when already listed (`dicom_files`).

    Returns:
        series: case id -> the series' files sorted along the slice normal; ids made safe for file names and
            unique (`_2`, `_3`, ... for a repeat);
        skipped: one entry per file that is not an image slice ("ignored": SR, reports, localizers, no pixel
            data, files that are not DICOM) or cannot be read, and one per series that cannot be used ("failed",
            with the reason).
    """
    pydicom = require("pydicom")
    found, others = dicom_files(folder) if files is None else files
    skipped = [Skipped(p.name, "ignored", [p], f"{escape(str(p))}: skipped: not a DICOM file") for p in others]
    groups: dict[str, list] = {}
    for path in found:
        try:
            ds = pydicom.dcmread(path, defer_size="1 KB")
        except Exception as err:  # pydicom raises several types for a truncated or corrupt file
            reason = one_line(str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)
            message = f"{escape(str(path))}: cannot read as DICOM ({reason})"
            skipped.append(Skipped(path.name, "failed", [path], message))
            continue
        why = _not_an_image(ds)
        if why is not None:
            skipped.append(Skipped(path.name, "ignored", [path], f"{escape(str(path))}: skipped: {why}"))
            continue
        groups.setdefault(str(ds.get("SeriesInstanceUID", "") or f"no-uid:{path.parent}"), []).append((path, ds))
    series: dict[str, list[Path]] = {}
    keyed = []
    for uid, members in groups.items():
        first = members[0][1]
        base = safe_name(f"{first.get('PatientID', '') or 'anonymous'}_{first.get('SeriesNumber', '') or 'x'}")
        keyed.append((base, uid, members))
    taken: set[str] = set()
    for base, uid, members in sorted(keyed, key=lambda k: (k[0], k[1])):
        case_id, n = base, 1
        while case_id in taken:
            n += 1
            case_id = f"{base}_{n}"
        taken.add(case_id)
        paths = [p for p, _ in members]
        if _is_multiplane_localizer([ds for _, ds in members]):
            where = f"{escape(str(paths[0].parent))}: series {case_id}"
            skipped.append(Skipped(case_id, "ignored", sorted(paths), f"{where}: skipped: a localizer ({len(paths)} "
                                   f"slices in {len(_orientation_groups([ds for _, ds in members]))} orientations)"))
            continue
        try:
            order = sorted_slices([ds for _, ds in members], paths, case_id)
        except DataError as err:
            skipped.append(Skipped(case_id, "failed", sorted(paths), str(err)))
            continue
        series[case_id] = [paths[i] for i in order]
    return series, skipped


# A series whose slices lie in several orientations, none holding more than this many, is a multi-plane
# localizer (scout), not a broken volume: MR localizers are often not marked LOCALIZER in ImageType.
LOCALIZER_SLICES = 4


def _orientation_groups(datasets: list) -> list[int]:
    """Slices per distinct ImageOrientationPatient (within `ORIENTATION_TOLERANCE`)."""
    seen: list[tuple[np.ndarray, int]] = []
    for ds in datasets:
        iop = _floats(ds.ImageOrientationPatient, 6)
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


def sorted_slices(datasets: list, paths: list[Path], name: str = "") -> list[int]:
    """The order of a series' slices along its slice normal, after checking they stack into one volume.

    Raises `DataError` naming the series for: slices of several orientations, sizes or pixel spacings; two
    slices at one position; a gap (missing slice) or spacing that varies beyond `SPACING_TOLERANCE`; positions
    that drift in-plane along the stack (gantry tilt); a multi-frame object.
    """
    uid = datasets[0].get("SeriesInstanceUID", "?")
    where = f"{escape(str(paths[0].parent))}: series {name} (SeriesInstanceUID {uid}, {len(paths)} files)"
    if len(datasets) == 1 and int(datasets[0].get("NumberOfFrames", 1) or 1) > 1:
        raise DataError("is a multi-frame (enhanced) DICOM object; seg reads one slice per file: convert it with "
                        "e.g. `dcm2niix` and predict the NIfTI", where)
    orientations = np.stack([_floats(ds.ImageOrientationPatient, 6) for ds in datasets])
    if np.abs(orientations - orientations[0]).max() > ORIENTATION_TOLERANCE:
        raise DataError("has slices in mixed orientations (ImageOrientationPatient differs); split the series", where)
    sizes = {(int(ds.Rows), int(ds.Columns)) for ds in datasets}
    spacings = {tuple(np.round(_floats(ds.get("PixelSpacing", [1, 1]), 2), 5)) for ds in datasets}
    if len(sizes) > 1 or len(spacings) > 1:
        raise DataError(f"has slices of different sizes {sorted(sizes)} or pixel spacings {sorted(spacings)}", where)
    row, col = orientations[0, :3], orientations[0, 3:]
    normal = np.cross(row, col)
    positions = np.stack([_floats(ds.ImagePositionPatient, 3) for ds in datasets])
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
    iop = _floats(first.ImageOrientationPatient, 6)
    row_spacing, col_spacing = _floats(first.get("PixelSpacing", [1, 1]), 2)
    origin = _floats(first.ImagePositionPatient, 3)
    if len(datasets) > 1:
        step = _floats(datasets[1].ImagePositionPatient, 3) - origin
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


def frames_on_source(label: np.ndarray, affine: np.ndarray, datasets: list) -> np.ndarray:
    """The label map sampled on each source slice: `(len(datasets), Rows, Columns)`, frame i on dataset i.

    Each slice's pixel centres are mapped through its own ImagePositionPatient / ImageOrientationPatient /
    PixelSpacing into the label map's voxels, so the frames land on the source slices whatever order the
    files or the label map's axes are in. Raises `RuntimeError` (a bug) when a pixel misses a voxel centre.
    """
    to_voxel = np.linalg.inv(affine) @ np.diag([-1.0, -1.0, 1.0, 1.0])  # LPS world -> label voxel
    frames = []
    for ds in datasets:
        iop = _floats(ds.ImageOrientationPatient, 6)
        row_spacing, col_spacing = _floats(ds.get("PixelSpacing", [1, 1]), 2)
        rows, cols = np.meshgrid(np.arange(int(ds.Rows)), np.arange(int(ds.Columns)), indexing="ij")
        world = (_floats(ds.ImagePositionPatient, 3)[:, None, None] + iop[:3, None, None] * col_spacing * cols
                 + iop[3:, None, None] * row_spacing * rows)
        ijk = np.tensordot(to_voxel[:3, :3], world, 1) + to_voxel[:3, 3, None, None]
        index = np.rint(ijk).astype(np.int64)
        inside = all((0 <= index[a]).all() and (index[a] < label.shape[a]).all() for a in range(3))
        if not inside or np.abs(ijk - index).max() > 1e-2:
            raise RuntimeError(f"slice {ds.get('SOPInstanceUID', '?')} does not lie on the label map's grid")
        frames.append(label[index[0], index[1], index[2]])
    return np.stack(frames)


def write_segmentation(label: np.ndarray, affine: np.ndarray, files: list[Path], class_names: list[str],
                       path: Path, algorithm: dict, codes: dict | None = None) -> None:
    """Write the label map as a DICOM Segmentation (highdicom, BINARY) of the source series, atomically.

    One segment per foreground class (segment c is class c, labelled with its name and coded with its category
    and type: `codes`, else `seg.data.codes.default_codes` of its name), each with the algorithm's
    identification (`seg`, its version, the checkpoint); one frame per source slice and segment where the
    segment is present, each referencing its source instance.

    Args:
        label: `(X, Y, Z)` class indices on the series' grid (the converted NIfTI's).
        affine: that grid's RAS affine.
        files: the series' files (any order).
        class_names: foreground class names.
        path: the `.dcm` file to write.
        algorithm: {"name", "version", "checkpoint"}.
        codes: label value ("1", ...) -> {"category": triple, "type": triple} (the checkpoint's, from
            dataset.json); classes without one get the defaults.
    """
    from seg.data.codes import segment_codes

    hd = require("highdicom")
    pydicom = require("pydicom")
    from pydicom.sr.codedict import codes as dicom_codes

    datasets = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    frames = frames_on_source(label, affine, datasets).astype(np.uint8 if len(class_names) < 256 else np.uint16)
    identification = hd.AlgorithmIdentificationSequence(
        name=algorithm["name"], family=dicom_codes.cid7162.ArtificialIntelligence,
        version=str(algorithm["version"]), parameters={"checkpoint": str(algorithm["checkpoint"])[:64]})
    segments = [
        hd.seg.SegmentDescription(
            segment_number=c, segment_label=name[:64],
            segmented_property_category=hd.sr.CodedConcept(*coded["category"]),
            segmented_property_type=hd.sr.CodedConcept(*coded["type"]),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=identification)
        for c, (name, coded) in enumerate(zip(class_names, segment_codes(class_names, codes)), start=1)
    ]
    source_number = int(datasets[0].get("SeriesNumber") or 0)
    seg = hd.seg.Segmentation(
        source_images=datasets, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments, series_instance_uid=hd.UID(), series_number=source_number + 1000,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="seg",
        manufacturer_model_name=str(algorithm["checkpoint"])[:64], software_versions=str(algorithm["version"]),
        device_serial_number="none", content_label="SEG", content_description="seg predict",
        series_description=f"seg {algorithm['checkpoint']}"[:64], omit_empty_frames=bool(frames.any()))
    with atomic_path(path) as tmp:
        seg.save_as(tmp)
