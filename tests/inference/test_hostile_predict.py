"""Hostile and broken input to `seg predict` and `seg overlays`: bombs, colliding names, links, odd checkpoints.

Per-folder behaviour uses the stand-in predictor of test_predict.py (a known network, no training); the
command line and checkpoint checks use the shared trained checkpoint.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import os
import struct
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from hostile_files import gzip_bomb, header_bomb, rss_growth_mb
from seg.cli import main
from seg.errors import CheckpointError
from seg.inference.checkpoint import load_trained_model
from seg.inference.folder import predict_folder
from seg.inference.outputs import output_stem
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
             "from seg.inference.folder import predict_folder\npredictor = stub_predictor()" % str(Path(__file__).parent))
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


def raw_nifti(path: Path, extensions: bytes) -> Path:
    """A float32 .nii of SHAPE with `extensions` (their 4-byte flag included) between header and voxels."""
    header = nib.Nifti1Header()
    header.set_data_shape(SHAPE)
    header.set_data_dtype(np.float32)
    header.set_sform(np.eye(4), code=1)
    header["vox_offset"] = 348 + len(extensions)
    data = (100 + np.arange(math.prod(SHAPE)) % 7).astype("<f4")
    path.write_bytes(header.binaryblock + extensions + data.tobytes())
    return path


def test_nibabel_header_messages_name_the_file(tmp_path, caplog):
    scans, out = tmp_path / "scans", tmp_path / "out"
    scans.mkdir()
    path = raw_nifti(scans / "odd_offset.nii", b"\0" * 12)  # nibabel: "not divisible by 16, not SPM compatible"
    with caplog.at_level("WARNING", logger="nibabel.global"):
        [result] = predict_folder(stub_predictor(), scans, out, progress=False)
    assert result.status == "ok"
    messages = [r.getMessage() for r in caplog.records if "divisible by 16" in r.getMessage()]
    assert messages and all(m.startswith(f"{path}: ") for m in messages), messages


def test_nibabel_python_warnings_are_one_line_naming_the_file(tmp_path, caplog):
    """nibabel warns (Python `warnings`, printed on two lines without the file) on an extension whose size is not a
    multiple of 16 bytes: it reaches the log as one line naming the file."""
    scans, out = tmp_path / "scans", tmp_path / "out"
    scans.mkdir()
    extension = struct.pack("<ii", 24, 6) + b"sixteen bytes!!!"  # 24 bytes: not a multiple of 16
    path = raw_nifti(scans / "odd_extension.nii", b"\1\0\0\0" + extension)
    with caplog.at_level("WARNING", logger="nibabel.global"):
        [result] = predict_folder(stub_predictor(), scans, out, progress=False)
    assert result.status == "ok", result.message
    [message] = [r.getMessage() for r in caplog.records if "multiple of 16 bytes" in r.getMessage()]
    assert message.startswith(f"{path}: UserWarning: Extension size is not a multiple of 16 bytes") and "\n" not in message


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


@pytest.mark.parametrize("overlap", ["0.999", "nan", "-0.1"])
def test_an_overlap_that_would_not_end_is_refused_before_anything_is_written(trained_checkpoint, tmp_path, capsys,
                                                                             overlap):
    scans = tmp_path / "scans"
    scans.mkdir()
    scan(scans / "good.nii.gz")
    code = main(["predict", "-c", str(trained_checkpoint), "-i", str(scans), "-o", str(tmp_path / "out"),
                 "--overlap", overlap])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith(f"seg predict: error: --overlap must be in [0, 0.95], "
                                                             f"got {float(overlap)}")
    assert not (tmp_path / "out").exists()


# ---- a case is the unit of failure ---------------------------------------------------------------------------------
def test_output_stems_are_short_safe_and_unique():
    long_a, long_b = "a" * 300, "a" * 299 + "b"
    ids = ["plain", "p_probabilities", long_a, long_b, "é" * 200, "x/../y", "..", "", "a\nb", "a_b", "\udcff"]
    stems = {case: output_stem(case) for case in ids}
    assert stems["plain"] == "plain" and stems["p_probabilities"] == "p_probabilities" and stems["a_b"] == "a_b"
    assert len(set(stems.values())) == len(ids)
    for case, stem in stems.items():
        assert stem and stem.isprintable() and "/" not in stem and not stem.startswith("."), (case, stem)
        assert len(f"{stem}_probabilities.nii.gz".encode()) <= 120
        assert output_stem(case) == stem  # the same in every run and every part
    assert stems[long_a].startswith("a" * 80) and stems["é" * 200].startswith("é" * 40)


def test_a_name_too_long_for_the_filesystem_and_an_output_it_refuses_fail_one_case_each(tmp_path, capsys):
    """A case id of 240 characters (its outputs would pass the 255-byte limit) gets a short output name; an output
    name taken by a folder fails its case alone, with one line, and the others are predicted as if alone."""
    scans, out = tmp_path / "scans", tmp_path / "out"
    scans.mkdir()
    long_a, long_b = "a" * 240, "a" * 239 + "b"
    for name in (long_a, long_b, "blocked", "good"):
        scan(scans / f"{name}.nii.gz")
    (out / "blocked.nii.gz").mkdir(parents=True)  # the label map's name is a folder: it cannot be written
    (out / "blocked.nii.gz" / "inside").write_text("not ours")
    alone = predict_folder(stub_predictor(), scans / "good.nii.gz", tmp_path / "alone", save_probabilities=True,
                           progress=False)
    results = predict_folder(stub_predictor(), scans, out, save_probabilities=True, preview=True, progress=True)
    err = capsys.readouterr().err
    status = {r.case_id: r.status for r in results}
    assert status == {long_a: "ok", long_b: "ok", "blocked": "failed", "good": "ok"}, err
    assert "Traceback" not in err
    [line] = [line for line in err.splitlines() if "blocked" in line]
    assert "blocked.nii.gz: cannot write" in line
    assert (out / "blocked.nii.gz" / "inside").read_text() == "not ours"
    names = {p.name for p in out.iterdir()}
    assert all(len(name.encode()) <= 120 for name in names), names
    for case in (long_a, long_b):
        stem = output_stem(case)
        assert {f"{stem}.nii.gz", f"{stem}_probabilities.nii.gz", f"{stem}_preview.png"} <= names
    summary = {r["case"]: r for r in rows(out)}
    assert summary[long_a]["outputs"].split(";")[0] == f"{output_stem(long_a)}.nii.gz"  # the original id, its file
    assert set(json.loads((out / "report.json").read_text())["cases"]) == {long_a, long_b, "good"}
    assert np.array_equal(np.asarray(nib.load(out / "good.nii.gz").dataobj),
                          np.asarray(nib.load(tmp_path / "alone" / "good.nii.gz").dataobj))
    assert alone[0].report == next(r.report for r in results if r.case_id == "good")


def test_a_scan_beyond_the_memory_limit_is_one_failed_row(tmp_path, monkeypatch):
    scans = tmp_path / "scans"
    scans.mkdir()
    scan(scans / "big.nii.gz", data=np.ones((64, 64, 64), np.float32))  # 1 MiB: 4 MiB with working copies
    scan(scans / "small.nii.gz")
    monkeypatch.setenv("SEG_MEMORY_LIMIT", "2M")
    results = predict_folder(stub_predictor(), scans, tmp_path / "out", progress=False)
    status = {r.case_id: r for r in results}
    assert status["small"].status == "ok"
    assert status["big"].status == "failed" and "more than the 2.0 MiB of memory available" in status["big"].message
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.json", "small.nii.gz", "summary.csv"]


@contextlib.contextmanager
def unblocking(*fifos: Path, seconds: float = 30.0):
    """Yields a list that names each fifo a reader was stuck on after `seconds`; opening its other end unblocks
    the reader, so the test fails instead of hanging."""
    hung: list[Path] = []
    done = threading.Event()

    def release():
        if done.wait(seconds):
            return
        for fifo in fifos:
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # succeeds only with a reader waiting
                hung.append(fifo)
            except OSError:
                pass

    threading.Thread(target=release, daemon=True).start()
    try:
        yield hung
    finally:
        done.set()


def test_fifos_named_like_a_scan_or_the_earlier_report_are_never_opened(tmp_path, capsys):
    scans, out = tmp_path / "scans", tmp_path / "out"
    scans.mkdir()
    out.mkdir()
    scan(scans / "good.nii.gz")
    os.mkfifo(scans / "x.nii.gz")
    os.mkfifo(out / "report.json")
    with unblocking(scans / "x.nii.gz", out / "report.json") as hung:
        results = predict_folder(stub_predictor(), scans, out, skip_existing=True, progress=True)
    assert not hung
    err = capsys.readouterr().err
    status = {r.case_id: r for r in results}
    assert status["good"].status == "ok"
    assert status["x"].status == "failed" and "not a regular file" in status["x"].message
    assert "report.json: the earlier report is not a regular file; ignored" in err
    assert set(json.loads((out / "report.json").read_text())["cases"]) == {"good"}  # the fifo replaced


# ---- reports never fail on numbers -------------------------------------------------------------------------------------
def test_scans_of_huge_values_are_predicted_with_a_strict_json_report(tmp_path):
    """float32 values near its limit (3e38: float32 sums overflow) and a uint64 scan of 2^64 - 1 values."""
    scans, out = tmp_path / "scans", tmp_path / "out"
    scans.mkdir()
    big = np.full(SHAPE, 100.0, np.float32)
    big[5:10, 5:10, 5:9] = 3e38
    scan(scans / "near_float32_max.nii.gz", data=big)
    huge = np.full(SHAPE, 7, np.uint64)
    huge[5:10, 5:10, 5:9] = 2**64 - 1
    nib.save(nib.Nifti1Image(huge, np.eye(4), dtype=np.uint64), scans / "uint64.nii.gz")
    results = predict_folder(stub_predictor(), scans, out, progress=False)
    assert [r.status for r in results] == ["ok", "ok"], [r.message for r in results]
    text = (out / "report.json").read_text()
    report = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in report.json"))
    assert report["cases"]["near_float32_max"]["classes"]["target"]["intensity_mean"] == pytest.approx(3e38, rel=1e-6)
    assert report["cases"]["uint64"]["classes"]["target"]["intensity_mean"] == pytest.approx(2.0**64, rel=1e-6)
    assert rows(out)[0]["mean_target"] == "3e+38"
