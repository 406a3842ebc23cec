"""`seg predict` and `Predictor`: outputs in each scan's own geometry, bad files, interruption, bad checkpoints.

Geometry is checked with a stand-in network whose right answer is known (class 1 where the z-scored
intensity is above 2) on phantoms drawn in world coordinates, so that a lost flip, permutation or
resampling error moves the predicted target away from where it is in the scan. The plumbing is checked with
a real (barely trained) `seg fit` checkpoint.
"""

from __future__ import annotations

import csv
import json
import gzip
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from seg.cli import main
from seg.data.synthetic import make_affine, make_case
from seg.data.transforms import inference_transforms
from seg.errors import SegError
from seg.inference.cases import find_cases
from seg.inference.folder import predict_folder
from seg.inference.predictor import NetworkOutput, Predictor
from seg.inference.checkpoint import TrainedModel, build_network


def quiet_env() -> dict[str, str]:
    """One thread per child process: the tests run beside other work, and oversubscribed threads crawl."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# ---- a network with a known answer ----------------------------------------------------------------------------------
class ThresholdNet(torch.nn.Module):
    """Logits (0, 4 (x - 2)) from the first channel: class 1 where the z-scored intensity is above 2."""

    def forward(self, x):
        foreground = 4.0 * (x[:, :1] - 2.0)
        return torch.cat([torch.zeros_like(foreground), foreground], 1)

    def forward_with_gates(self, x, **kwargs):
        pool = torch.nn.functional.avg_pool3d if x.dim() == 5 else torch.nn.functional.avg_pool2d
        return self(x), [torch.sigmoid(pool(x[:, :1], 2))]


def stub_predictor(spatial_dims: int = 3, in_channels: int = 1, tta: bool = False) -> Predictor:
    roi = [24, 24, 16] if spatial_dims == 3 else [24, 24]
    hparams = {"spatial_dims": spatial_dims, "in_channels": in_channels, "out_channels": 2, "channels": [4, 8],
               "strides": [2], "roi_size": roi, "class_names": ["target"]}
    preprocessing = {
        "version": 1, "spatial_dims": spatial_dims, "orientation": "RAS",
        "spacing": [1.0, 1.0, 1.0] if spatial_dims == 3 else [1.0, 1.0, 0.0],
        "normalization": [{"scheme": "zscore", "nonzero": True}] * in_channels,
        "modalities": ["MRI"] * in_channels, "in_channels": in_channels, "num_classes": 2,
        "labels": {"0": "background", "1": "target"}, "class_names": ["target"], "patch_size": roi,
        "crop_foreground": True,
    }
    return Predictor(TrainedModel(ThresholdNet(), preprocessing, hparams), device="cpu", tta=tta)


TARGET_CENTRE, TARGET_RADIUS = np.array([12.0, -7.0, 4.0]), 8.0  # mm from the grid centre, off every axis


def phantom(shape, affine):
    """A body (ellipsoid, intensity 100) with a bright target sphere (1000) off-centre; zero outside the body.

    Drawn in world coordinates relative to the grid centre, so every grid sees the same upright anatomy.
    Returns the image (float32) and the target mask on this grid.
    """
    ijk = np.indices(shape, dtype=np.float64).reshape(3, -1)
    centre = affine[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    world = (affine[:3, :3] @ ijk - centre[:, None]).T.reshape(*shape, 3)
    body = (((world / [30.0, 26.0, 22.0]) ** 2).sum(-1) <= 1).astype(np.float32)
    target = np.linalg.norm(world - TARGET_CENTRE, axis=-1) <= TARGET_RADIUS
    return (100.0 * body + 900.0 * target).astype(np.float32), target


def centred_affine(linear, shape):
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = [5.0, -3.0, 20.0] - linear @ ((np.asarray(shape) - 1) / 2)
    return affine


def save(path: Path, array, affine, stored=None, sform_code=1, qform_code=1):
    image = nib.Nifti1Image(array, affine)
    if stored is not None:
        image.set_data_dtype(stored)  # int16: nibabel stores a scale factor, as scanners do
    image.set_sform(affine, code=sform_code)
    image.set_qform(affine, code=qform_code)
    nib.save(image, path)
    return path


def dice(a, b):
    return 2.0 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


def read_summary(folder: Path) -> dict[str, dict]:
    with open(folder / "summary.csv", newline="") as f:
        return {row["case"]: row for row in csv.DictReader(f)}


# ---- geometry --------------------------------------------------------------------------------------------------------
GRIDS = {  # name -> (shape, linear part of the affine, stored dtype, sform code)
    "lps_aniso_0000": ((71, 55, 29), np.diag([-0.9, -1.3, 2.2]), np.int16, 1),  # `_0000` names a 1-channel case
    "oblique": ((57, 61, 37), make_affine((57, 61, 37), (1.1, 1.15, 1.7), np.random.default_rng(4), True)[:3, :3],
                None, 2),
    "ras": ((45, 51, 33), np.diag([1.4, 1.3, 1.6]), None, 1),
}


@pytest.mark.parametrize("tta", [False, True])
def test_outputs_land_on_each_scans_own_grid(tmp_path, tta):
    scans, truth = tmp_path / "scans", {}
    scans.mkdir()
    for name, (shape, linear, stored, code) in GRIDS.items():
        affine = centred_affine(linear, shape)
        image, target = phantom(shape, affine)
        save(scans / f"{name}.nii.gz", image, affine, stored, sform_code=code)
        truth[name.removesuffix("_0000")] = (scans / f"{name}.nii.gz", target)

    results = predict_folder(stub_predictor(tta=tta), scans, tmp_path / "out", save_probabilities=True,
                             save_gates=True, progress=False)

    assert [r.status for r in results] == ["ok"] * 3
    summary = read_summary(tmp_path / "out")
    for case, (source, target) in truth.items():
        original = nib.load(source)
        label = nib.load(tmp_path / "out" / f"{case}.nii.gz")
        assert label.shape == original.shape
        assert np.allclose(label.affine, original.affine, atol=1e-6)
        assert np.array_equal(label.header.get_sform(), original.header.get_sform())
        assert np.array_equal(label.header.get_qform(), original.header.get_qform())
        assert int(label.header["sform_code"]) == int(original.header["sform_code"])
        assert label.get_data_dtype() == np.uint8
        predicted = np.asarray(label.dataobj)
        assert set(np.unique(predicted)) <= {0, 1}
        assert dice(predicted == 1, target) > 0.85, case  # the target is where it is in the scan
        # the same sphere mirrored through the grid centre: where a lost flip would have put it
        assert dice(predicted == 1, target[::-1, ::-1, ::-1]) < 0.2
        voxel_ml = abs(np.linalg.det(original.affine[:3, :3])) / 1000
        assert float(summary[case]["volume_ml_target"]) == pytest.approx((predicted == 1).sum() * voxel_ml, rel=1e-3)
        assert float(summary[case]["volume_ml_target"]) == pytest.approx(4 / 3 * np.pi * TARGET_RADIUS ** 3 / 1000,
                                                                          rel=0.2)

        probabilities = nib.load(tmp_path / "out" / f"{case}_probabilities.nii.gz")
        assert probabilities.shape == (*original.shape, 2)
        assert np.allclose(probabilities.affine, original.affine, atol=1e-6)
        p = probabilities.get_fdata(dtype=np.float32)
        assert np.allclose(p.sum(-1), 1.0, atol=1e-4)
        assert dice(p[..., 1] > 0.5, predicted == 1) > 0.9
        gate = nib.load(tmp_path / "out" / f"{case}_gate_0.nii.gz")
        assert gate.shape == original.shape and np.allclose(gate.affine, original.affine, atol=1e-6)
        g = gate.get_fdata(dtype=np.float32)
        assert 0.0 <= g.min() and g.max() <= 1.0
        assert g[target].mean() > g[~target & (g > 0)].mean()  # the stand-in gate follows intensity


@pytest.mark.parametrize("spatial_dims, copies", [(3, 8), (2, 4)])
def test_tta_averages_every_mirroring(tmp_path, spatial_dims, copies):
    shape = (41, 37, 9)
    affine = centred_affine(np.diag([-1.2, 1.1, 3.0]), shape)
    image, target = phantom(shape, affine)
    path = save(tmp_path / "scan.nii.gz", image, affine)
    plain, mirrored = stub_predictor(spatial_dims), stub_predictor(spatial_dims, tta=True)
    calls = []
    forward = mirrored.model.network.forward
    mirrored.model.network.forward = lambda x: calls.append(x.shape[0]) or forward(x)

    a = plain.predict_case(path, probabilities=True)
    b = mirrored.predict_case(path, probabilities=True)

    windows = len(calls) // copies
    assert windows >= 1 and len(calls) == copies * windows  # every window is run once per mirroring
    # the stand-in is voxel-wise, so every mirrored copy flipped back must agree with the plain prediction
    assert np.allclose(a["probabilities"], b["probabilities"], atol=1e-4)
    assert np.array_equal(a["label"], b["label"])
    assert dice(a["label"] == 1, target) > 0.8


def untrained_predictor(roi, sw_batch_size) -> Predictor:
    """A real (convolutional, untrained, seeded) 3D network with the stand-in's preprocessing and three classes."""
    torch.manual_seed(0)
    hparams = {"out_channels": 3, "channels": [4, 8, 16], "strides": [2, 2], "roi_size": roi,
               "sw_batch_size": sw_batch_size, "class_names": ["a", "b"]}
    preprocessing = {**stub_predictor().preprocessing, "num_classes": 3, "class_names": ["a", "b"],
                     "labels": {"0": "background", "1": "a", "2": "b"}}
    return Predictor(TrainedModel(build_network(hparams).eval(), preprocessing, hparams), device="cpu")


