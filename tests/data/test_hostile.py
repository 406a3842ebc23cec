"""Hostile and broken datasets: the size guard, and check-data reporting every problem in one pass without crashing.

Each test makes its own small files (tests/hostile_files.py): header and gzip bombs are a few KiB to 2 MiB.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from hostile_files import dataset_json, gzip_bomb, header_bomb, rss_growth_mb
from seg.data.checks import check_dataset, check_or_raise
from seg.data.guard import GZIP_MAX_RATIO, MAX_VOXELS, guard_file, memory_limit
from seg.data.layout import load_dataset
from seg.data.synthetic import write_dataset
from seg.data.transforms import inference_transforms
from seg.errors import DataError

SIZE = (16, 16, 12)
LABELS = {"0": "background", "1": "liver", "2": "lesion"}


def _case(root, case):
    return root / "imagesTr" / f"{case}.nii.gz", root / "labelsTr" / f"{case}.nii.gz"


def _replace(path, data=None, affine=None, dtype=None):
    """Rewrite a NIfTI file with new voxels and/or affine."""
    image = nib.load(path)
    data = np.asanyarray(image.dataobj) if data is None else data
    out = nib.Nifti1Image(data if dtype is None else data.astype(dtype), image.affine if affine is None else affine)
    nib.save(out, path)


def _problems(root):
    return [(p.case_id, os.path.basename(p.path), p.message) for p in check_dataset(root)]


# ---- the size guard -----------------------------------------------------------------------------------------------
def test_header_bomb_refused_from_the_header(tmp_path):
    path = header_bomb(tmp_path / "bomb.nii")
    assert path.stat().st_size == 4096
    with pytest.raises(DataError) as caught:
        guard_file(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: header claims shape (1024, 1024, 1024) of float32 (4.0 GiB)")
    assert "the file holds 3.7 KiB of voxel data" in message and "\n" not in message


def test_header_bomb_check_data_rss_under_100_mb(tmp_path):
    root = write_dataset(tmp_path / "ds", cases=2, size=SIZE)
    image, _ = _case(root, "synth_001")
    image.unlink()
    bomb = header_bomb(image.with_name("synth_001.nii"))
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"][1]["image"] = "./imagesTr/synth_001.nii"
    dataset_json(root, meta)
    growth, out = rss_growth_mb(f"problems = check_dataset({str(root)!r})\nprint(*problems, sep='\\n')",
                                setup="from seg.data.checks import check_dataset")
    assert growth < 100, out
    assert f"synth_001: {bomb}: header claims shape (1024, 1024, 1024) of float32 (4.0 GiB)" in out


def test_gzip_bomb_refused_with_rss_under_100_mb(tmp_path):
    bomb = gzip_bomb(tmp_path / "bomb.nii.gz")  # 2 GiB of zeros behind a header claiming 1024 x 1024 x 512 float32
    assert bomb.stat().st_size < 2.5 * (1 << 20)
    growth, out = rss_growth_mb(f"guard_file({str(bomb)!r})", setup="from seg.data.guard import guard_file")
    assert growth < 100, out
    assert "header claims shape (1024, 1024, 512) of float32 (2.0 GiB)" in out and "gzip bomb" in out
    assert f"({GZIP_MAX_RATIO}:1)" in out


def test_gzip_bomb_check_data_rss_under_100_mb(tmp_path):
    root = write_dataset(tmp_path / "ds", cases=2, size=SIZE)
    _, label = _case(root, "synth_001")
    gzip_bomb(label)
    growth, out = rss_growth_mb(f"print(*check_dataset({str(root)!r}), sep='\\n')",
                                setup="from seg.data.checks import check_dataset")
    assert growth < 100, out
    [line] = [line for line in out.splitlines() if line.startswith("synth_")]
    assert line.startswith(f"synth_001: {label}: header claims shape (1024, 1024, 512)") and "gzip bomb" in line


def test_gzip_stream_inflating_past_its_header_is_cut_short(tmp_path):
    """A modest header in front of a 2 GiB stream: check-data's CRC pass stops at the image, not at 2 GiB."""
    root = write_dataset(tmp_path / "ds", cases=1, size=SIZE)
    _, label = _case(root, "synth_000")
    gzip_bomb(label, shape=SIZE, dtype=np.uint8)
    growth, out = rss_growth_mb(f"print(*check_dataset({str(root)!r}), sep='\\n')",
                                setup="from seg.data.checks import check_dataset")
    assert growth < 100, out
    assert "inflates to more than 1.0 MiB, past the image its header describes" in out


