"""The network's precision in `seg predict`: "auto" picks bf16 only where the CPU has matrix units for it."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from seg.cli import main
from seg.data.synthetic import write_dataset
from seg.errors import SegError
from seg import hardware
from seg.inference.checkpoint import load_trained_model
from seg.inference.predictor import Predictor, autocast_dtype


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("precision") / "data", cases=3, size=(32, 32, 24), seed=5) / "imagesTr"


@pytest.mark.parametrize("amx, expected", [("amx", torch.bfloat16), ("avx512_bf16", torch.bfloat16), (None, None)])
def test_auto_is_bf16_on_a_cpu_with_matrix_units_else_float32(monkeypatch, amx, expected):
    monkeypatch.setattr(hardware, "cpu_bf16_units", lambda: amx)
    assert autocast_dtype(torch.device("cpu"), "auto") is expected
    assert autocast_dtype(torch.device("cuda"), "auto") is torch.float16
    assert autocast_dtype(torch.device("cpu"), "fp32") is None
    assert autocast_dtype(torch.device("cpu"), "bf16") is torch.bfloat16


def test_fp16_on_the_cpu_and_unknown_precisions_are_refused():
    with pytest.raises(SegError, match="fp16 runs on a GPU"):
        autocast_dtype(torch.device("cpu"), "fp16")
    with pytest.raises(SegError, match="unknown precision 'half'"):
        autocast_dtype(torch.device("cpu"), "half")


def first_convolution_dtypes(predictor: Predictor, scan_path) -> set[torch.dtype]:
    """The dtypes the network's first convolution produced while `predictor` segmented one scan."""
    conv = next(m for m in predictor.model.network.modules() if isinstance(m, torch.nn.Conv3d))
    seen: set[torch.dtype] = set()
    handle = conv.register_forward_hook(lambda module, args, out: seen.add(out.dtype))
    try:
        result = predictor.predict_case(scan_path)
    finally:
        handle.remove()
    assert result["label"].dtype == np.uint8 and result["label"].shape == nib.load(scan_path).shape
    return seen


def test_the_network_runs_in_the_precision_asked_for(trained_checkpoint, scans):
    scan = sorted(scans.glob("*.nii.gz"))[0]
    model = load_trained_model(trained_checkpoint)
    bf16 = Predictor(model, device="cpu", precision="bf16")
    assert bf16.precision == "bf16" and first_convolution_dtypes(bf16, scan) == {torch.bfloat16}
    fp32 = Predictor(load_trained_model(trained_checkpoint), device="cpu", precision="fp32")
    assert fp32.precision == "fp32" and first_convolution_dtypes(fp32, scan) == {torch.float32}


def test_bf16_labels_agree_with_float32_and_the_report_says_which(trained_checkpoint, scans, tmp_path):
    for precision in ("fp32", "bf16"):
        assert main(["predict", "-c", str(trained_checkpoint), "-i", str(scans), "-o", str(tmp_path / precision),
                     "--device", "cpu", "--precision", precision]) == 0
        assert json.loads((tmp_path / precision / "report.json").read_text())["seg"]["precision"] == precision
    names = sorted(p.name for p in (tmp_path / "fp32").glob("synth_*.nii.gz"))
    assert len(names) == 3
    same = total = 0
    for name in names:
        a = np.asarray(nib.load(tmp_path / "fp32" / name).dataobj)
        b = np.asarray(nib.load(tmp_path / "bf16" / name).dataobj)
        same, total = same + int((a == b).sum()), total + a.size
    # bf16 keeps 8 bits of mantissa: only voxels near a tie between two classes may flip (hippocampus: 0.008 %)
    assert same / total >= 0.99


def test_onnxruntime_refuses_a_reduced_precision(trained_checkpoint, scans, tmp_path, capsys):
    code = main(["predict", "-c", str(trained_checkpoint), "-i", str(scans), "-o", str(tmp_path / "out"),
                 "--backend", "onnxruntime", "--precision", "bf16", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and "ONNX Runtime runs the exported float32 model" in err
    assert not (tmp_path / "out").exists()
