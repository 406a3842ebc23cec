"""Ensembles: copies of one checkpoint predict what it predicts; models that cannot be averaged are refused."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import torch

from seg.cli import main
from seg.inference.ensemble import EnsembleNetwork, load_ensemble
from seg.inference.predictor import Predictor
from seg.training.module import CHECKPOINT_KEY


def test_two_copies_predict_exactly_what_one_predicts(trained_checkpoint, tmp_path):
    copy = tmp_path / "copy.ckpt"
    copy.write_bytes(trained_checkpoint.read_bytes())
    scans = trained_checkpoint.parents[2] / "data" / "imagesTs"
    single, double = tmp_path / "single", tmp_path / "double"
    assert main(["predict", "-c", str(trained_checkpoint), "-i", str(scans), "-o", str(single), "--device", "cpu",
                 "--save-probabilities"]) == 0
    assert main(["predict", "-c", str(trained_checkpoint), str(copy), "-i", str(scans), "-o", str(double),
                 "--device", "cpu", "--save-probabilities"]) == 0
    names = sorted(p.name for p in single.glob("*.nii.gz"))
    assert names and names == sorted(p.name for p in double.glob("*.nii.gz"))
    for name in names:
        a, b = np.asanyarray(nib.load(single / name).dataobj), np.asanyarray(nib.load(double / name).dataobj)
        if "probabilities" in name:
            np.testing.assert_allclose(a, b, atol=1e-5)
        else:
            assert np.array_equal(a, b), name


def test_the_ensemble_averages_softmax_window_by_window(trained_checkpoint):
    """Two different models: the network returns the log of the mean of their softmax, on every window."""
    model = load_ensemble([trained_checkpoint])
    other = load_ensemble([trained_checkpoint]).network
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ensemble = EnsembleNetwork([model.network, other]).eval()
    x = torch.randn(1, 1, 32, 32, 16)
    with torch.no_grad():
        expected = (torch.softmax(model.network(x), 1) + torch.softmax(other(x), 1)) / 2
        torch.testing.assert_close(torch.softmax(ensemble(x), 1), expected, atol=1e-6, rtol=1e-5)
    predictor = Predictor(load_ensemble([trained_checkpoint, trained_checkpoint]), device="cpu")
    assert isinstance(predictor.model.network, EnsembleNetwork) and len(predictor.model.network.networks) == 2


def test_checkpoints_with_other_classes_are_refused_in_one_line(trained_checkpoint, tmp_path, capsys):
    checkpoint = torch.load(trained_checkpoint, weights_only=True)
    names = ["kidney", "tumour"]
    checkpoint["hyper_parameters"]["class_names"] = names
    checkpoint[CHECKPOINT_KEY]["class_names"] = names
    checkpoint[CHECKPOINT_KEY]["preprocessing"]["class_names"] = names
    checkpoint[CHECKPOINT_KEY]["preprocessing"]["labels"] = {"0": "background", "1": "kidney", "2": "tumour"}
    other = tmp_path / "kidney.ckpt"
    torch.save(checkpoint, other)
    scans = trained_checkpoint.parents[2] / "data" / "imagesTs"
    code = main(["predict", "-c", str(trained_checkpoint), str(other), "-i", str(scans), "-o", str(tmp_path / "out"),
                 "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert str(other) in err[0] and str(trained_checkpoint) in err[0] and "classes" in err[0]
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_gates_need_one_checkpoint_and_a_folder_must_be_a_cv_run(trained_checkpoint, tmp_path, capsys):
    scans = trained_checkpoint.parents[2] / "data" / "imagesTs"
    code = main(["predict", "-c", str(trained_checkpoint), str(trained_checkpoint), "-i", str(scans), "-o",
                 str(tmp_path / "out"), "--save-gates", "--device", "cpu"])
    assert code == 1 and "--save-gates needs one checkpoint" in capsys.readouterr().err
    code = main(["predict", "-c", str(tmp_path), "-i", str(scans), "-o", str(tmp_path / "out2"), "--device", "cpu"])
    assert code == 1 and "not a `seg cv` run" in capsys.readouterr().err


def test_predict_applies_a_postprocessing_file(trained_checkpoint, tmp_path):
    import json

    from seg.postprocessing import apply_postprocessing

    scans = trained_checkpoint.parents[2] / "data" / "imagesTs"
    plan = {"format": 1, "classes": {"1": {"step": "largest_component"}, "2": {"step": "remove_small",
                                                                             "min_ml": 0.05}}}
    (tmp_path / "pp.json").write_text(json.dumps(plan))
    assert main(["predict", "-c", str(trained_checkpoint), "-i", str(scans), "-o", str(tmp_path / "raw"),
                 "--device", "cpu"]) == 0
    assert main(["predict", "-c", str(trained_checkpoint), "-i", str(scans), "-o", str(tmp_path / "pp"),
                 "--device", "cpu", "--postprocessing", str(tmp_path / "pp.json")]) == 0
    for path in sorted((tmp_path / "raw").glob("*.nii.gz")):
        raw = nib.load(path)
        expected = apply_postprocessing(np.asanyarray(raw.dataobj).copy(), raw.affine, plan)
        assert np.array_equal(np.asanyarray(nib.load(tmp_path / "pp" / path.name).dataobj), expected)