def test_small_scans_share_forward_passes_and_get_their_own_prediction(tmp_path):
    """Scans that fit in one window are padded, stacked and predicted together: same answer as alone."""
    predictor = untrained_predictor(roi=[32, 32, 32], sw_batch_size=4)
    scans = tmp_path / "scans"
    scans.mkdir()
    for i, shape in enumerate([(21, 27, 19), (30, 17, 23), (25, 31, 11), (19, 19, 19), (28, 22, 16)]):
        affine = centred_affine(np.diag([-1.0, 1.0, 1.0]) @ np.diag([0.9, 1.0, 1.1]), shape)
        save(scans / f"s{i}.nii.gz", phantom(shape, affine)[0] + 10.0, affine)  # +10: no zero border to crop
    loaded = [predictor.load([p]) for p in sorted(scans.iterdir())]
    assert all(predictor.fits_one_window(s) for s in loaded)

    together = predictor.infer_batch(loaded, probabilities=True)
    for scan, joint in zip(loaded, together):
        alone = predictor.infer(scan, probabilities=True)
        assert joint.label.shape == alone.label.shape == (1, *scan.data["image"].shape[1:])
        assert torch.allclose(joint.probabilities, alone.probabilities, atol=1e-4)
        assert torch.equal(joint.label, alone.label)

    calls = []
    forward = predictor.engine.labels  # labels alone: no logits kept
    predictor.engine.labels = lambda x, **kw: calls.append(x.shape[0]) or forward(x, **kw)
    results = predict_folder(predictor, scans, tmp_path / "out", progress=False)
    assert [r.status for r in results] == ["ok"] * 5
    assert calls == [4, 1]  # two forward passes for five scans
    for r, scan in zip(results, loaded):
        alone = predictor.to_original(scan, predictor.infer(predictor.load(scan.paths)))["label"]
        assert np.array_equal(np.asarray(nib.load(tmp_path / "out" / f"{r.case_id}.nii.gz").dataobj), alone)


