"""The Python API (`seg.predict`, `seg.load`, `seg.plan`) against the commands, on the same scans and dataset."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

import seg
from seg.cli import main
from seg.errors import DataError, SegError


def scans(checkpoint, folder, names=("a", "b")):
    """Two scans of the checkpoint's synthetic dataset (its training data: the labels are not all background)."""
    source = checkpoint.parents[2] / "data" / "imagesTr"
    folder.mkdir()
    for name, path in zip(names, sorted(source.glob("*.nii.gz"))):
        shutil.copy(path, folder / f"{name}.nii.gz")
    return folder


def command(checkpoint, input, out, *flags):
    assert main(["predict", "-c", str(checkpoint), "-i", str(input), "-o", str(out), "--device", "cpu",
                 "--precision", "fp32", *flags]) == 0
    return json.loads((out / "report.json").read_text())["cases"]


def test_predict_a_folder_in_memory_and_on_disk_gives_the_command_s_outputs(trained_checkpoint, tmp_path):
    folder = scans(trained_checkpoint, tmp_path / "scans")
    reports = command(trained_checkpoint, folder, tmp_path / "cli")

    in_memory = seg.predict(trained_checkpoint, folder, device="cpu", precision="fp32")
    on_disk = seg.predict(trained_checkpoint, folder, tmp_path / "api", device="cpu", precision="fp32")

    assert sorted(in_memory.labels) == sorted(on_disk.labels) == ["a", "b"]
    for case in ("a", "b"):
        expected = nib.load(tmp_path / "cli" / f"{case}.nii.gz")
        for result in (in_memory, on_disk):
            label = result.labels[case]
            assert np.array_equal(np.asarray(label.dataobj), np.asarray(expected.dataobj))
            assert np.asarray(label.dataobj).any()
            assert np.array_equal(label.affine, expected.affine) and label.get_data_dtype() == expected.get_data_dtype()
            assert json.loads(json.dumps(result.reports[case])) == reports[case]
        assert (tmp_path / "api" / f"{case}.nii.gz").read_bytes() == (tmp_path / "cli" / f"{case}.nii.gz").read_bytes()
    assert (tmp_path / "api" / "summary.csv").read_text().splitlines()[0] == \
        (tmp_path / "cli" / "summary.csv").read_text().splitlines()[0]
    assert json.loads((tmp_path / "api" / "report.json").read_text())["cases"] == reports
    assert [r.status for r in in_memory.results] == ["ok", "ok"]


def test_a_loaded_model_predicts_images_and_arrays_in_their_geometry(trained_checkpoint, tmp_path):
    folder = scans(trained_checkpoint, tmp_path / "scans", ["a"])
    reports = command(trained_checkpoint, folder, tmp_path / "cli")
    expected = np.asarray(nib.load(tmp_path / "cli" / "a.nii.gz").dataobj)
    image = nib.load(folder / "a.nii.gz")

    model = seg.load(trained_checkpoint, device="cpu", precision="fp32")
    from_image = model.predict(image)
    from_array = model.predict(np.asarray(image.dataobj), affine=image.affine)
    from_path = model.predict(folder / "a.nii.gz")

    for result in (from_image, from_array, from_path):
        assert np.array_equal(np.asarray(result.label.dataobj), expected)
        assert np.array_equal(result.label.affine, image.affine) and result.label.shape == image.shape
        assert json.loads(json.dumps(result.report)) == reports["a"]
    assert list(from_image.labels) == ["image"] and list(from_path.labels) == ["a"]


def test_api_errors_are_the_command_s(trained_checkpoint, tmp_path, capsys):
    with pytest.raises(DataError, match="needs affine="):
        seg.predict(trained_checkpoint, np.zeros((8, 8, 8), np.float32), device="cpu")
    with pytest.raises(SegError, match="input not found"):
        seg.predict(trained_checkpoint, tmp_path / "missing.nii.gz", device="cpu")
    assert main(["predict", "-c", str(trained_checkpoint), "-i", str(tmp_path / "missing.nii.gz"), "-o",
                 str(tmp_path / "out")]) == 1
    assert "input not found" in capsys.readouterr().err
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a scan")
    with pytest.raises(SegError, match="broken.nii.gz"):  # one scan that fails is its error, not a row
        seg.load(trained_checkpoint, device="cpu").predict(broken)
    with pytest.raises(TypeError, match="seg.load"):
        seg.load(trained_checkpoint, device="cpu").predict(broken, tta=True)


def test_plan_returns_what_seg_plan_writes(trained_checkpoint, tmp_path, capsys):
    import yaml

    root = trained_checkpoint.parents[2] / "data"
    planned = seg.plan(root, tmp_path / "api.yaml")
    assert main(["plan", str(root), "--output", str(tmp_path / "cli.yaml")]) == 0
    assert (tmp_path / "api.yaml").read_text() == planned.yaml
    assert yaml.safe_load((tmp_path / "cli.yaml").read_text()) == yaml.safe_load(planned.yaml) == planned.config
    assert planned.config["data"]["plan"] == {d.key: d.reason for d in planned.decisions}
    assert {"model.channels", "data.patch_size"} <= set(planned.config["data"]["plan"])


def test_import_seg_is_cheap():
    import subprocess
    import sys

    code = "import sys, seg; print(sorted(m for m in ('torch', 'monai', 'lightning', 'seg.api') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "[]"
