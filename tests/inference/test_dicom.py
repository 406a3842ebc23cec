"""DICOM in and out: series made here from NIfTI volumes with pydicom, predicted by the threshold stand-in.

The DICOM case must give the NIfTI case's label map voxel for voxel in world coordinates (CT with rescale
slope/intercept, an oblique MR, a series stored in reverse slice order); broken series are named with the
reason while the others run; the DICOM SEG read back lands frame for frame on the source slices.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds

from seg.cli import main
from seg.data.synthetic import make_affine, make_case
from seg.inference import dicom, dicom_seg
from seg.inference.folder import predict_folder
from seg.inference.predictor import Predictor
from test_predict import centred_affine, phantom, read_summary, save, stub_predictor

CT_STORAGE, MR_STORAGE = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4"
LPS = np.diag([-1.0, -1.0, 1.0])


def _ds(values) -> list[str]:
    return [format_number_as_ds(float(v)) for v in values]


def write_series(folder: Path, volume: np.ndarray, affine: np.ndarray, modality: str = "MR", slope: float = 1.0,
                 intercept: float = 0.0, patient: str = "P1", series_number: int = 1, drop: int | None = None,
                 file_order=None) -> list[Path]:
    """Write `volume` (X, Y, Z) on `affine` as one DICOM file per slice: column = X, row = Y, slice = Z.

    Stored values are `(volume - intercept) / slope` as int16. `drop`: a slice left out (a gap);
    `file_order`: the slice index written into each file number (default 0, 1, ...).
    """
    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    x, y = affine[:3, 0], affine[:3, 1]
    row_dir, col_dir = LPS @ x / np.linalg.norm(x), LPS @ y / np.linalg.norm(y)
    paths = []
    for n, k in enumerate(file_order if file_order is not None else range(volume.shape[2])):
        if k == drop:
            continue
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CT_STORAGE if modality == "CT" else MR_STORAGE
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = patient, "Test^Phantom", "19700101", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.StudyID, ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "1", "20260101", "120000", "A1"
        ds.ReferringPhysicianName, ds.Manufacturer, ds.PositionReferenceIndicator = "", "test", ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, series_number, n + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImageOrientationPatient = _ds([*row_dir, *col_dir])
        ds.ImagePositionPatient = _ds(LPS @ (affine[:3, :3] @ [0.0, 0.0, k] + affine[:3, 3]))
        ds.PixelSpacing = _ds([np.linalg.norm(y), np.linalg.norm(x)])
        ds.SliceThickness = format_number_as_ds(float(np.linalg.norm(affine[:3, 2])))
        ds.RescaleSlope, ds.RescaleIntercept = format_number_as_ds(slope), format_number_as_ds(intercept)
        stored = np.rint((volume[:, :, k].T - intercept) / slope).astype(np.int16)
        ds.Rows, ds.Columns = stored.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = stored.tobytes()
        path = folder / f"S{series_number}_{n:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_report_file(path: Path) -> Path:
    """A Basic Text SR: a DICOM file with no pixel data."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.88.11", generate_uid()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.PatientID, ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = "P1", "SR", generate_uid(), 99
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def assert_frames_on_slices(seg, slice_of: dict[str, int], label: np.ndarray) -> None:
    """Each source instance's mask in the SEG (segments combined) is the label map's slice it was written from."""
    uids = list(slice_of)
    masks = seg.get_pixels_by_source_instance(uids, combine_segments=True)
    for uid, mask in zip(uids, masks):  # column = X, row = Y
        np.testing.assert_array_equal(mask, label[:, :, slice_of[uid]].T, err_msg=f"slice {slice_of[uid]}")


def canonical(path: Path) -> nib.Nifti1Image:
    return nib.as_closest_canonical(nib.load(path))