def test_multichannel_case_from_channel_files(tmp_path):
    shape = (40, 44, 30)
    affine = centred_affine(np.diag([1.2, 1.2, 1.5]), shape)
    image, target = phantom(shape, affine)
    scans = tmp_path / "scans"
    scans.mkdir()
    save(scans / "mm_0000.nii.gz", image, affine)
    save(scans / "mm_0001.nii.gz", image * 0.5 + (image > 0), affine)
    save(scans / "single.nii.gz", image, affine)

    results = {r.case_id: r for r in predict_folder(stub_predictor(in_channels=2), scans, tmp_path / "out",
                                                    progress=False)}

    assert results["mm"].status == "ok" and [p.name for p in results["mm"].inputs] == ["mm_0000.nii.gz",
                                                                                        "mm_0001.nii.gz"]
    assert dice(np.asarray(nib.load(tmp_path / "out" / "mm.nii.gz").dataobj) == 1, target) > 0.85
    assert results["single"].status == "failed"
    assert "single.nii.gz" in results["single"].message and "expects 2" in results["single"].message
    assert not (tmp_path / "out" / "single.nii.gz").exists()


def test_preprocessing_of_a_trained_checkpoint_inverts_to_the_scan(trained_checkpoint, tmp_path):
    """The real preprocessing (RAS, 1.5 x 1.5 x 2 mm, crop) undone: a ground truth sent through it comes back."""
    shape = (33, 29, 21)
    rng = np.random.default_rng(3)
    affine = make_affine(shape, (1.2, 1.7, 2.5), rng, oblique=True)
    image, label = make_case(shape, (1.2, 1.7, 2.5), rng, affine)
    save(tmp_path / "case.nii.gz", image, affine)
    save(tmp_path / "label.nii.gz", label, affine)
    predictor = Predictor.from_checkpoint(trained_checkpoint, device="cpu")

    scan = predictor.load([tmp_path / "case.nii.gz"])
    truth = inference_transforms(predictor.preprocessing, ("image", "label"))(
        {"image": str(tmp_path / "case.nii.gz"), "label": str(tmp_path / "label.nii.gz")})["label"]
    assert truth.shape[1:] == scan.data["image"].shape[1:]
    assert scan.data["image"].shape[1:] != shape  # it was resampled and cropped: there is something to undo
    back = predictor.to_original(scan, NetworkOutput(label=truth.as_tensor().to(torch.uint8)))["label"]

    assert back.shape == shape and back.dtype == np.uint8
    assert dice(back == 1, label == 1) > 0.93  # liver
    assert dice(back == 2, label == 2) > 0.85  # small lesion: resampled twice at 2-2.5 mm
    predicted = predictor.predict_case(tmp_path / "case.nii.gz", with_gates=True)
    assert predicted["label"].shape == shape and {"gate_0", "gate_1"} <= set(predicted)
    assert predicted["reference"].shape == shape


