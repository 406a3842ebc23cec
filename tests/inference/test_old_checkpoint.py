"""A checkpoint written before the budget-dependent plan (issue 28) still loads and predicts the same labels.

`tests/fixtures/before_issue28/` holds what commit 33aa086 wrote: `last.ckpt` of a tiny 3D network (channels
4-8-16) fitted for 2 short epochs on synthetic data (`seg fit`), one scan of that data, and the label map `seg predict`
made of it then. The network is barely trained, so its labels are ragged: any change in how a checkpoint is read, the
scan preprocessed or the labels inverted back to the scan's grid shows up as a changed voxel.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import torch

import seg
from seg.training.module import SegmentationModule

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "before_issue28"


def test_an_old_checkpoint_predicts_the_labels_it_predicted_then(tmp_path):
    then = nib.load(FIXTURE / "labels.nii.gz")
    # float32, as the labels were made: on a CPU with bf16 units `auto` runs the network in bf16, which moves 174
    # of this barely trained network's 24,576 ragged voxels (AVX-512 BF16 EPYC) and would say nothing about loading
    now = seg.predict(FIXTURE / "last.ckpt", FIXTURE / "scan.nii.gz", tmp_path / "out", device="cpu", precision="fp32")
    written = nib.load(next((tmp_path / "out").glob("*.nii.gz")))
    assert np.array_equal(np.asarray(written.dataobj), np.asarray(then.dataobj))
    assert np.allclose(written.affine, then.affine)
    assert np.array_equal(np.asarray(now.labels["scan"].dataobj), np.asarray(then.dataobj))
    assert len(np.unique(np.asarray(then.dataobj))) == 3  # both classes are in it: the comparison means something


def test_an_old_checkpoint_loads_into_the_training_module_weights_only():
    checkpoint = torch.load(FIXTURE / "last.ckpt", weights_only=True, map_location="cpu")
    hparams = {k: v for k, v in checkpoint["hyper_parameters"].items() if not k.startswith("_")}  # LightningCLI's
    module = SegmentationModule(**hparams)
    module.load_state_dict(checkpoint["state_dict"])
    assert module.hparams.deep_supervision is False and list(module.hparams.channels) == [4, 8, 16]