SERIES = {  # name -> (shape, linear part of the affine, modality, slope, intercept, stored in reverse order)
    "ct": ((34, 30, 13), np.diag([-2.0, -2.1, 4.4]), "CT", 0.5, -1024.0, False),
    "mr_oblique": ((33, 31, 14), make_affine((33, 31, 14), (2.0, 2.1, 4.0), np.random.default_rng(4), True)[:3, :3],
                   "MR", 1.0, 0.0, False),
    "reverse": ((34, 30, 13), np.diag([-2.0, -2.1, -4.4]), "MR", 1.0, 0.0, True),
}


@pytest.mark.parametrize("name", sorted(SERIES))
def test_dicom_case_equals_nifti_case(tmp_path, name):
    shape, linear, modality, slope, intercept, reverse = SERIES[name]
    affine = centred_affine(linear, shape)
    image, target = phantom(shape, affine)
    (tmp_path / "nifti").mkdir()
    save(tmp_path / "nifti" / "scan.nii.gz", image, affine)
    files = write_series(tmp_path / "dicom" / "a", image, affine, modality, slope, intercept)
    if reverse:  # file names and instance numbers run head to feet, against the slice normal (+S)
        assert float(pydicom.dcmread(files[0]).ImagePositionPatient[2]) > float(
            pydicom.dcmread(files[-1]).ImagePositionPatient[2])

    # the reader's grid is the DICOM geometry, and the temporary NIfTI holds the rescaled values
    series, skipped = dicom.find_series(tmp_path / "dicom")
    assert skipped == [] and list(series) == ["P1_1"]
    nifti = dicom.series_to_nifti(series["P1_1"], tmp_path / "converted.nii")
    datasets = [pydicom.dcmread(f) for f in series["P1_1"]]
    np.testing.assert_allclose(nib.load(nifti).affine, dicom.series_affine(datasets), atol=1e-6)
    converted, original = nib.as_closest_canonical(nib.load(nifti)), nib.as_closest_canonical(nib.load(
        tmp_path / "nifti" / "scan.nii.gz"))
    np.testing.assert_allclose(converted.affine, original.affine, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(converted.dataobj), np.asarray(original.dataobj))

    predictor = stub_predictor()
    a = predict_folder(predictor, tmp_path / "nifti", tmp_path / "out_nifti", progress=False)
    b = predict_folder(predictor, tmp_path / "dicom", tmp_path / "out_dicom", progress=False)
    assert [r.status for r in a] == ["ok"] and [r.status for r in b] == ["ok"], [r.message for r in a + b]
    from_nifti, from_dicom = canonical(tmp_path / "out_nifti" / "scan.nii.gz"), canonical(
        tmp_path / "out_dicom" / "P1_1.nii.gz")
    np.testing.assert_allclose(from_dicom.affine, from_nifti.affine, atol=1e-4)
    labels = np.asarray(from_dicom.dataobj)
    np.testing.assert_array_equal(labels, np.asarray(from_nifti.dataobj))
    assert labels.sum() > 100  # the target was found, not two empty maps
    report = json.loads((tmp_path / "out_dicom" / "report.json").read_text())["cases"]["P1_1"]
    assert report["classes"]["target"]["voxels"] == int(labels.sum())
    inside = np.asarray(original.dataobj)[labels > 0]
    assert report["classes"]["target"]["intensity_mean"] == pytest.approx(inside.mean(), rel=1e-5)
    assert report["classes"]["target"]["intensity_std"] == pytest.approx(inside.std(), rel=1e-4, abs=1e-3)


