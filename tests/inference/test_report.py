"""The per-case report: statistics per class, and flags for an empty class, a structure at the border, a scan
outside the training fingerprint and an uncertain prediction, on planted cases."""

from __future__ import annotations

import json

import numpy as np
import pytest

from seg.inference.folder import predict_folder
from seg.inference.report import case_report, entropy_score, previous_reports, summary_values, write_report
from test_predict import centred_affine, phantom, read_summary, save, stub_predictor

MR = {"spacing": [1.0, 1.0, 1.0], "normalization": [{"scheme": "zscore", "nonzero": True}], "modalities": ["T2"]}
CT = {"spacing": [1.0, 1.0, 2.5], "modalities": ["CT"],
      "normalization": [{"scheme": "ct", "clip": [-100.0, 300.0], "mean": 60.0, "std": 40.0}]}


def test_statistics_and_flags_on_a_planted_label():
    label = np.zeros((10, 12, 8), np.uint8)
    label[2:4, 3:6, 2:4] = 1  # two pieces of class 1, inside
    label[6:8, 3:6, 2:4] = 1
    label[0:3, 10:12, 5:8] = 2  # class 2 at the border; class 3 nowhere
    image = np.full(label.shape, -1000.0, np.float32)
    image[label == 1] = np.tile([50.0, 70.0], 12)  # mean 60, std 10
    image[label == 2] = 900.0
    affine = np.diag([1.0, 1.0, 2.5, 1.0])
    report = case_report(label, image, affine, ["liver", "bone", "lesion"], CT)
    liver, bone, lesion = (report["classes"][n] for n in ("liver", "bone", "lesion"))
    assert liver == {"volume_ml": pytest.approx(24 * 2.5 / 1000), "voxels": 24, "intensity_mean": pytest.approx(60.0),
                     "intensity_std": pytest.approx(10.0), "components": 2}
    assert bone["voxels"] == 18 and bone["components"] == 1 and bone["intensity_mean"] == pytest.approx(900.0)
    assert lesion == {"volume_ml": 0.0, "voxels": 0, "intensity_mean": None, "intensity_std": None, "components": 0}
    kinds = sorted(flag.split(":")[0] for flag in report["flags"])
    assert kinds == ["border", "empty", "intensity"], report["flags"]
    assert any("'lesion'" in f for f in report["flags"] if f.startswith("empty"))
    assert any("'bone'" in f for f in report["flags"] if f.startswith("border"))
    assert any("'bone'" in f and "21.0 training std" in f for f in report["flags"] if f.startswith("intensity"))
    assert all("\n" not in f for f in report["flags"])


def test_out_of_fingerprint_spacing_and_modality():
    label = np.zeros((10, 10, 6), np.uint8)
    label[4:6, 4:6, 2:4] = 1
    coarse = np.diag([1.0, 1.0, 5.0, 1.0])  # 5 mm slices against 1 mm in training
    report = case_report(label, np.full(label.shape, -1000.0), coarse, ["target"], MR)
    spacing = [f for f in report["flags"] if f.startswith("spacing")]
    assert spacing == ["spacing: S spacing 5 mm is 5x the training spacing 1 mm"]
    # air at -1000 through an MR model
    assert any(f.startswith("modality: scan looks like CT") for f in report["flags"])
    report = case_report(label, np.full(label.shape, 50.0), np.eye(4), ["target"], MR, modality="MR")
    assert report["flags"] == []


def test_entropy():
    foreground = np.ones((2, 2), bool)
    assert entropy_score(np.full((3, 2, 2), 1 / 3), foreground) == pytest.approx(1.0)
    assert entropy_score(np.stack([np.zeros((2, 2)), np.ones((2, 2))]), foreground) == pytest.approx(0.0, abs=1e-9)
    assert entropy_score(np.full((2, 2, 2), 0.5), np.zeros((2, 2), bool)) is None


