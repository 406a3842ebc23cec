"""Out-of-distribution input said on the console: `seg predict` and `seg overlays` end with one line per flagged
case (modality, spacing, intensity, an empty or fragmented prediction), or a count and report.json's path; the
checkpoint carries the training scans' spacing range the spacing check needs."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from seg.cli import main
from seg.data.synthetic import make_case
from seg.inference.predict import predict_folder
from seg.inference.report import FRAGMENTS, case_report, console_lines
from test_predict import centred_affine, phantom, save, stub_predictor

MR = {"spacing": [1.0, 1.0, 1.0], "normalization": [{"scheme": "zscore", "nonzero": True}], "modalities": ["MRI"],
      "fingerprint": {"spacing_min": [0.8, 0.8, 1.0], "spacing_max": [1.2, 1.2, 4.0], "intensity": None}}


def test_fragmented_prediction_is_flagged():
    label = np.zeros((30, 30, 6), np.uint8)
    label[::3, ::3, 2] = 1  # 100 single-voxel pieces
    label[10:20, 10:20, 4] = 2  # one piece
    flags = case_report(label, None, np.eye(4), ["liver", "lesion"], MR)["flags"]
    assert f"fragmented: 'liver' is predicted in 100 pieces (more than {FRAGMENTS})" in flags
    assert not any("'lesion'" in f for f in flags if f.startswith("fragmented"))


def test_spacing_is_compared_with_the_training_range():
    label = np.zeros((10, 10, 6), np.uint8)
    label[4:6, 4:6, 2:4] = 1
    # 4 mm slices: 4x the 1 mm the model resamples to, but inside the training scans' 1-4 mm: no flag
    assert case_report(label, None, np.diag([1.0, 1.0, 4.0, 1.0]), ["t"], MR)["flags"] == []
    flags = case_report(label, None, np.diag([1.0, 1.0, 9.0, 1.0]), ["t"], MR)["flags"]
    assert flags == ["spacing: S spacing 9 mm is more than 2x outside the training scans' 1-4 mm"]
    # an older checkpoint (no fingerprint): against the spacing it resamples to, as before
    old = {k: v for k, v in MR.items() if k != "fingerprint"}
    assert case_report(label, None, np.diag([1.0, 1.0, 4.0, 1.0]), ["t"], old)["flags"] == [
        "spacing: S spacing 4 mm is 4x the training spacing 1 mm"]


def test_console_lines_one_per_case_then_a_count():
    empty = {"classes": {"t": {"voxels": 0}}, "flags": ["empty: no voxel predicted as 't'"]}
    ct = {"classes": {"t": {"voxels": 5}}, "flags": ["modality: scan looks like CT (...)", "border: 't' touches"]}
    quiet = {"classes": {"t": {"voxels": 5}, "u": {"voxels": 0}}, "flags": ["empty: no voxel predicted as 'u'"]}
    assert console_lines({"a": empty, "b": ct, "c": quiet}, Path("out/report.json")) == [
        "flagged a: empty: nothing predicted", "flagged b: modality: scan looks like CT (...)"]
    many = {f"case{i:02d}": ct for i in range(12)}
    assert console_lines(many, Path("out/report.json")) == ["12 cases flagged (modality 12): see out/report.json"]
    assert console_lines(many)[-1] == "and 2 more flagged cases" and len(console_lines(many)) == 11


def test_predict_folder_ends_with_the_flagged_cases(tmp_path, capsys):
    scans = tmp_path / "scans"
    scans.mkdir()
    affine = centred_affine(np.eye(3), (64, 56, 40))
    image, _ = phantom((64, 56, 40), affine)
    save(scans / "mr.nii.gz", image, affine)
    save(scans / "ct.nii.gz", np.where(image > 0, image, -1000.0).astype(np.float32), affine)  # air in HU
    predict_folder(stub_predictor(), scans, tmp_path / "out")
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("seg predict: flagged ct: modality: scan looks like CT (lowest value -1000"), err
    assert not any("flagged mr" in line for line in err)


@pytest.fixture(scope="module")
def ct_scan(tmp_path_factory) -> Path:
    """A CT-like scan (HU, air at -1000) on the training grid of the shared MR checkpoint."""
    image, _ = make_case(size=(32, 32, 24), spacing=(1.5, 1.5, 2.0), rng=np.random.default_rng(3), modality="CT")
    folder = tmp_path_factory.mktemp("ct")
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    nib.save(nib.Nifti1Image(np.asarray(image, np.float32), affine), folder / "ct_scan.nii.gz")
    return folder


def test_checkpoint_carries_the_training_spacing_range(trained_checkpoint):
    fingerprint = torch.load(trained_checkpoint, weights_only=True)["seg"]["preprocessing"]["fingerprint"]
    assert fingerprint["spacing_min"] == fingerprint["spacing_max"] == [1.5, 1.5, 2.0]  # the synthetic spacing


def test_predict_and_overlays_print_the_modality_line(trained_checkpoint, ct_scan, tmp_path, capsys):
    assert main(["predict", "-c", str(trained_checkpoint), "-i", str(ct_scan), "-o", str(tmp_path / "p")]) == 0
    err = capsys.readouterr().err
    assert "seg predict: flagged ct_scan: modality: scan looks like CT (lowest value -" in err
    assert "model trained on MRI" in err
    assert main(["overlays", "--checkpoint", str(trained_checkpoint), "--input", str(ct_scan / "ct_scan.nii.gz"),
                 "--output", str(tmp_path / "o")]) == 0
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("seg overlays: flagged ct_scan: modality: scan looks like CT"), last


def test_predict_help_lists_modality_among_the_flags(capsys):
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "modality (a CT through a model trained on MR, or the reverse)" in help_text
    assert "The run ends with one line per case flagged" in help_text