def test_folder_with_broken_and_non_image_files(tmp_path, monkeypatch, capsys):
    shape, affine = (34, 30, 13), centred_affine(np.diag([-2.0, -2.1, 4.4]), (34, 30, 13))
    image, _ = phantom(shape, affine)
    scans = tmp_path / "scans"
    write_series(scans / "one", image, affine, patient="P/1", series_number=3)  # a name that is not a file name
    write_series(scans / "mixed", image, affine, modality="CT", patient="P2", series_number=5)
    write_series(scans / "mixed", image, affine, patient="P3", series_number=7, drop=6)  # a gap, mixed in
    report = write_report_file(scans / "docs" / "report.dcm")
    (scans / "README.txt").write_text("not DICOM")
    monkeypatch.setattr(Predictor, "from_checkpoint", classmethod(lambda cls, *args, **kwargs: stub_predictor()))

    out = tmp_path / "out"
    code = main(["predict", "-c", "stub.ckpt", "-i", str(scans), "-o", str(out), "--dicom-seg", "--preview"])
    err = capsys.readouterr().err
    assert code == 1
    assert "nvImageCodec" not in err and "Warning" not in err, err  # MONAI's DICOM reader kept quiet
    rows = read_summary(out)
    assert rows["P-1_3"]["status"] == "ok" and rows["P2_5"]["status"] == "ok", rows["P-1_3"]["message"]
    assert rows["P3_7"]["status"] == "failed" and "missing slice" in rows["P3_7"]["message"]
    assert rows["report.dcm"]["status"] == "ignored" and "no pixel data" in rows["report.dcm"]["message"]
    assert rows["README.txt"]["status"] == "ignored" and "not a DICOM file" in rows["README.txt"]["message"]
    broken = [line for line in err.splitlines() if "missing slice" in line]
    assert len(broken) == 1 and "mixed" in broken[0] and "gap of 8.8 mm" in broken[0], err
    assert any(str(report) in line and "not an image" in line for line in err.splitlines())
    assert sorted(p.name for p in out.iterdir()) == sorted([
        "P-1_3.nii.gz", "P-1_3_seg.dcm", "P-1_3_preview.png", "P2_5.nii.gz", "P2_5_seg.dcm", "P2_5_preview.png",
        "summary.csv", "report.json"])  # nothing for the broken series, no temporary files
    assert set(json.loads((out / "report.json").read_text())["cases"]) == {"P-1_3", "P2_5"}


def test_dicom_seg_reads_back_on_the_source_slices(tmp_path):
    import highdicom as hd

    shape = (33, 31, 14)
    affine = centred_affine(make_affine(shape, (2.0, 2.1, 4.0), np.random.default_rng(7), True)[:3, :3], shape)
    image, _ = phantom(shape, affine)
    files = write_series(tmp_path / "scans", image, affine, file_order=list(range(shape[2]))[::-1])
    predictor = stub_predictor()
    predictor.class_names = ["tumour"]
    results = predict_folder(predictor, tmp_path / "scans", tmp_path / "out", dicom_seg=True, progress=False)
    assert [r.status for r in results] == ["ok"], results[0].message

    label_image = nib.load(tmp_path / "out" / "P1_1.nii.gz")
    label = np.asarray(label_image.dataobj)
    seg = hd.seg.segread(tmp_path / "out" / "P1_1_seg.dcm")
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["tumour"]
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "seg" and algorithm.AlgorithmVersion
    sources = [pydicom.dcmread(f) for f in files]
    uids = [ds.SOPInstanceUID for ds in sources]
    referenced = {item.ReferencedSOPInstanceUID
                  for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == set(uids) and seg.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0].SeriesInstanceUID
    # file n holds slice file_order[n] of the volume
    assert_frames_on_slices(seg, {uid: shape[2] - 1 - n for n, uid in enumerate(uids)}, label)
    nonempty = sum(bool(label[:, :, k].any()) for k in range(shape[2]))
    assert nonempty >= 3
    # and read with pydicom alone: one frame per slice holding the segment, each pointing at its source
    raw = pydicom.dcmread(tmp_path / "out" / "P1_1_seg.dcm")
    assert raw.Modality == "SEG" and int(raw.NumberOfFrames) == nonempty
    frames = raw.pixel_array.reshape(nonempty, *label.shape[1::-1])
    for frame, group in zip(frames, raw.PerFrameFunctionalGroupsSequence):
        source = group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        k = shape[2] - 1 - uids.index(source)
        np.testing.assert_array_equal(frame, label[:, :, k].T)