def test_memory_limit_from_environment(tmp_path, monkeypatch):
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((64, 64, 64), np.float32), np.eye(4)), path)
    monkeypatch.setenv("SEG_MEMORY_LIMIT", "2M")
    assert memory_limit() == 2 << 20
    with pytest.raises(DataError, match=r"takes about 4.0 MiB, more than the 2.0 MiB of memory available"):
        guard_file(path)
    monkeypatch.setenv("SEG_MEMORY_LIMIT", "lots")
    with pytest.raises(DataError, match="is not a size"):
        memory_limit()


def test_resampled_size_is_refused_before_loading(tmp_path):
    """8^3 voxels of 1000 mm resampled to 1 mm: 8000^3 voxels; the loader refuses it from the header."""
    path = tmp_path / "huge_voxels.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.diag([1000.0, 1000.0, 1000.0, 1.0])), path)
    with pytest.raises(DataError) as caught:
        guard_file(path, [1.0, 1.0, 1.0])
    assert "give shape (8000, 8000, 8000) (512,000,000,000 voxels)" in str(caught.value)
    assert f"limit of {MAX_VOXELS:,}" in str(caught.value)
    preprocessing = {"orientation": "RAS", "spacing": [1.0, 1.0, 1.0], "crop_foreground": False,
                     "normalization": [{"scheme": "zscore", "nonzero": True}]}
    with pytest.raises(Exception) as loaded:  # MONAI's Compose wraps what its transforms raise
        inference_transforms(preprocessing)({"image": str(path)})
    cause = loaded.value
    while cause is not None and not isinstance(cause, DataError):
        cause = cause.__cause__
    assert cause is not None and "(8000, 8000, 8000)" in str(cause)


