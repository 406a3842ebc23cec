"""DICOM out for `seg predict --dicom-seg`: a label map written back as a DICOM Segmentation of its source series.

The label map lies on the grid of the NIfTI that `seg.inference.dicom` converted the series to; each source
slice's pixels are mapped into it through the slice's own position and orientation (`frames_on_source`), so the
SEG's frames lie on the source slices whatever order the files were in. highdicom builds the SEG.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from seg.data.codes import segment_codes
from seg.errors import DataError
from seg.inference.dicom import require, tag_floats, tag_int, tag_text
from seg.io import atomic_path


def frames_on_source(label: np.ndarray, affine: np.ndarray, datasets: list) -> np.ndarray:
    """The label map sampled on each source slice: `(len(datasets), Rows, Columns)`, frame i on dataset i.

    Each slice's pixel centres are mapped through its own ImagePositionPatient / ImageOrientationPatient /
    PixelSpacing into the label map's voxels, so the frames land on the source slices whatever order the
    files or the label map's axes are in. Raises `RuntimeError` (a bug) when a pixel misses a voxel centre.
    """
    to_voxel = np.linalg.inv(affine) @ np.diag([-1.0, -1.0, 1.0, 1.0])  # LPS world -> label voxel
    frames = []
    for ds in datasets:
        iop = tag_floats(ds.ImageOrientationPatient, 6)
        row_spacing, col_spacing = tag_floats(ds.get("PixelSpacing", [1, 1]), 2)
        rows, cols = np.meshgrid(np.arange(int(ds.Rows)), np.arange(int(ds.Columns)), indexing="ij")
        world = (tag_floats(ds.ImagePositionPatient, 3)[:, None, None] + iop[:3, None, None] * col_spacing * cols
                 + iop[3:, None, None] * row_spacing * rows)
        ijk = np.tensordot(to_voxel[:3, :3], world, 1) + to_voxel[:3, 3, None, None]
        index = np.rint(ijk).astype(np.int64)
        inside = all((0 <= index[a]).all() and (index[a] < label.shape[a]).all() for a in range(3))
        if not inside or np.abs(ijk - index).max() > 1e-2:
            raise RuntimeError(f"slice {ds.get('SOPInstanceUID', '?')} does not lie on the label map's grid")
        frames.append(label[index[0], index[1], index[2]])
    return np.stack(frames)


def missing_for_segmentation(datasets: list) -> list[str]:
    """The attributes a DICOM SEG needs from its source images that the series lacks (empty: a SEG can be written).

    A SEG shares its sources' FrameOfReferenceUID, study and series; a reader places it by them. Some exports
    (SimpleITK's default writer among them) write no FrameOfReferenceUID: a SEG in a frame of reference of
    its own would not overlay the images, so none is written for such a series.
    """
    needed = ("FrameOfReferenceUID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
    return [k for k in needed if not all(tag_text(ds, k) for ds in datasets)]


def segmentation_sources(files: list[Path]) -> list:
    """The series' datasets (no pixel data) as highdicom takes them for a SEG; `DataError` naming what is missing.

    A Specific Character Set whose first value is empty (the default repertoire, then code extensions, as
    Japanese `\\ISO 2022 IR 87`) is written out as `ISO 2022 IR 6`, the name highdicom accepts for it.
    """
    pydicom = require("pydicom")

    datasets = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    missing = missing_for_segmentation(datasets)
    if missing:
        raise DataError(f"no DICOM SEG written: the series has no {' or '.join(missing)}, which a SEG must share "
                        "with its source images", files[0].parent)
    for ds in datasets:
        charset = ds.get("SpecificCharacterSet")
        if charset is not None and not isinstance(charset, str) and len(charset) > 1 and not charset[0]:
            ds.SpecificCharacterSet = ["ISO 2022 IR 6", *charset[1:]]
    return datasets


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
    hd = require("highdicom")
    from pydicom.sr.codedict import codes as dicom_codes

    datasets = segmentation_sources(files)
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
    source_number = tag_int(datasets[0], "SeriesNumber") or 0
    seg = hd.seg.Segmentation(
        source_images=datasets, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments, series_instance_uid=hd.UID(), series_number=source_number + 1000,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="seg",
        manufacturer_model_name=str(algorithm["checkpoint"])[:64], software_versions=str(algorithm["version"]),
        device_serial_number="none", content_label="SEG", content_description="seg predict",
        series_description=f"seg {algorithm['checkpoint']}"[:64], omit_empty_frames=bool(frames.any()))
    with atomic_path(path) as tmp:
        seg.save_as(tmp)
