"""Mirroring TTA flips only the axes a model was trained mirrored on (`data.flip_axes`), as nnU-Net does.

A network never shown a flipped scan mis-reads one: averaging all 8 mirrored copies took a hippocampus model trained
without mirroring from 0.88 to 0.35 held-out Dice (BENCHMARKS.md). The checkpoint keeps the training loader's
`flip_axes` (Lightning's datamodule hyper-parameters); `TrainedModel.mirror_axes` reads them, ONNX export carries
them, an ensemble mirrors only the axes every member was trained on, and `seg predict --tta` says what it averages.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from seg.cli import main
from seg.errors import CheckpointError
from seg.inference.checkpoint import load_trained_model
from seg.inference.ensemble import load_ensemble
from seg.inference.predictor import Predictor
from test_predict import centred_affine, phantom, save, stub_predictor

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "before_issue28"  # trained with flip_axes []


def with_flip_axes(folder: Path, name: str, flip_axes, **hparams) -> Path:
    """A copy of the fixture checkpoint whose training loader flipped `flip_axes` (None: no record of it)."""
    checkpoint = torch.load(FIXTURE / "last.ckpt", weights_only=True, map_location="cpu")
    if flip_axes is None:
        checkpoint.pop("datamodule_hyper_parameters")
    else:
        checkpoint["datamodule_hyper_parameters"]["flip_axes"] = flip_axes
    checkpoint["hyper_parameters"].update(hparams)
    path = folder / f"{name}.ckpt"
    torch.save(checkpoint, path)
    return path


@pytest.mark.parametrize("spatial_dims, axes, flips", [
    (3, [], [()]),
    (3, [0], [(), (2,)]),
    (3, [2, 0], [(), (4,), (2,), (4, 2)]),
    (3, [0, 1, 2], None),
    (2, [1], [(), (3,)]),
])
def test_tta_flips_the_trained_axes_only(tmp_path, spatial_dims, axes, flips):
    model = stub_predictor(spatial_dims).model
    model.hparams["mirror_axes"] = axes
    mirrored = Predictor(model, device="cpu", tta=True)
    every = [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]
    assert sorted(mirrored.engine.flips) == sorted(flips if flips is not None else every)

    shape = (41, 37, 9)
    affine = centred_affine(np.diag([-1.2, 1.1, 3.0]), shape)
    image, target = phantom(shape, affine)
    path = save(tmp_path / "scan.nii.gz", image, affine)
    calls = []
    forward = model.network.forward
    model.network.forward = lambda x: calls.append(x.shape[0]) or forward(x)
    plain = stub_predictor(spatial_dims).predict_case(path)["label"]
    label = mirrored.predict_case(path)["label"]
    assert len(calls) % len(mirrored.engine.flips) == 0 and len(calls) >= len(mirrored.engine.flips)
    assert np.array_equal(label, plain)  # the stand-in is voxel-wise: every flip, undone, agrees


def test_a_model_without_a_record_mirrors_every_axis():
    assert stub_predictor(3).model.mirror_axes == (0, 1, 2)
    assert stub_predictor(2).model.mirror_axes == (0, 1)


def test_the_checkpoint_remembers_its_training_flips_and_an_ensemble_keeps_the_common_ones(tmp_path):
    assert load_trained_model(FIXTURE / "last.ckpt").mirror_axes == ()
    both = with_flip_axes(tmp_path, "both", [2, 0])
    last = with_flip_axes(tmp_path, "last", [2])
    unrecorded = with_flip_axes(tmp_path, "unrecorded", None)
    assert load_trained_model(both).mirror_axes == (0, 2)
    assert load_trained_model(unrecorded).mirror_axes == (0, 1, 2)
    assert load_ensemble([both, last]).mirror_axes == (2,)
    assert load_ensemble([both, unrecorded]).mirror_axes == (0, 2)
    assert load_ensemble([both, FIXTURE / "last.ckpt"]).mirror_axes == ()


@pytest.mark.parametrize("bad", [[3], ["x"], 1])
def test_malformed_mirror_axes_are_refused_in_one_line(tmp_path, bad):
    with pytest.raises(CheckpointError, match="mirror_axes"):
        load_trained_model(with_flip_axes(tmp_path, "bad", [], mirror_axes=bad))


def test_onnx_export_keeps_the_mirror_axes(tmp_path):
    pytest.importorskip("onnxruntime")
    from seg.inference.onnx_model import export_onnx, load_onnx_model

    export_onnx(load_trained_model(with_flip_axes(tmp_path, "both", [0, 2])), tmp_path / "model.onnx")
    assert load_onnx_model(tmp_path / "model.onnx").mirror_axes == (0, 2)


def test_predict_tta_on_a_model_trained_without_mirroring_says_so_and_keeps_its_labels(tmp_path, capsys):
    then = np.asarray(nib.load(FIXTURE / "labels.nii.gz").dataobj)  # `seg predict` without --tta, by 33aa086
    code = main(["predict", "-c", str(FIXTURE / "last.ckpt"), "-i", str(FIXTURE / "scan.nii.gz"),
                 "-o", str(tmp_path / "out"), "--device", "cpu", "--precision", "fp32", "--tta"])  # as `then` was made
    assert code == 0
    assert "--tta: not mirroring: this model was trained without mirroring" in capsys.readouterr().err
    assert np.array_equal(np.asarray(nib.load(tmp_path / "out" / "scan.nii.gz").dataobj), then)


def test_predict_tta_says_which_axes_it_averages(tmp_path, capsys):
    scans = tmp_path / "scans"
    scans.mkdir()
    shutil.copy(FIXTURE / "scan.nii.gz", scans / "scan.nii.gz")
    code = main(["predict", "-c", str(with_flip_axes(tmp_path, "one", [1])), "-i", str(scans),
                 "-o", str(tmp_path / "out"), "--device", "cpu", "--tta"])
    assert code == 0
    assert "--tta: averaging 2 copies mirrored on axes [1] only" in capsys.readouterr().err