@pytest.mark.parametrize("kind", ["rgb", "complex", "zero_axis"])
def test_unusable_voxel_types_refused_in_one_line(tmp_path, kind):
    path = tmp_path / f"{kind}.nii.gz"
    if kind == "rgb":
        data = np.zeros((4, 4, 4), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
        expected = "voxels are RGB colour"
    elif kind == "complex":
        data = np.ones((4, 4, 4), np.complex64)
        expected = "voxels are complex numbers (complex64)"
    else:
        data = np.zeros((4, 4, 0, 1), np.float32)
        expected = "header shape (4, 4, 0, 1) has a zero-length axis"
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    with pytest.raises(DataError, match=expected.replace("(", r"\(").replace(")", r"\)")) as caught:
        guard_file(path)
    assert "\n" not in str(caught.value) and str(caught.value).startswith(str(path))


# ---- check-data: what `seg fit` will do ------------------------------------------------------------------------------
def test_case_with_45_mm_voxels_among_1_mm_ones(tmp_path, monkeypatch):
    """check-data sees what `seg fit` will do: it resamples every case to the dataset's median spacing."""
    monkeypatch.setenv("SEG_MEMORY_LIMIT", "1T")  # the same answer on any machine
    root = write_dataset(tmp_path / "ds", cases=5, size=(48, 48, 32), spacing=(1.0, 1.0, 1.0))
    for path in _case(root, "synth_002"):  # 48 x 48 x 32 voxels of 45 mm: 2160 x 2160 x 1440 at 1 mm
        _replace(path, affine=np.diag([45.0, 45.0, 45.0, 1.0]))
    for path in _case(root, "synth_003"):  # small enough to resample, but far off the others
        _replace(path, affine=np.diag([1.0, 1.0, 12.0, 1.0]))
    problems = _problems(root)
    assert [(case, name) for case, name, _ in problems] == [("synth_002", "synth_002.nii.gz")] * 2 + [
        ("synth_003", "synth_003.nii.gz")], problems
    for _, _, message in problems[:2]:  # image and label: both are resampled
        assert message.startswith("45 x 45 x 45 mm voxels resampled to 1 x 1 x 1 mm give shape (2160, 2160, 1440) "
                                  "(6,718,464,000 voxels), more than the limit of 2,147,483,648"), message
    assert "voxel spacing 1 x 1 x 12 mm is 12 times off the dataset's median 1 x 1 x 1 mm" in problems[2][2]
    with pytest.raises(DataError, match="3 problems in 2 cases"):  # what `seg fit` runs before training
        check_or_raise(root)


def test_absurd_declared_labels(tmp_path):
    root = write_dataset(tmp_path / "ds", cases=1, size=SIZE)
    for labels, expected in [({**LABELS, "100000000": "huge"}, "label value 100000000 is above 1000"),
                             ({**LABELS, "1.5": "half"}, "label value 1.5 is not a whole number"),
                             ('{"0": "background", "1": "liver", "Infinity": "x"}', "label value inf is not a whole"),
                             ('{"background": 0, "liver": Infinity}', "label value inf is not a whole number"),
                             ('{"background": 0, "liver": NaN}', "label value nan is not a whole number"),
                             ({"background": 0, "liver": True}, "label value 'liver' is not a number")]:
        meta = json.loads((root / "dataset.json").read_text())
        text = json.dumps(meta).replace(json.dumps(meta["labels"]), labels if isinstance(labels, str)
                                        else json.dumps(labels))
        dataset_json(root, text)
        problems = _problems(root)
        assert problems == [("dataset", "dataset.json", problems[0][2])] and expected in problems[0][2], problems
        with pytest.raises(DataError, match=expected):  # the training loader (NiftiDataModule) reads the same
            load_dataset(root)


def test_every_problem_of_every_entry_in_one_pass(tmp_path):
    """A path out of the folder, wrong types and a broken case: all reported together, each in one line."""
    root = write_dataset(tmp_path / "ds", cases=3, size=SIZE)
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"] += [{"image": "./imagesTr/synth_000.nii.gz", "label": "../../etc/passwd.nii.gz"},
                         {"image": 5, "label": "./labelsTr/x.nii.gz"}, "not an entry", None]
    meta["test"] = 7
    dataset_json(root, meta)
    image, _ = _case(root, "synth_001")
    _replace(image, dtype=np.float32, data=np.full(SIZE, np.nan, np.float32))
    problems = _problems(root)
    messages = [m for _, _, m in problems]
    assert len(problems) == 6, problems
    assert "label path '../../etc/passwd.nii.gz' escapes the dataset folder" in messages[0]
    assert "empty or non-text image path: 5" in messages[1]
    assert "training entry 5 must have 'image' and 'label', got 'not an entry'" in messages[2]
    assert "training entry 6 must have 'image' and 'label', got None" in messages[3]
    assert "'test' must be a list of image paths, got 7" in messages[4]
    assert problems[5][:2] == ("synth_001", "synth_001.nii.gz") and "NaN" in messages[5]
    with pytest.raises(DataError, match="escapes the dataset folder"):
        load_dataset(root)