def test_folder_report_flags_planted_cases(tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    affine = centred_affine(np.eye(3), (20, 20, 12))
    rng = np.random.default_rng(0)
    # z-scores of a uniform body stay within +-1.73: nothing above the stand-in's threshold of 2
    save(scans / "empty.nii.gz", (100.0 + rng.uniform(-1, 1, (20, 20, 12))).astype(np.float32), affine)
    border = np.full((20, 20, 12), 100.0, np.float32)
    border[:4, :4, 4:8] = 1000.0  # a bright block in a corner of the scan
    save(scans / "border.nii.gz", border, affine)
    coarse = centred_affine(np.diag([1.0, 1.0, 4.0]), (64, 56, 12))  # 4 mm slices; training had 1 mm
    image, _ = phantom((64, 56, 12), coarse)
    save(scans / "thick.nii.gz", image, coarse)
    out = tmp_path / "out"
    results = predict_folder(stub_predictor(), scans, out, uncertainty=True, progress=False)
    assert [r.status for r in results] == ["ok"] * 3, [r.message for r in results]
    rows = read_summary(out)
    assert rows["empty"]["flags"] == "empty" and rows["empty"]["voxels_target"] == "0"
    assert rows["border"]["flags"] == "border" and rows["border"]["voxels_target"] == str(4 * 4 * 4)
    assert rows["border"]["mean_target"] == "1000" and rows["border"]["components_target"] == "1"
    assert rows["thick"]["flags"] == "spacing"
    report = json.loads((out / "report.json").read_text())
    assert set(report["cases"]) == {"empty", "border", "thick"}
    assert "only the spacing is compared" in report["intensity_check"]
    assert 0.0 <= report["cases"]["border"]["uncertainty"] < 0.3 and report["cases"]["empty"]["uncertainty"] is None
    assert float(rows["border"]["uncertainty"]) == pytest.approx(report["cases"]["border"]["uncertainty"], rel=1e-3)
    # a resumed run keeps the reports of the cases it skips
    again = predict_folder(stub_predictor(), scans, out, skip_existing=True, progress=False)
    assert [r.status for r in again] == ["skipped"] * 3
    assert json.loads((out / "report.json").read_text())["cases"] == report["cases"]
    assert read_summary(out)["border"]["flags"] == "border"


def test_statistics_of_uint64_values_stay_finite_and_overflow_is_null_with_the_reason():
    label = np.zeros((4, 4, 4), np.uint8)
    label[:, :, :2] = 1
    scan = np.zeros((4, 4, 4), np.uint64)
    scan[0, 0, 0] = 2**64 - 1  # in float32 its deviation from the mean squares to infinity
    image = scan.astype(np.float32)  # as `first_channel` gives it
    report = case_report(label, image, np.eye(4), ["a"], MR)
    assert report["classes"]["a"]["intensity_mean"] == pytest.approx(2.0**64 / 32)
    assert report["classes"]["a"]["intensity_std"] == pytest.approx(np.float64(2.0**64) * np.sqrt(31) / 32)
    assert "nulls" not in report
    json.dumps(report, allow_nan=False)
    beyond = np.full((4, 4, 4), 1e308)  # float64 sums overflow
    report = case_report(label, beyond, np.eye(4), ["a"], MR)
    assert report["classes"]["a"]["intensity_mean"] is None and report["classes"]["a"]["intensity_std"] is None
    assert set(report["nulls"]) == {"classes.a.intensity_mean", "classes.a.intensity_std"}
    assert "not a finite number" in report["nulls"]["classes.a.intensity_mean"]
    json.dumps(report, allow_nan=False)


def test_a_report_is_strict_json_whatever_an_earlier_one_held(tmp_path):
    """An earlier report.json's entries (kept for skipped cases) may hold 1e400 (read as infinity), huge integers,
    deep nesting or strings where numbers belong: the report and the summary are written all the same."""
    earlier = tmp_path / "report.json"
    nested = "[" * 50 + "]" * 50
    earlier.write_text('{"cases": {"x": {"classes": {"a": {"voxels": 123456789012345678901234567890, '
                       '"intensity_mean": 1e400, "intensity_std": "tall"}}, "flags": [7, "border: x"], '
                       f'"uncertainty": -1e999, "deep": {nested}}}, "y": 3}}}}')
    cases = previous_reports(earlier)
    assert set(cases) == {"x"}
    write_report(cases, tmp_path / "again.json", MR, {"version": "test"})
    again = json.loads((tmp_path / "again.json").read_text())["cases"]["x"]
    assert again["classes"]["a"]["voxels"] is None and again["classes"]["a"]["intensity_mean"] is None
    assert again["uncertainty"] is None
    assert set(again["nulls"]) >= {"classes.a.voxels", "classes.a.intensity_mean", "uncertainty"}
    assert summary_values(cases["x"], ["a", "b"]) == ["", "", "", "", "", "", "", "", "", "border"]
