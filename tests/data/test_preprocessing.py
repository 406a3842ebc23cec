"""The preprocessing settings: one typed schema, one validator, importable without MONAI or torch."""

import subprocess
import sys
import typing

import pytest

from seg.data.fingerprint import load_fingerprint
from seg.data.layout import load_dataset
from seg.data.preprocessing import Preprocessing, check_preprocessing
from seg.data.synthetic import write_dataset
from seg.data.transforms import make_preprocessing
from seg.errors import CheckpointError


def test_the_settings_module_imports_neither_monai_nor_torch():
    code = "import sys, seg.data.preprocessing; print('monai' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


@pytest.mark.parametrize("modality", ["MRI", "CT"])
def test_what_training_writes_is_typed_and_valid(tmp_path, modality):
    info = load_dataset(write_dataset(tmp_path / "data", cases=2, size=(16, 16, 8), modality=modality))
    pre = make_preprocessing(info, load_fingerprint(info, intensities=True), patch_size=(16, 16, 8))
    assert set(pre) <= set(typing.get_type_hints(Preprocessing))
    hparams = {"spatial_dims": 3, "in_channels": info.in_channels, "out_channels": info.num_classes}
    assert check_preprocessing(pre, hparams, tmp_path / "m.ckpt") is pre  # the same plain dict: nothing converted
    with pytest.raises(CheckpointError, match=r"m\.ckpt: checkpoint's preprocessing 'patch_size' is \[16, 16\]"):
        check_preprocessing({**pre, "patch_size": [16, 16]}, hparams, tmp_path / "m.ckpt")