def test_rgb_label_is_one_problem_not_a_crash(tmp_path):
    root = write_dataset(tmp_path / "ds", cases=2, size=SIZE)
    _, label = _case(root, "synth_001")
    rgb = np.zeros(SIZE, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.save(nib.Nifti1Image(rgb, nib.load(label).affine), label)
    assert [(c, n) for c, n, _ in _problems(root)] == [("synth_001", "synth_001.nii.gz")]
    assert "voxels are RGB colour" in _problems(root)[0][2]


def test_complex_image_is_refused(tmp_path):
    root = write_dataset(tmp_path / "ds", cases=1, size=SIZE)
    image, _ = _case(root, "synth_000")
    _replace(image, dtype=np.complex64)
    [(case, name, message)] = _problems(root)
    assert (case, name) == ("synth_000", "synth_000.nii.gz") and "complex numbers" in message


DEEP = "[" * 200_000 + "]" * 200_000


def test_deeply_nested_dataset_json(tmp_path):
    root = write_dataset(tmp_path / "ds", cases=1, size=SIZE)
    dataset_json(root, '{"labels": {"0": "background"}, "training": ' + DEEP + "}")
    [(case, name, message)] = _problems(root)
    assert (case, name) == ("dataset", "dataset.json") and "nested too deeply" in message
    with pytest.raises(DataError, match="nested too deeply"):
        load_dataset(root)
    done = subprocess.run([sys.executable, "-m", "seg", "check-data", str(root)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "nested too deeply" in done.stdout.splitlines()[0]


def test_fit_on_deeply_nested_dataset_json_is_one_line(tmp_path):
    root = write_dataset(tmp_path / "ds", cases=1, size=SIZE)
    dataset_json(root, DEEP)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    done = subprocess.run([sys.executable, "-m", "seg", "fit", "--data.root", str(root), "--trainer.max_epochs", "1",
                           "--trainer.default_root_dir", str(tmp_path / "run"), "--logging", "csv"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("seg fit: error: ") and str(root / "dataset.json") in last and "nested too deeply" in last


def test_newline_in_a_file_name_cannot_forge_a_line(tmp_path):
    root = write_dataset(tmp_path / "ds", cases=1, size=SIZE)
    image, _ = _case(root, "synth_000")
    odd = image.with_name("x\nsynth_999: all good.nii.gz")
    image.rename(odd)
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"][0]["image"] = f"./imagesTr/{odd.name}"
    dataset_json(root, meta)
    _replace(odd, data=np.full(SIZE, np.nan, np.float32))
    done = subprocess.run([sys.executable, "-m", "seg", "check-data", str(root)], capture_output=True, text=True,
                          timeout=120)
    lines = done.stdout.splitlines()
    assert len(lines) == 2 and lines[1].startswith("checked 1 case: 1 problem"), lines
    assert repr(str(odd)) in lines[0] and "NaN" in lines[0]


# ---- what held, and must keep holding --------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["nifti2_huge", "nan_affine", "five_d"])
def test_held_refused_in_one_line(tmp_path, kind):
    root = write_dataset(tmp_path / "ds", cases=1, size=SIZE)
    image, _ = _case(root, "synth_000")
    if kind == "nifti2_huge":
        header = nib.Nifti2Header()
        header.set_data_shape((100000, 100000, 100000))
        header.set_data_dtype(np.float32)
        header["vox_offset"] = 544
        image.unlink()
        image = image.with_name("synth_000.nii")
        image.write_bytes(header.binaryblock + b"\0" * 4 + b"\0" * 1000)
        meta = json.loads((root / "dataset.json").read_text())
        meta["training"][0]["image"] = "./imagesTr/synth_000.nii"
        dataset_json(root, meta)
        expected = "header claims shape (100000, 100000, 100000) of float32"
    elif kind == "nan_affine":  # nibabel will not write one: patch srow_x[0] (bytes 280-283) of a written file
        plain = tmp_path / "plain.nii"
        nib.save(nib.Nifti1Image(np.asanyarray(nib.load(image).dataobj), np.eye(4)), plain)
        raw = bytearray(plain.read_bytes())
        raw[280:284] = np.array([np.nan], "<f4").tobytes()
        raw[252:254] = np.array([0], "<i2").tobytes()  # qform_code 0 and sform_code 1: the sform is the affine
        raw[254:256] = np.array([1], "<i2").tobytes()
        image.write_bytes(gzip.compress(bytes(raw)))
        expected = "affine has NaN or infinite entries"
    else:
        _replace(image, data=np.zeros((*SIZE, 1, 2), np.float32))
        expected = "image is 5D"
    problems = [p for p in check_dataset(root) if p.path == str(image)]
    assert problems and expected in problems[0].message, problems
    assert all("\n" not in str(p) for p in problems)