def test_unusable_series_reasons(tmp_path):
    shape, affine = (12, 10, 6), centred_affine(np.diag([-2.0, -2.0, 3.0]), (12, 10, 6))
    image = np.full(shape, 100.0, np.float32)
    write_series(tmp_path / "gap", image, affine, patient="gap", drop=2)
    files = write_series(tmp_path / "tilt", image, affine, patient="tilt")
    for n, path in enumerate(files):  # each slice shifted 1 mm along A per slice: a tilted gantry
        ds = pydicom.dcmread(path)
        ds.ImagePositionPatient = _ds(np.asarray(ds.ImagePositionPatient, float) + [0.0, n * 1.0, 0.0])
        ds.save_as(path, enforce_file_format=True)
    files = write_series(tmp_path / "spacing", image, affine, patient="spacing")
    ds = pydicom.dcmread(files[-1])
    ds.ImagePositionPatient = _ds(np.asarray(ds.ImagePositionPatient, float) + [0.0, 0.0, 0.5])
    ds.save_as(files[-1], enforce_file_format=True)
    files = write_series(tmp_path / "orientation", image, affine, patient="orientation")
    ds = pydicom.dcmread(files[0])
    ds.ImageOrientationPatient = _ds([1, 0, 0, 0, 0, -1])
    ds.save_as(files[0], enforce_file_format=True)
    files = write_series(tmp_path / "localizer", image, affine, patient="loc")
    ds = pydicom.dcmread(files[0])
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.ImageOrientationPatient = _ds([1, 0, 0, 0, 0, -1])  # the usual localizer: another orientation
    ds.save_as(files[0], enforce_file_format=True)

    scout = write_series(tmp_path / "scout", image[:, :, :3], affine, patient="scout")  # 3 planes, 1 slice each
    for path, orientation in zip(scout, ([1, 0, 0, 0, 1, 0], [1, 0, 0, 0, 0, -1], [0, 1, 0, 0, 0, -1])):
        ds = pydicom.dcmread(path)
        ds.ImageOrientationPatient = _ds(orientation)
        ds.save_as(path, enforce_file_format=True)

    write_series(tmp_path / "dup_a", image, affine, patient="dup")
    write_series(tmp_path / "dup_b", image, affine, patient="dup")

    series, skipped = dicom.find_series(tmp_path)
    reasons = {s.name: s.message for s in skipped}
    assert "missing slice" in reasons["gap_1"]
    assert "gantry tilt" in reasons["tilt_1"]
    assert "varying slice spacing" in reasons["spacing_1"]
    assert "mixed orientations" in reasons["orientation_1"]
    assert "localizer" in reasons[files[0].name] and all("\n" not in m for m in reasons.values())
    assert "localizer (3 slices in 3 orientations)" in reasons["scout_1"]
    assert {s.name: s.status for s in skipped}["scout_1"] == "ignored"
    assert len(series["loc_1"]) == shape[2] - 1  # the localizer left out
    assert sorted(series) == ["dup_1", "dup_1_2", "loc_1"]  # two series with one PatientID and SeriesNumber


def test_compressed_pixel_data_without_a_decoder(tmp_path):
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless

    shape, affine = (12, 10, 4), centred_affine(np.diag([-2.0, -2.0, 3.0]), (12, 10, 4))
    for path in write_series(tmp_path / "scans", np.full(shape, 100.0, np.float32), affine):
        ds = pydicom.dcmread(path)
        ds.file_meta.TransferSyntaxUID = JPEG2000Lossless  # claimed, but the bytes are no JPEG 2000 stream
        ds.PixelData = encapsulate([b"\x00\x01not a codestream" * 4])
        ds["PixelData"].VR = "OB"
        ds.save_as(path, enforce_file_format=True)
    results = predict_folder(stub_predictor(), tmp_path / "scans", tmp_path / "out", progress=False)
    assert [r.status for r in results] == ["failed"]
    message = results[0].message
    assert "cannot decode the pixel data (JPEG 2000" in message and "scans" in message and "\n" not in message
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.json", "summary.csv"]