# ---- bad files, bad folders, bad checkpoints -------------------------------------------------------------------------
def test_bad_files_are_named_and_skipped(trained_checkpoint, tmp_path, capsys):
    data = trained_checkpoint.parents[2] / "data" / "imagesTr"
    scans = tmp_path / "scans"
    scans.mkdir()
    for name in ("good_a", "good_b"):
        shutil.copy(data / "synth_000.nii.gz", scans / f"{name}.nii.gz")
    good = nib.load(scans / "good_a.nii.gz")
    raw = (scans / "good_a.nii.gz").read_bytes()
    (scans / "truncated.nii.gz").write_bytes(gzip.compress(gzip.decompress(raw)[: len(gzip.decompress(raw)) // 2]))
    (scans / "cutgz.nii.gz").write_bytes(raw[: len(raw) // 2])
    (scans / "zero.nii.gz").write_bytes(b"")
    (scans / "text.nii.gz").write_text("this is not an image\n")
    save(scans / "flat.nii.gz", np.ones((20, 24), np.float32), np.eye(4))
    save(scans / "nan.nii.gz", np.full((16, 16, 12), np.nan, np.float32), good.affine)
    save(scans / "twochannel.nii.gz", np.ones((16, 16, 12, 2), np.float32), good.affine)
    (scans / "notes.txt").write_text("ignored\n")
    bad = {"truncated": "cannot read", "cutgz": "cannot read", "zero": "not a readable NIfTI",
           "text": "not a readable NIfTI",
           "flat": "2D", "nan": "NaN", "twochannel": "2 channel(s)"}

    code = main(["predict", "-c", str(trained_checkpoint), "-i", str(scans), "-o", str(tmp_path / "out")])

    err = capsys.readouterr().err
    assert code == 1
    assert "Traceback" not in err
    assert "notes.txt: skipped: not a .nii/.nii.gz file" in err
    summary = read_summary(tmp_path / "out")
    assert {c: r["status"] for c, r in summary.items()} == {"good_a": "ok", "good_b": "ok", "notes.txt": "ignored",
                                                            **{c: "failed" for c in bad}}
    for case, problem in bad.items():
        line = next(line for line in err.splitlines() if f"{case}.nii.gz:" in line)
        assert problem in line, line
        assert problem in summary[case]["message"] and f"{case}.nii.gz" in summary[case]["message"]
        assert not (tmp_path / "out" / f"{case}.nii.gz").exists()
    for case in ("good_a", "good_b"):
        out = nib.load(tmp_path / "out" / f"{case}.nii.gz")
        assert out.shape == good.shape and np.allclose(out.affine, good.affine)
        assert float(summary[case]["seconds"]) > 0 and summary[case]["volume_ml_liver"] != ""
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good_a.nii.gz", "good_b.nii.gz", "report.json",
                                                                 "summary.csv"]


def test_interrupted_run_leaves_no_broken_file_and_resumes(trained_checkpoint, tmp_path):
    source = trained_checkpoint.parents[2] / "data" / "imagesTr" / "synth_001.nii.gz"
    scans, out = tmp_path / "scans", tmp_path / "out"
    scans.mkdir()
    for i in range(8):
        shutil.copy(source, scans / f"case_{i}.nii.gz")
    process = subprocess.Popen([sys.executable, "-m", "seg", "predict", "-c", str(trained_checkpoint), "-i", str(scans),
                                "-o", str(out), "--tta", "--save-probabilities"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=quiet_env())
    deadline = time.monotonic() + 240
    while process.poll() is None and time.monotonic() < deadline:
        if out.is_dir() and any(p.name.endswith("_probabilities.nii.gz") and not p.name.startswith(".")
                                for p in out.iterdir()):  # a case's last file
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run ended before it could be interrupted"

    first = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if not p.name.startswith(".")}
    assert 1 <= len([n for n in first if n.endswith("_probabilities.nii.gz")]) < 8
    for name in first:  # a final name is only ever a whole file
        assert np.asarray(nib.load(out / name).dataobj).shape[:3] == nib.load(source).shape
    stale = out / f".tmp-{_dead_pid()}-case_0.nii.gz"
    stale.write_bytes(b"half")

    assert main(["predict", "-c", str(trained_checkpoint), "-i", str(scans), "-o", str(out), "--skip-existing",
                 "--save-probabilities"]) == 0

    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["summary.csv", "report.json"] + [f"case_{i}{s}.nii.gz" for i in range(8) for s in ("", "_probabilities")])
    done_first = {n[: -len(".nii.gz")] for n in first if f"{n[:-7]}_probabilities.nii.gz" in first}
    assert done_first, first
    for case in done_first:
        for name in (f"{case}.nii.gz", f"{case}_probabilities.nii.gz"):
            assert (out / name).stat().st_mtime_ns == first[name], f"{name} was written again"
    statuses = {c: r["status"] for c, r in read_summary(out).items()}
    assert {c for c, s in statuses.items() if s == "skipped"} == done_first
    assert {c for c, s in statuses.items() if s == "ok"} == {f"case_{i}" for i in range(8)} - done_first
    # every case is in the report, the skipped ones too (its report was written as cases finished, or is computed
    # again from the files)
    assert set(json.loads((out / "report.json").read_text())["cases"]) == {f"case_{i}" for i in range(8)}
    assert all(row["voxels_liver"] != "" for row in read_summary(out).values())


def _dead_pid() -> int:
    """The id of a process that has exited (and so cannot own a temporary file)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


def test_corrupt_foreign_and_malicious_checkpoints_are_refused(tmp_path, capsys):
    scans = tmp_path / "scans"
    scans.mkdir()
    shape = (20, 20, 12)
    affine = centred_affine(np.eye(3) * 3, shape)
    save(scans / "a.nii.gz", phantom(shape, affine)[0], affine)
    corrupt, foreign, evil = tmp_path / "corrupt.ckpt", tmp_path / "foreign.ckpt", tmp_path / "evil.ckpt"
    corrupt.write_bytes(np.random.default_rng(0).bytes(4096))
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    marker = tmp_path / "pwned"
    torch.save({"state_dict": _Exploit(marker)}, evil)

    for checkpoint, expected in ((corrupt, "corrupt"), (foreign, "not a seg checkpoint"), (evil, "refused")):
        code = main(["predict", "-c", str(checkpoint), "-i", str(scans), "-o", str(tmp_path / "out")])
        err = capsys.readouterr().err.strip()
        assert code == 1
        assert len(err.splitlines()) == 1 and checkpoint.name in err and expected in err, err
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_refuses_to_write_into_the_input_folder(tmp_path, capsys):
    scans = tmp_path / "scans"
    scans.mkdir()
    (scans / "a.nii.gz").write_bytes(b"")
    for output in (scans, scans / "predictions"):
        assert main(["predict", "-c", str(tmp_path / "none.ckpt"), "-i", str(scans), "-o", str(output)]) == 1
        assert "input folder" in capsys.readouterr().err
    assert main(["predict", "-c", str(tmp_path / "none.ckpt"), "-i", str(scans / "a.nii.gz"), "-o", str(scans)]) == 1
    assert "input folder" in capsys.readouterr().err
    assert sorted(p.name for p in scans.iterdir()) == ["a.nii.gz"]


def test_unwritable_output_is_one_clear_error(tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    shape = (20, 20, 12)
    affine = centred_affine(np.eye(3) * 3, shape)
    save(scans / "a.nii.gz", phantom(shape, affine)[0], affine)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SegError, match="cannot write to the output folder"):
        predict_folder(stub_predictor(), scans, blocker / "out", progress=False)


def test_find_cases_groups_channel_files(tmp_path):
    for name in ("a_0000.nii.gz", "a_0001.nii.gz", "b.nii", "scan_2024.nii.gz", "gap_0000.nii.gz",
                 "gap_0002.nii.gz", "notes.txt", ".tmp-1-x.nii.gz"):
        (tmp_path / name).write_bytes(b"")

    cases, broken, ignored = find_cases(tmp_path)

    assert {k: [p.name for p in v] for k, v in cases.items()} == {
        "a": ["a_0000.nii.gz", "a_0001.nii.gz"], "b": ["b.nii"], "scan_2024": ["scan_2024.nii.gz"]}
    assert [r.case_id for r in broken] == ["gap"] and "gap_0002.nii.gz" in broken[0].message
    assert [(r.case_id, r.status, r.message.split(": ")[-1]) for r in ignored] == [
        (".tmp-1-x.nii.gz", "ignored", "hidden file"), ("notes.txt", "ignored", "not a .nii/.nii.gz file")]


def test_a_big_scan_is_predicted_in_slabs_with_the_same_labels(tmp_path, monkeypatch):
    """Past the stitching budget the sliding window runs in slabs (no full-size logits); the labels do not change."""
    import seg.inference.predictor as predictor_module
    import seg.inference.slabs as slabs_module

    predictor = untrained_predictor(roi=[16, 16, 16], sw_batch_size=2)
    shape = (41, 36, 30)
    affine = centred_affine(np.diag([-1.0, 1.0, 1.0]), shape)
    path = save(tmp_path / "big.nii.gz", phantom(shape, affine)[0] + 10.0, affine)
    passes = []
    run = slabs_module.sliding_window_inference
    monkeypatch.setattr(slabs_module, "sliding_window_inference", lambda *a, **k: passes.append(1) or run(*a, **k))

    whole = predictor.predict_case(path)["label"]
    assert len(passes) == 1
    monkeypatch.setattr(predictor_module, "stitch_budget", lambda image: 1)
    slabbed = predictor.predict_case(path)["label"]

    assert len(passes) > 2
    assert slabbed.shape == shape and slabbed.dtype == np.uint8
    assert np.array_equal(slabbed, whole)
    assert len(np.unique(whole)) > 1  # an untrained network, but not a constant answer


def test_any_unusable_checkpoint_is_a_checkpoint_error(tmp_path, trained_checkpoint):
    from seg.errors import CheckpointError
    from seg.inference.checkpoint import load_trained_model
    from seg.inference.checkpoint import CHECKPOINT_KEY

    good = torch.load(trained_checkpoint, weights_only=True)
    raw = trained_checkpoint.read_bytes()
    cases = {f"random_{seed}.ckpt": np.random.default_rng(seed).bytes(size)
             for seed, size in enumerate([0, 1, 64, 4096, 100_000])}
    cases |= {f"truncated_{n}.ckpt": raw[:n] for n in (len(raw) // 3, len(raw) - 100)}
    cases["flipped.ckpt"] = raw[:1000] + bytes(b ^ 0xFF for b in raw[1000:3000]) + raw[3000:]
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
    for name, checkpoint in {"seg_key_not_a_dict.ckpt": {**good, CHECKPOINT_KEY: [1, 2]},
                             "hparams_not_a_dict.ckpt": {**good, "hyper_parameters": "x"},
                             "state_dict_not_a_dict.ckpt": {**good, "state_dict": 3},
                             "bad_hparam_value.ckpt": {**good, "hyper_parameters": {
                                 **good["hyper_parameters"], "channels": "wide"}},
                             "not_a_dict.ckpt": [1, 2, 3]}.items():
        torch.save(checkpoint, tmp_path / name)
        cases[name] = b""
    for name in cases:
        with pytest.raises(CheckpointError) as err:
            load_trained_model(tmp_path / name)
        assert name in str(err.value) and "\n" not in str(err.value), (name, str(err.value))
    assert load_trained_model(trained_checkpoint).preprocessing == good[CHECKPOINT_KEY]["preprocessing"]


# ---- a case is the unit of failure: one output failing leaves the others -------------------------------------------
def _phantom_folder(folder: Path, names, shape=(45, 51, 33)) -> dict[str, np.ndarray]:
    """Scans bigger than the stand-in's window (each predicted alone), and their target masks."""
    folder.mkdir()
    affine = centred_affine(np.diag([1.4, 1.3, 1.6]), shape)
    image, target = phantom(shape, affine)
    for name in names:
        save(folder / f"{name}.nii.gz", image, affine)
    return {name: target for name in names}


def test_a_failing_preview_keeps_the_label_map_and_the_report_is_written_as_cases_finish(tmp_path, monkeypatch):
    import seg.figure
    import seg.inference.stages as stages

    targets = _phantom_folder(tmp_path / "scans", ["a", "b", "c"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "c_preview.png").write_bytes(b"an older preview: it would pass for this scan's")
    seen = {}
    render = seg.figure.render_overlay

    def failing_for_c(path, *args, title="", **kwargs):
        if title == "c":  # a renderer failure on one case (simulated), after a and b are done
            seen.update(json.loads((out / "report.json").read_text())["cases"])
            raise RuntimeError("renderer\nbroke")
        return render(path, *args, title=title, **kwargs)

    monkeypatch.setattr(seg.figure, "render_overlay", failing_for_c)
    monkeypatch.setattr(stages, "REPORT_INTERVAL", 0.0)  # rewrite report.json after every case
    results = predict_folder(stub_predictor(), tmp_path / "scans", out, preview=True, progress=False)

    assert set(seen) == {"a", "b"}  # the report as it stood while c was written: a killed run keeps it
    status = {r.case_id: r.status for r in results}
    assert status == {"a": "ok", "b": "ok", "c": "partial"}
    c = next(r for r in results if r.case_id == "c")
    assert "\n" not in c.message and "c.nii.gz: written, but not the preview" in c.message
    assert "c_preview.png: unexpected error (RuntimeError: renderer; at test_predict.py" in c.message
    label = np.asarray(nib.load(out / "c.nii.gz").dataobj)
    assert dice(label == 1, targets["c"]) > 0.85
    assert np.array_equal(label, np.asarray(nib.load(out / "a.nii.gz").dataobj))  # same scan, same labels
    assert not (out / "c_preview.png").exists() and (out / "a_preview.png").is_file()
    rows = read_summary(out)
    assert rows["c"]["status"] == "partial" and rows["c"]["outputs"] == "c.nii.gz"
    assert rows["c"]["volume_ml_target"] == rows["a"]["volume_ml_target"] != ""
    assert set(json.loads((out / "report.json").read_text())["cases"]) == {"a", "b", "c"}


def test_a_failing_report_keeps_the_label_map_and_exits_1(trained_checkpoint, tmp_path, monkeypatch, capsys):
    import seg.inference.folder as predict

    source = trained_checkpoint.parents[2] / "data" / "imagesTr" / "synth_001.nii.gz"
    scans, out = tmp_path / "scans", tmp_path / "out"
    scans.mkdir()
    for name in ("a", "b"):
        shutil.copy(source, scans / f"{name}.nii.gz")
    report, calls = predict.case_report, []

    def failing_for_b(*args):
        calls.append(args)
        if len(calls) == 2:  # b's report (written after a's) fails: simulated
            raise ValueError("statistics broke")
        return report(*args)

    monkeypatch.setattr(predict, "case_report", failing_for_b)
    code = main(["predict", "-c", str(trained_checkpoint), "-i", str(scans), "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert "1 with an output missing" in err
    rows = read_summary(out)
    assert rows["a"]["status"] == "ok" and rows["b"]["status"] == "partial"
    assert "b.nii.gz: written, but not the report" in rows["b"]["message"] and "statistics broke" in rows["b"]["message"]
    assert np.array_equal(np.asarray(nib.load(out / "a.nii.gz").dataobj), np.asarray(nib.load(out / "b.nii.gz").dataobj))
    assert set(json.loads((out / "report.json").read_text())["cases"]) == {"a"}


def test_a_resumed_run_reports_every_case(tmp_path, capsys):
    """A run killed before its report.json (or with a torn one) is resumed: every case is in the report, the
    skipped ones as they were predicted (computed again from their files)."""
    _phantom_folder(tmp_path / "scans", ["a", "b", "c"])
    out = tmp_path / "out"
    first = predict_folder(stub_predictor(), tmp_path / "scans", out, save_probabilities=True, progress=False)
    report = json.loads((out / "report.json").read_text())["cases"]
    assert set(report) == {"a", "b", "c"} and report["a"]["uncertainty"] is not None
    (out / "c.nii.gz").unlink()  # c was being written when the run was killed
    text = (out / "report.json").read_text()
    for torn, warnings in (("", 0), (text[: len(text) // 2], 1), ("[" * 100_000, 1), ("{}", 1),
                           ('{"cases": {"a": 5, "b": [1]}}', 0)):
        if torn:
            (out / "report.json").write_text(torn)
        else:
            (out / "report.json").unlink()
        again = predict_folder(stub_predictor(), tmp_path / "scans", out, skip_existing=True,
                               save_probabilities=True, progress=True)
        err = capsys.readouterr().err
        assert {r.case_id: r.status for r in again} == {"a": "skipped", "b": "skipped", "c": "ok"}, torn[:20]
        assert "Traceback" not in err
        assert sum("earlier report" in line for line in err.splitlines()) == warnings, err
        assert json.loads((out / "report.json").read_text())["cases"] == report
        rows = read_summary(out)
        assert rows["a"]["voxels_target"] == str(report["a"]["classes"]["target"]["voxels"])
        assert [r.report for r in again] == [r.report for r in first]
        (out / "c.nii.gz").unlink()


def test_a_failing_dicom_seg_keeps_the_label_map(tmp_path, monkeypatch):
    from seg.inference import dicom_seg
    from test_dicom import write_series

    shape = (33, 31, 14)
    affine = centred_affine(np.diag([2.0, 2.1, 4.0]), shape)
    image, target = phantom(shape, affine)
    for patient in ("P1", "P2"):
        write_series(tmp_path / "scans" / patient, image, affine, patient=patient)
    out = tmp_path / "out"
    out.mkdir()
    (out / "P2_1_seg.dcm").write_bytes(b"an older SEG: it would pass for this series'")
    write_segmentation = dicom_seg.write_segmentation

    def failing_for_p2(label, affine, sources, *args, **kwargs):
        if sources[0].parent.name == "P2":  # as a series without FrameOfReferenceUID did (simulated)
            raise AttributeError("'FileDataset' object has no attribute 'FrameOfReferenceUID'")
        return write_segmentation(label, affine, sources, *args, **kwargs)

    monkeypatch.setattr(dicom_seg, "write_segmentation", failing_for_p2)
    results = predict_folder(stub_predictor(), tmp_path / "scans", out, dicom_seg=True, progress=False)
    assert {r.case_id: r.status for r in results} == {"P1_1": "ok", "P2_1": "partial"}
    message = results[1].message
    assert "P2_1.nii.gz: written, but not the dicom seg: " in message and "FrameOfReferenceUID" in message
    label = np.asarray(nib.load(out / "P2_1.nii.gz").dataobj)
    assert np.array_equal(label, np.asarray(nib.load(out / "P1_1.nii.gz").dataobj))
    assert dice(label == 1, target) > 0.8
    assert (out / "P1_1_seg.dcm").is_file() and not (out / "P2_1_seg.dcm").exists()
    assert set(json.loads((out / "report.json").read_text())["cases"]) == {"P1_1", "P2_1"}
