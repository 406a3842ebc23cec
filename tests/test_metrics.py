"""`seg.metrics` and `seg evaluate` against hand-made masks whose Dice, HD95 and surface Dice are known."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.metrics import compute_hausdorff_distance, compute_surface_dice

from seg.cli import main
from seg.metrics import score_case, spacing_of, summarise, surface_scores

SPACING = (1.5, 2.0, 2.0)


def cube(shape=(24, 24, 24), start=(5, 5, 5), size=10) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[tuple(slice(s, s + size) for s in start)] = True
    return mask


def test_plates_a_known_distance_apart():
    """Two one-voxel-thick plates 4 slices apart at 2 mm: every edge voxel is 8 mm from the other plate."""
    label, prediction = np.zeros((12, 12, 12), bool), np.zeros((12, 12, 12), bool)
    label[2:10, 2:10, 3] = True
    prediction[2:10, 2:10, 7] = True
    hd95, nsd = surface_scores(prediction, label, SPACING, tolerance_mm=7.9)
    assert hd95 == pytest.approx(8.0) and nsd == 0.0
    assert surface_scores(prediction, label, SPACING, tolerance_mm=8.0)[1] == 1.0
    [scores] = score_case(prediction.astype(np.uint8), label.astype(np.uint8), [1], SPACING)
    assert scores.dice == 0.0 and scores.missing is None


def test_cubes_offset_by_one_voxel_match_monai():
    """10^3 cubes shifted by one 1.5 mm voxel along x: Dice 0.9, HD95 1.5 mm, NSD 1 at 1.5 mm; MONAI agrees."""
    label, prediction = cube(), cube(start=(6, 5, 5))
    [s] = score_case(prediction.astype(np.uint8), label.astype(np.uint8), [1], SPACING, tolerance_mm=1.5)
    assert s.dice == pytest.approx(2 * 900 / 2000)
    assert s.hd95 == pytest.approx(1.5) and s.nsd == pytest.approx(1.0)
    one_hot = lambda m: torch.from_numpy(np.stack([~m, m])[None].astype(np.float32))  # noqa: E731
    monai_hd95 = compute_hausdorff_distance(one_hot(prediction), one_hot(label), percentile=95, spacing=SPACING)
    assert s.hd95 == pytest.approx(float(monai_hd95))
    for tolerance in (0.5, 1.0, 1.5):
        _, nsd = surface_scores(prediction, label, SPACING, tolerance)
        expected = compute_surface_dice(one_hot(prediction), one_hot(label), [tolerance], spacing=SPACING)
        assert nsd == pytest.approx(float(expected))
    assert 0.0 < surface_scores(prediction, label, SPACING, 1.0)[1] < 1.0  # the shifted faces are 1.5 mm off


def test_missing_classes_are_counted_not_scored():
    label = np.zeros((16, 16, 16), np.uint8)
    label[2:6, 2:6, 2:6] = 1
    label[10:14, 10:14, 10:14] = 2
    prediction = np.where(label == 1, 1, 0).astype(np.uint8)  # class 2 missed, class 3 absent from both
    prediction[0, 0, 0] = 4  # class 4 predicted but not in the label
    one, two, three, four = score_case(prediction, label, [1, 2, 3, 4], (1.0, 1.0, 1.0))
    assert one.dice == 1.0 and one.hd95 == 0.0 and one.nsd == 1.0 and one.missing is None
    assert two.dice == 0.0 and math.isnan(two.hd95) and math.isnan(two.nsd) and two.missing == "prediction"
    assert math.isnan(three.dice) and three.missing == "both"
    assert four.dice == 0.0 and math.isnan(four.hd95) and four.missing == "label"
    assert summarise([1.0, float("nan"), 0.0]) == {"mean": 0.5, "median": 0.5, "std": 0.5, "n": 2}


def test_a_single_slice_is_scored_in_2d():
    """A (X, Y, 1) image: squares 2 pixels apart along y at 0.5 mm -> 1 mm, not every pixel an edge in 3D."""
    label, prediction = np.zeros((20, 20, 1), bool), np.zeros((20, 20, 1), bool)
    label[5:15, 5:10, 0] = True
    prediction[5:15, 7:12, 0] = True
    hd95, nsd = surface_scores(prediction, label, (0.5, 0.5, 3.0), tolerance_mm=1.0)
    assert hd95 == pytest.approx(1.0) and nsd == 1.0


def test_spacing_from_an_oblique_affine():
    rotation = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.8, 1.2, 3.0])
    assert spacing_of(affine) == pytest.approx((0.8, 1.2, 3.0))


def _save(path, array, spacing=(1.0, 1.0, 1.0)):
    nib.save(nib.Nifti1Image(np.asarray(array, np.uint8), np.diag([*spacing, 1.0])), path)


def test_seg_evaluate_folders(tmp_path, capsys):
    labels, predictions = tmp_path / "labelsTs", tmp_path / "pred"
    labels.mkdir()
    predictions.mkdir()
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "liver", "2": "lesion"}}))
    truth = np.zeros((24, 24, 24), np.uint8)
    truth[cube()] = 1
    truth[cube(start=(8, 8, 8), size=3)] = 2
    exact = truth.copy()
    shifted = np.zeros_like(truth)
    shifted[cube(start=(6, 5, 5))] = 1  # lesion missed
    for name in ("a", "b", "c", "d"):
        _save(labels / f"{name}.nii.gz", truth, SPACING)
    _save(predictions / "a.nii.gz", exact, SPACING)
    _save(predictions / "b.nii.gz", shifted, SPACING)
    _save(predictions / "c.nii.gz", exact[:, :, :20], SPACING)  # another grid
    # d has no prediction
    code = main(["evaluate", "--predictions", str(predictions), "--labels", str(labels), "--tolerance", "1.5"])
    err = capsys.readouterr().err
    assert code == 1
    assert "c.nii.gz: prediction has shape (24, 24, 20)" in err and "no prediction for case 'd'" in err
    summary = json.loads((predictions / "summary.json").read_text())
    assert summary["cases"] == 2 and [f["case"] for f in summary["failed"]] == ["c", "d"]
    liver, lesion = summary["classes"]["liver"], summary["classes"]["lesion"]
    # b's liver: the shifted cube against the cube less the lesion's 27 voxels
    b_dice = 2 * (900 - 27) / (1000 + 1000 - 27)
    assert liver["dice"]["mean"] == pytest.approx((1.0 + b_dice) / 2) and liver["dice"]["n"] == 2
    assert lesion["dice"]["mean"] == pytest.approx(0.5)  # 1 and 0: missed, Dice 0
    assert lesion["hd95"] == {"mean": 0.0, "median": 0.0, "std": 0.0, "n": 1}  # b's missing lesion: no distance
    assert lesion["missing_in_prediction"] == 1 and liver["missing_in_prediction"] == 0
    assert summary["mean"]["dice"] == pytest.approx((liver["dice"]["mean"] + 0.5) / 2)
    with open(predictions / "per_case.csv") as f:
        rows = {r["case"]: r for r in csv.DictReader(f)}
    assert rows["b"]["missing_lesion"] == "prediction" and rows["b"]["hd95_lesion"] == ""
    assert rows["a"]["dice_liver"] == "1" and rows["c"]["status"] == "failed"
    assert not list(predictions.glob(".tmp-*"))


def test_undeclared_label_value_is_one_line(tmp_path, capsys):
    labels, predictions = tmp_path / "labels", tmp_path / "pred"
    labels.mkdir()
    predictions.mkdir()
    (tmp_path / "ds.json").write_text(json.dumps({"labels": {"background": 0, "target": 1}}))
    _save(labels / "x.nii.gz", cube(size=4).astype(np.uint8))
    _save(predictions / "x.nii.gz", cube(size=4).astype(np.uint8) * 3)
    code = main(["evaluate", "-p", str(predictions), "-l", str(labels), "--dataset", str(tmp_path / "ds.json")])
    err = capsys.readouterr().err.splitlines()
    assert code == 1 and "x.nii.gz: holds label values [3]" in err[0]


def _pair(tmp_path, name, prediction, label=None, affine=None):
    """Write `name` into tmp_path/pred and tmp_path/labels (the label defaults to the prediction)."""
    for folder, array in (("pred", prediction), ("labels", prediction if label is None else label)):
        (tmp_path / folder).mkdir(exist_ok=True)
        nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None or folder == "labels" else affine),
                 tmp_path / folder / f"{name}.nii.gz")


def _evaluate(tmp_path, capsys, *extra) -> tuple[int, list[str]]:
    code = main(["evaluate", "-p", str(tmp_path / "pred"), "-l", str(tmp_path / "labels"), *extra])
    return code, capsys.readouterr().err.splitlines()


@pytest.mark.parametrize("values, expected", [
    (np.full(8, 2**32 - 1, np.uint32), "holds label value 4294967295, above 1000"),
    (np.arange(5000, dtype=np.uint16), "holds label value 4999, above 1000"),  # 5,000 surface distances: hours
])
def test_label_values_beyond_the_bound_are_one_line_before_scoring(tmp_path, capsys, values, expected):
    _pair(tmp_path, "good", cube(size=4).astype(np.uint8))
    hostile = np.zeros((20, 20, 20), values.dtype)
    hostile.ravel()[:values.size] = values
    _pair(tmp_path, "hostile", hostile)
    code, err = _evaluate(tmp_path, capsys)
    assert code == 1 and len(err) == 2 and f"hostile.nii.gz: {expected}" in err[0], err
    summary = json.loads((tmp_path / "pred" / "summary.json").read_text())
    assert summary["cases"] == 1 and summary["classes"]["class_1"]["dice"]["mean"] == 1.0  # the good case scored


def test_an_output_that_is_a_file_is_one_line(tmp_path, capsys):
    _pair(tmp_path, "x", cube(size=4).astype(np.uint8))
    (tmp_path / "out").write_text("a file")
    code, err = _evaluate(tmp_path, capsys, "--output", str(tmp_path / "out"))
    assert code == 1 and len(err) == 1 and "out: --output is a file, not a folder" in err[0], err
    assert (tmp_path / "out").read_text() == "a file"


def test_a_nan_affine_is_not_finite_not_a_difference_of_nan(tmp_path, capsys):
    affine = np.eye(4)
    affine[0, 3] = np.nan
    _pair(tmp_path, "x", cube(size=4).astype(np.uint8), affine=affine)
    code, err = _evaluate(tmp_path, capsys)
    assert code == 1 and "pred/x.nii.gz: affine is not finite" in err[0] and "differs" not in err[0], err


def test_evaluate_needs_no_lightning():
    code = "import sys, seg.evaluate, seg.postprocessing; print(any(m.startswith('lightning') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