def test_trained_checkpoint_on_a_dicom_series(tmp_path, trained_checkpoint, capsys):
    """The real network and preprocessing (3 classes) through DICOM in and DICOM SEG out, from the command line."""
    import highdicom as hd

    shape, spacing = (32, 32, 24), (1.5, 1.5, 2.0)
    affine = make_affine(shape, spacing)
    image, _ = make_case(shape, spacing, np.random.default_rng(1), affine)
    files = write_series(tmp_path / "scans" / "s", image, affine, slope=float(image.max()) / 30000)
    out = tmp_path / "out"
    code = main(["predict", "-c", str(trained_checkpoint), "-i", str(tmp_path / "scans"), "-o", str(out),
                 "--dicom-seg", "--uncertainty"])
    assert code == 0, capsys.readouterr().err
    label_image = nib.load(out / "P1_1.nii.gz")
    label = np.asarray(label_image.dataobj)
    assert label.shape == shape and np.allclose(label_image.affine, affine, atol=1e-4)
    seg = hd.seg.segread(out / "P1_1_seg.dcm")
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["liver", "lesion"]
    assert_frames_on_slices(seg, {pydicom.dcmread(f).SOPInstanceUID: k for k, f in enumerate(files)}, label)
    report = json.loads((out / "report.json").read_text())
    assert report["seg"]["checkpoint"] == trained_checkpoint.name
    assert 0.0 <= report["cases"]["P1_1"]["uncertainty"] <= 1.0
    assert read_summary(out)["P1_1"]["uncertainty"] != ""


# ---- hostile and unlucky series (issue 31) ---------------------------------------------------------------------------
ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"


def set_raw(ds: Dataset, keyword: str, vr: str, value: bytes) -> None:
    """Store `value` as written in a file, unchecked: pydicom refuses to set an IS of `..` or a DS of `NaN`."""
    tag = Tag(keyword)
    ds._dict[tag] = RawDataElement(tag, vr, len(value), value, 0, False, True)


def rewrite(files: list[Path], change) -> list[Path]:
    for path in files:
        ds = pydicom.dcmread(path)
        change(ds)
        ds.save_as(path, enforce_file_format=False)
    return files


def small_series(folder: Path, patient: str, series_number: int = 1, shape=(12, 10, 6)) -> list[Path]:
    affine = centred_affine(np.diag([-2.0, -2.0, 3.0]), shape)
    image = np.full(shape, 100.0, np.float32)
    image[3:8, 3:7, 2:4] = 1000.0  # the stand-in's target: something to find
    return write_series(folder, image, affine, patient=patient, series_number=series_number)


