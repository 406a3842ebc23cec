"""Hostile and broken input to `seg predict` and `seg overlays`: bombs, colliding names, links, odd checkpoints.

Per-folder behaviour uses the stand-in predictor of test_predict.py (a known network, no training); the
command line and checkpoint checks use the shared trained checkpoint.
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from hostile_files import gzip_bomb, header_bomb, rss_growth_mb
from seg.cli import main
from seg.errors import CheckpointError
from seg.inference.checkpoint import load_trained_model
from seg.inference.predict import predict_folder
from test_predict import read_summary, stub_predictor

SHAPE = (20, 20, 14)


def scan(path: Path, affine=None, data=None) -> Path:
    rng = np.random.default_rng(0)
    data = (100 + 10 * rng.standard_normal(SHAPE)).astype(np.float32) if data is None else data
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def rows(folder: Path) -> list[dict]:
    with open(folder / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


# ---- bombs: memory follows the file, not the header ------------------------------------------------------------------
def test_header_and_gzip_bombs_are_refused_with_rss_under_100_mb(tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    header_bomb(scans / "header_bomb.nii")  # 4 KiB claiming 1024^3 float32
    gzip_bomb(scans / "gzip_bomb.nii.gz")  # 2 MiB inflating to 2 GiB
    scan(scans / "good.nii.gz")
    setup = ("import sys; sys.path.insert(0, %r)\nfrom test_predict import stub_predictor\n"
             "from seg.inference.predict import predict_folder\npredictor = stub_predictor()" % str(Path(__file__).parent))
    code = (f"results = predict_folder(predictor, {str(scans)!r}, {str(tmp_path / 'out')!r}, progress=False)\n"
            "print(*[f'{r.case_id} {r.status} {r.message}' for r in results], sep='\\n')")
    growth, out = rss_growth_mb(code, setup)
    assert growth < 100, out
    lines = {line.split()[0]: line for line in out.splitlines() if line.split()[:1] in (["good"], ["header_bomb"],
                                                                                        ["gzip_bomb"])}
    assert lines["good"].startswith("good ok")
    assert "header_bomb failed" in lines["header_bomb"] and "claims shape (1024, 1024, 1024)" in lines["header_bomb"]
    assert "gzip_bomb failed" in lines["gzip_bomb"] and "gzip bomb" in lines["gzip_bomb"]


def test_zero_length_axis_and_1000_mm_voxels_are_one_line_each(trained_checkpoint, tmp_path, capsys):
    scans = tmp_path / "scans"
    scans.mkdir()
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 0, 1), np.float32), np.eye(4)), scans / "empty4d.nii.gz")
    scan(scans / "huge_voxels.nii.gz", affine=np.diag([1000.0, 1000.0, 1000.0, 1.0]),
         data=np.ones((8, 8, 8), np.float32))
    code = main(["predict", "-c", str(trained_checkpoint), "-i", str(scans), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    summary = read_summary(tmp_path / "out")
    assert {c: r["status"] for c, r in summary.items()} == {"empty4d": "failed", "huge_voxels": "failed"}
    assert "header shape (8, 8, 0, 1) has a zero-length axis" in summary["empty4d"]["message"]
    assert "give shape (5334, 5334, 4000)" in summary["huge_voxels"]["message"]  # 1.5 x 1.5 x 2 mm in the checkpoint
    for case in summary:
        assert sum(f"{case}.nii.gz:" in line for line in err.splitlines()) == 1


# ---- names: unique or refused, before anything is predicted ---------------------------------------------------------
@pytest.mark.parametrize("names, options, refused", [
    (["twin.nii", "twin.nii.gz"], {}, ["twin"]),
    (["case.nii.gz", "case_0000.nii.gz"], {}, ["case"]),
    (["p.nii.gz", "p_probabilities.nii.gz"], {"save_probabilities": True}, ["p", "p_probabilities"]),
    (["x.nii.gz", "x_gate_0.nii.gz"], {"save_gates": True}, ["x", "x_gate_0"]),
    (["y.nii.gz", "y_gate_0_0000.nii.gz"], {"save_gates": True}, ["y", "y_gate_0"]),  # a channel file, named so
])
def test_colliding_case_names_are_refused(tmp_path, names, options, refused):
    scans, out = tmp_path / "scans", tmp_path / "out"
    scans.mkdir()
    for name in names:
        scan(scans / name)
    scan(scans / "other.nii.gz")
    before = digest(scans)
    results = predict_folder(stub_predictor(), scans, out, progress=False, **options)
    assert digest(scans) == before  # nothing written into or over an input
    status = {r.case_id: r.status for r in results}
    assert status == {"other": "ok", **{c: "failed" for c in refused}}
    for result in results:
        if result.status == "failed":
            assert "\n" not in result.message and ("both give case" in result.message or
                                                   "would be written for case" in result.message), result.message
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("other")) == ["report.json", "summary.csv"]
    assert {r["case"]: r["status"] for r in rows(out)} == status


def test_colliding_names_exit_non_zero_and_are_named_once(trained_checkpoint, tmp_path, capsys):
    scans = tmp_path / "scans"
    scans.mkdir()
    scan(scans / "twin.nii")
    scan(scans / "twin.nii.gz")
    code = main(["predict", "-c", str(trained_checkpoint), "-i", str(scans), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err.splitlines()
    assert code == 1
    [line] = [line for line in err if "both give case" in line]
    assert "twin.nii and twin.nii.gz both give case 'twin'; none of them is predicted" in line
    assert not (tmp_path / "out" / "twin.nii.gz").exists()


# ---- every skipped entry is named ---------------------------------------------------------------------------------
def test_links_folders_and_fifos_are_named_in_the_log_and_summary(tmp_path, capsys):
    scans, out = tmp_path / "scans", tmp_path / "out"
    scans.mkdir()
    scan(scans / "good.nii.gz")
    (scans / "dangling.nii.gz").symlink_to(tmp_path / "nowhere.nii.gz")
    (scans / "loop_a.nii.gz").symlink_to(scans / "loop_b.nii.gz")
    (scans / "loop_b.nii.gz").symlink_to(scans / "loop_a.nii.gz")
    (scans / "folder.nii.gz").mkdir()
    os.mkfifo(scans / "fifo.nii")
    (scans / "notes.txt").write_text("x")
    results = predict_folder(stub_predictor(), scans, out, progress=True)
    err = capsys.readouterr().err
    expected = {"dangling": "dangling symbolic link", "loop_a": "symbolic link loop", "loop_b": "symbolic link loop",
                "folder": "a folder, not a file", "fifo": "not a regular file"}
    by_input = {r.inputs[0].name: r for r in results}
    assert by_input["good.nii.gz"].status == "ok"
    assert by_input["notes.txt"].status == "ignored" and "not a .nii/.nii.gz file" in by_input["notes.txt"].message
    summary = {r["inputs"]: r for r in rows(out)}
    for name, reason in expected.items():
        entry = next(n for n in by_input if n.startswith(name))
        assert by_input[entry].status == "failed" and reason in by_input[entry].message
        assert summary[entry]["status"] == "failed" and reason in summary[entry]["message"]
        assert sum(entry in line and reason in line for line in err.splitlines()) == 1, err
    assert summary["notes.txt"]["status"] == "ignored"


def test_a_dangling_link_makes_the_exit_code_non_zero(trained_checkpoint, tmp_path, capsys):
    scans = tmp_path / "scans"
    scans.mkdir()
    scan(scans / "good.nii.gz")
    (scans / "gone.nii.gz").symlink_to(tmp_path / "nowhere.nii.gz")
    code = main(["predict", "-c", str(trained_checkpoint), "-i", str(scans), "-o", str(tmp_path / "out")])
    assert code == 1 and "gone.nii.gz: cannot read: dangling symbolic link" in capsys.readouterr().err
    assert (tmp_path / "out" / "good.nii.gz").is_file()


def test_a_newline_in_a_file_name_is_escaped(tmp_path, capsys):
    scans, out = tmp_path / "scans", tmp_path / "out"
    scans.mkdir()
    odd = scan(scans / "a\nseg predict: forged line.nii.gz", data=np.full(SHAPE, np.nan, np.float32))
    results = predict_folder(stub_predictor(), scans, out, progress=True)
    err = capsys.readouterr().err
    assert not any(line.startswith("seg predict: forged line") for line in err.splitlines()), err
    assert repr(str(odd)) in err
    [result] = results
    assert result.status == "failed" and "\n" not in result.message
    text = (out / "summary.csv").read_text()
    assert len(text.splitlines()) == 2 and "a\\nseg predict: forged line" in text


def test_nibabel_header_messages_name_the_file(tmp_path, caplog):
    scans, out = tmp_path / "scans", tmp_path / "out"
    scans.mkdir()
    header = nib.Nifti1Header()
    header.set_data_shape(SHAPE)
    header.set_data_dtype(np.float32)
    header.set_sform(np.eye(4), code=1)
    header["vox_offset"] = 360  # nibabel: "not divisible by 16, not SPM compatible"
    path = scans / "odd_offset.nii"
    data = (100 + np.arange(math.prod(SHAPE)) % 7).astype("<f4")
    path.write_bytes(header.binaryblock + b"\0" * 12 + data.tobytes())
    with caplog.at_level("WARNING", logger="nibabel.global"):
        [result] = predict_folder(stub_predictor(), scans, out, progress=False)
    assert result.status == "ok"
    messages = [r.getMessage() for r in caplog.records if "divisible by 16" in r.getMessage()]
    assert messages and all(m.startswith(f"{path}: ") for m in messages), messages


def test_complex_image_is_refused(tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    scan(scans / "complex.nii.gz", data=np.ones(SHAPE, np.complex64))
    [result] = predict_folder(stub_predictor(), scans, tmp_path / "out", progress=False)
    assert result.status == "failed" and "voxels are complex numbers (complex64)" in result.message


# ---- seg overlays: goes on past a bad scan, names what it skips ------------------------------------------------------
def test_overlays_go_on_past_a_bad_scan(trained_checkpoint, tmp_path, capsys):
    scans = tmp_path / "scans"
    scans.mkdir()
    scan(scans / "a_huge.nii.gz", affine=np.diag([1000.0, 1000.0, 1000.0, 1.0]), data=np.ones((8, 8, 8), np.float32))
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 0, 1), np.float32), np.eye(4)), scans / "b_empty.nii.gz")
    scan(scans / "c_good.nii.gz")
    (scans / "d_gone.nii.gz").symlink_to(tmp_path / "nowhere.nii.gz")
    code = main(["overlays", "--checkpoint", str(trained_checkpoint), "--input", str(scans), "--output",
                 str(tmp_path / "out"), "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 1 and "Traceback" not in captured.err
    errors = [line for line in captured.err.splitlines() if line.startswith("seg overlays: error: ")]
    assert len(errors) == 3, captured.err
    assert any("a_huge.nii.gz" in e and "give shape" in e for e in errors)
    assert any("b_empty.nii.gz" in e and "zero-length axis" in e for e in errors)
    assert any("d_gone.nii.gz" in e and "dangling symbolic link" in e for e in errors)
    assert (tmp_path / "out" / "c_good" / "overlay.png").is_file()


# ---- checkpoints: every field the Predictor reads ----------------------------------------------------------------------
def _edited(trained_checkpoint: Path, tmp_path: Path, edit) -> Path:
    checkpoint = torch.load(trained_checkpoint, map_location="cpu", weights_only=True)
    edit(checkpoint)
    path = tmp_path / "edited.ckpt"
    torch.save(checkpoint, path)
    return path


def _pre(field, value):
    def edit(checkpoint):
        if value is _DROP:
            del checkpoint["seg"]["preprocessing"][field]
        else:
            checkpoint["seg"]["preprocessing"][field] = value
    return edit


_DROP = object()


@pytest.mark.parametrize("edit, message", [
    (_pre("orientation", _DROP), "preprocessing has no 'orientation'"),
    (_pre("orientation", "RAX"), "preprocessing 'orientation' is 'RAX'"),
    (_pre("normalization", [{"scheme": "minmax"}]), "preprocessing 'normalization'"),
    (_pre("spacing", [0.001, 0.001, 0.001]), "preprocessing 'spacing' is [0.001, 0.001, 0.001]"),
    (_pre("spacing", [1.0, float("nan"), 1.0]), "preprocessing 'spacing'"),
    (_pre("in_channels", 3), "preprocessing says in_channels 3 but the network has in_channels 1"),
    (_pre("num_classes", 7), "preprocessing says num_classes 7 but the network has out_channels 3"),
    (_pre("modalities", ["MRI", "CT"]), "preprocessing 'modalities'"),
    (_pre("patch_size", [32, 32]), "preprocessing 'patch_size'"),
    (_pre("crop_foreground", "yes"), "preprocessing 'crop_foreground'"),
    (_pre("spatial_dims", 2), "preprocessing says spatial_dims 2 but the network has spatial_dims 3"),
    (_pre("class_names", _DROP), "preprocessing has no 'class_names'"),
    (lambda c: c["hyper_parameters"].update(sw_overlap=5.0), "hyper-parameter 'sw_overlap' is 5.0"),
    (lambda c: c["hyper_parameters"].update(sw_batch_size=0), "hyper-parameter 'sw_batch_size' is 0"),
    (lambda c: next(iter(c["state_dict"].values())).view(-1).__setitem__(0, float("nan")), "NaN or infinite"),
    (lambda c: next(iter(c["state_dict"].values())).view(-1).__setitem__(0, float("inf")), "NaN or infinite"),
])
def test_broken_checkpoint_fields_are_one_line_checkpoint_errors(trained_checkpoint, tmp_path, edit, message):
    path = _edited(trained_checkpoint, tmp_path, edit)
    with pytest.raises(CheckpointError) as caught:
        load_trained_model(path)
    assert message in str(caught.value) and str(caught.value).startswith(str(path))
    assert "\n" not in str(caught.value)


def test_broken_checkpoint_through_the_command_line(trained_checkpoint, tmp_path, capsys):
    path = _edited(trained_checkpoint, tmp_path, _pre("orientation", _DROP))
    scans = tmp_path / "scans"
    scans.mkdir()
    scan(scans / "good.nii.gz")
    code = main(["predict", "-c", str(path), "-i", str(scans), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err == [f"seg predict: error: {path}: checkpoint's preprocessing has no 'orientation'; "
                                 "use a .ckpt written by `seg fit`"]
    assert not (tmp_path / "out").exists()