def write_multiframe(path: Path, series: tuple[str, str, str] | None = None, frames: int = 3) -> Path:
    """An Enhanced MR object: all slices in one file, their geometry in the functional groups only.

    `series`: its StudyInstanceUID, SeriesInstanceUID and FrameOfReferenceUID (default: new ones).
    """
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = ENHANCED_MR, generate_uid()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.PatientID, ds.Modality, ds.SeriesNumber = "MF", "MR", 4
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = series or [generate_uid() for _ in "123"]
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.NumberOfFrames, ds.Rows, ds.Columns = frames, 8, 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    measures, orientation, shared = Dataset(), Dataset(), Dataset()
    measures.PixelSpacing, measures.SliceThickness = ["1", "1"], "2"
    orientation.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    shared.PixelMeasuresSequence, shared.PlaneOrientationSequence = [measures], [orientation]
    ds.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for k in range(frames):
        position, item = Dataset(), Dataset()
        position.ImagePositionPatient = ["0", "0", str(2 * k)]
        item.PlanePositionSequence = [position]
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    ds.PixelData = np.zeros((frames, 8, 8), np.int16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def remove_deep(top: Path) -> None:
    """Remove a deep chain of folders bottom up (`shutil.rmtree` recurses, and 1,100 levels exceed the limit)."""
    chain = [top]
    while (below := [p for p in chain[-1].iterdir() if p.is_dir()]):
        chain.append(below[0])
    for folder in reversed(chain):
        for entry in folder.iterdir():
            if not entry.is_dir():
                entry.unlink()
        folder.rmdir()


def test_odd_values_are_predicted_or_refused_in_one_line(tmp_path):
    scans = tmp_path / "scans"
    rewrite(small_series(scans / "dots", "dots"), lambda ds: set_raw(ds, "SeriesNumber", "IS", b".."))

    def japanese(ds):  # the default repertoire, then Kanji: the standard Japanese setting
        ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
        ds.PatientName = "Yamada^Tarou=\033$B;3ED\033(B^\033$BB@O:\033(B"
    rewrite(small_series(scans / "jp", "jp"), japanese)
    no_frame = rewrite(small_series(scans / "noframe", "noframe"), lambda ds: delattr(ds, "FrameOfReferenceUID"))
    rewrite(small_series(scans / "nospacing", "nospacing"), lambda ds: delattr(ds, "PixelSpacing"))

    results = {r.case_id: r for r in predict_folder(stub_predictor(), scans, tmp_path / "out", progress=False)}
    assert {c: r.status for c, r in results.items()} == {
        "dots_x": "ok", "jp_1": "ok", "noframe_1": "ok", "nospacing_1": "failed"}, results
    assert "has no PixelSpacing" in results["nospacing_1"].message and "nospacing" in results["nospacing_1"].message

    # a DICOM SEG: written for the Japanese series, and for a series without a frame of reference refused by name
    results = {r.case_id: r for r in predict_folder(stub_predictor(), scans, tmp_path / "seg", dicom_seg=True,
                                                    progress=False)}
    assert results["jp_1"].status == "ok" and results["dots_x"].status == "ok", results
    written = pydicom.dcmread(tmp_path / "seg" / "jp_1_seg.dcm")
    assert written.Modality == "SEG" and list(written.SpecificCharacterSet) == ["ISO 2022 IR 6", "ISO 2022 IR 87"]
    assert str(written.PatientName) == str(pydicom.dcmread(scans / "jp" / "S1_0000.dcm").PatientName)
    assert dicom_seg.missing_for_segmentation([pydicom.dcmread(f) for f in no_frame]) == ["FrameOfReferenceUID"]
    message = results["noframe_1"].message
    assert "no DICOM SEG written" in message and "FrameOfReferenceUID" in message and "unexpected" not in message
    assert not (tmp_path / "seg" / "noframe_1_seg.dcm").exists()
    assert all("\n" not in r.message for r in results.values())


def test_one_bad_series_never_ends_the_run(tmp_path):
    scans = tmp_path / "scans"
    small_series(scans / "good", "good")
    for name, value in {"nan": b"NaN\\NaN ", "zero": b"0\\0 ", "negative": b"-2\\-2 "}.items():
        rewrite(small_series(scans / name, name), lambda ds, v=value: set_raw(ds, "PixelSpacing", "DS", v))
    long_a, long_b = "A" * 299 + "1", "A" * 299 + "2"  # 300 characters, the same for 299 of them
    small_series(scans / "long_a", long_a)
    small_series(scans / "long_b", long_b)
    os.mkfifo(scans / "pipe.dcm")  # opening it for reading would block until a writer comes
    (scans / "null.dcm").symlink_to("/dev/null")  # a character device
    deep = folder = scans / "deep"
    for _ in range(1101):  # one at a time: `mkdir(parents=True)` recurses
        folder.mkdir()
        folder = folder / "d"
    try:
        results = predict_folder(stub_predictor(), scans, tmp_path / "out", progress=False)
    finally:
        remove_deep(deep)
    by_id = {r.case_id: r for r in results}
    assert by_id["good_1"].status == "ok"
    for name in ("nan", "zero", "negative"):
        assert by_id[f"{name}_1"].status == "failed", by_id[f"{name}_1"]
        assert "non-positive or non-finite PixelSpacing" in by_id[f"{name}_1"].message
    long_ids = [c for c in by_id if c.startswith("AAAA")]
    assert len(long_ids) == 2 and all(len(c) <= dicom.MAX_NAME for c in long_ids)
    assert all(by_id[c].status == "ok" and (tmp_path / "out" / f"{c}.nii.gz").is_file() for c in long_ids)
    for name in ("pipe.dcm", "null.dcm"):
        assert by_id[name].status == "failed" and "not a regular file" in by_id[name].message
    too_deep = [r for r in results if "nested more than 64" in r.message]
    assert len(too_deep) == 1 and too_deep[0].status == "failed"
    assert too_deep[0].message.count("/d") == 64, too_deep[0].message  # names the folder it stopped at
    assert all("\n" not in r.message for r in results)
    rows = read_summary(tmp_path / "out")
    assert rows["good_1"]["status"] == "ok" and rows["nan_1"]["status"] == "failed"


def test_sizes_are_checked_before_reading(tmp_path, monkeypatch):
    from hostile_files import rss_growth_mb

    # one 65 KB file declaring 65,535 x 65,535 pixels: refused from its tags, the process stays small
    bomb = small_series(tmp_path / "bomb", "bomb", shape=(12, 10, 1))[0]
    ds = pydicom.dcmread(bomb)
    ds.Rows, ds.Columns, ds.PixelData = 65535, 65535, bytes(65000)
    ds.save_as(bomb, enforce_file_format=True)
    setup = ("import sys; sys.path[:0] = [" + repr(str(Path(__file__).parent)) + "]\n"
             "from test_predict import stub_predictor\nfrom seg.inference.folder import predict_folder")
    code = (f"results = predict_folder(stub_predictor(), {str(tmp_path / 'bomb')!r}, {str(tmp_path / 'out')!r}, "
            "progress=False)\nprint('RESULT', results[0].status, results[0].message)")
    growth, out = rss_growth_mb(code, setup)
    assert growth < 200, out
    assert "RESULT failed" in out and "65535 x 65535 pixels" in out and "more than the limit" in out, out

    # a series within the voxel limit but beyond the memory: the guard's limit, before SimpleITK reads
    small_series(tmp_path / "big", "big")
    monkeypatch.setenv("SEG_MEMORY_LIMIT", "4K")
    series, skipped = dicom.find_series(tmp_path / "big")
    assert series == {} and "of memory available (set SEG_MEMORY_LIMIT" in skipped[0].message


@pytest.mark.parametrize("bits", [8, 32])
def test_pixel_data_that_disagrees_with_its_attributes_is_refused(tmp_path, bits):
    def claim(ds):  # 16-bit pixel data said to be 8 or 32 bits: read as it says, garbage
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
    rewrite(small_series(tmp_path / "scans" / "bad", "bad"), claim)
    small_series(tmp_path / "scans" / "good", "good")
    results = {r.case_id: r for r in predict_folder(stub_predictor(), tmp_path / "scans", tmp_path / "out",
                                                    progress=False)}
    assert results["good_1"].status == "ok" and results["bad_1"].status == "failed"
    assert f"holds 240 bytes of pixel data where Rows x Columns x BitsAllocated (10 x 12 x {bits}) claim " \
           f"{120 * bits // 8}" in results["bad_1"].message


def test_multiframe_and_geometry_less_series_are_one_failed_row_each(tmp_path):
    scans = tmp_path / "scans"
    write_multiframe(scans / "enhanced" / "mr.dcm")
    shared = generate_uid(), generate_uid(), generate_uid()  # one series in two files
    write_multiframe(scans / "two" / "a.dcm", shared)
    write_multiframe(scans / "two" / "b.dcm", shared)

    def flat(ds):
        del ds.ImagePositionPatient, ds.ImageOrientationPatient
    rewrite(small_series(scans / "flat", "flat", shape=(12, 10, 35)), flat)
    small_series(scans / "good", "good")
    results = predict_folder(stub_predictor(), scans, tmp_path / "out", progress=False)
    assert {r.case_id: r.status for r in results} == {"MF_4": "failed", "MF_4_2": "failed", "flat_1": "failed",
                                                      "good_1": "ok"}, [r.message for r in results]
    for r in results[:2]:
        assert "enhanced multi-frame DICOM (Enhanced MR Image Storage" in r.message and "dcm2niix" in r.message
    assert "2 multi-frame files" in " ".join(r.message for r in results[:2])
    flat_row = next(r for r in results if r.case_id == "flat_1")
    assert "no patient geometry" in flat_row.message and "35 of 35 files" in flat_row.message
    assert len(flat_row.inputs) == 35 and all("\n" not in r.message for r in results)


def test_series_sharing_a_series_instance_uid(tmp_path):
    uid = generate_uid()

    def same_uid(ds):
        ds.SeriesInstanceUID = uid
    rewrite(small_series(tmp_path / "a" / "one", "P1"), same_uid)
    rewrite(small_series(tmp_path / "a" / "two", "P2"), same_uid)  # another patient, another folder
    series, skipped = dicom.find_series(tmp_path / "a")
    assert sorted(series) == ["P1_1", "P2_1"] and skipped == []  # told apart, both kept

    # one folder, one patient, two pixel spacings: cannot be told apart; the reason in plain numbers
    first = pydicom.dcmread(rewrite(small_series(tmp_path / "b", "P3", series_number=1), same_uid)[0])
    extra = small_series(tmp_path / "other", "P3", series_number=1, shape=(12, 10, 7))[6]  # one more slice

    def same_series(ds):
        same_uid(ds)
        ds.StudyInstanceUID, ds.FrameOfReferenceUID = first.StudyInstanceUID, first.FrameOfReferenceUID
        ds.PixelSpacing = ["2.5", "2.5"]
    rewrite([extra.rename(tmp_path / "b" / "extra.dcm")], same_series)
    series, skipped = dicom.find_series(tmp_path / "b")
    assert series == {} and len(skipped) == 1
    message = skipped[0].message
    assert "np." not in message and "different sizes (10 x 12) or pixel spacings (2 x 2, 2.5 x 2.5 mm)" in message


def test_scratch_files_stay_in_the_output_folder(tmp_path, monkeypatch):
    import subprocess
    import sys
    import tempfile

    small_series(tmp_path / "scans", "Doe^Jane")
    empty = tmp_path / "tmpdir"
    empty.mkdir()
    monkeypatch.setenv("TMPDIR", str(empty))
    monkeypatch.setattr(tempfile, "tempdir", str(empty))
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = out / f".tmp-{int(dead.stdout)}-dicom"  # left by a run killed with kill -9
    stale.mkdir()
    (stale / "0.nii").write_bytes(b"a patient's scan")
    converted = []
    real = dicom.series_to_nifti

    def convert(files, target):
        converted.append(target)
        return real(files, target)
    monkeypatch.setattr(dicom, "series_to_nifti", convert)

    results = predict_folder(stub_predictor(), tmp_path / "scans", out, progress=False)
    assert [r.status for r in results] == ["ok"], results[0].message
    assert converted == [out / f".tmp-{os.getpid()}-dicom" / "0.nii"]  # by index, not PatientID
    assert sorted(p.name for p in out.iterdir()) == ["Doe-Jane_1.nii.gz", "report.json", "summary.csv"]
    assert list(empty.iterdir()) == []
