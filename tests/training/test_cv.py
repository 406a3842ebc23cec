"""`seg cv`: folds trained once each, resumed not retrained, every case predicted once out of fold."""

from __future__ import annotations

import csv
import json
import os
import shlex

import pytest

from seg.cli import main
from tiny_run import tiny_config

TINY = {
    "trainer": {"max_epochs": 1, "accelerator": "cpu", "limit_train_batches": 2, "log_every_n_steps": 1,
                "check_val_every_n_epoch": 1},
    "model": {"channels": [8, 16, 32], "strides": [2, 2], "sw_batch_size": 2, "hd95": False},
    "data": {"patch_size": [32, 32, 16], "batch_size": 2, "num_workers": 0, "cache_rate": 0.0},
}
FIT = ["--", "--logging", "csv", "--overlays.every_n_epochs", "0"]


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    return tiny_config(tmp_path_factory.mktemp("cv"), TINY, cases=6)


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the folds' seg fit subprocesses inherit it


def test_print_commands(config, tmp_path, capsys):
    assert main(["cv", "--config", str(config), "--folds", "3", "--output", str(tmp_path), "--print-commands",
                 *FIT]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and not (tmp_path / "fold_0").exists()
    for k, line in enumerate(lines):
        words = shlex.split(line)
        assert words[:2] == ["seg", "fit"] and words[words.index("--data.fold") + 1] == str(k)
        assert words[words.index("--trainer.default_root_dir") + 1] == str(tmp_path / f"fold_{k}")
        assert words[-4:] == FIT[1:]


def test_cv_resumes_and_predicts_every_case_once_out_of_fold(config, tmp_path, capsys):
    parent = tmp_path / "cv_run"
    assert main(["cv", "--config", str(config), "--folds", "3", "--fold-list", "0", "--output", str(parent),
                 "--device", "cpu", *FIT]) == 0
    first = parent / "fold_0" / "checkpoints" / "last.ckpt"
    assert (parent / "fold_0" / "fit_done.json").is_file() and not (parent / "fold_1").exists()
    assert not (parent / "cv").exists()  # out-of-fold scores wait for every fold
    mtime = os.stat(first).st_mtime_ns
    capsys.readouterr()

    assert main(["cv", "--config", str(config), "--folds", "3", "--output", str(parent), "--device", "cpu",
                 *FIT]) == 0
    err = capsys.readouterr().err
    assert "fold 0: trained already" in err and "fold 1: training" in err and "fold 2: training" in err
    assert os.stat(first).st_mtime_ns == mtime  # not retrained

    splits = [json.loads((parent / f"fold_{k}" / "split.json").read_text())["val"] for k in range(3)]
    cases = sorted(c for val in splits for c in val)
    assert len(cases) == 6 == len(set(cases))
    predictions = parent / "cv" / "predictions"
    assert sorted(p.name for p in predictions.glob("*.nii.gz")) == [f"{c}.nii.gz" for c in cases]
    with open(predictions / "summary.csv") as f:
        assert sorted(r["case"] for r in csv.DictReader(f) if r["status"] == "ok") == cases
    summary = json.loads((parent / "cv" / "summary.json").read_text())
    assert summary["cases"] == 6 and not summary["failed"] and summary["folds"] == 3
    assert set(summary["classes"]) == {"liver", "lesion"}
    liver = summary["classes"]["liver"]
    assert liver["dice"]["n"] + liver["missing_in_both"] == 6
    with open(parent / "cv" / "per_case.csv") as f:
        assert sorted(r["case"] for r in csv.DictReader(f)) == cases
    plan = json.loads((parent / "cv" / "postprocessing.json").read_text())
    assert set(plan["classes"]) == {"1", "2"}
    for choice in plan["classes"].values():  # a step only where it raised the mean
        assert choice["step"] is None or choice["dice_after"] > choice["dice_before"]
    manifest = json.loads((parent / "cv.json").read_text())
    assert manifest["folds"] == [0, 1, 2]

    # the ensemble of the folds, with the chosen postprocessing
    scans = config.parent / "synth" / "imagesTr"
    assert main(["predict", "--checkpoint", str(parent), "--input", str(scans), "--output", str(tmp_path / "ens"),
                 "--device", "cpu"]) == 0
    assert len(list((tmp_path / "ens").glob("*.nii.gz"))) == 6


def test_options_seg_cv_sets_are_refused(config, tmp_path, capsys):
    assert main(["cv", "--config", str(config), "--output", str(tmp_path), "--", "--data.fold", "1"]) == 1
    assert "--data.fold is set by seg cv" in capsys.readouterr().err
    assert main(["cv", "--config", str(config), "--folds", "3", "--fold-list", "3", "--output", str(tmp_path)]) == 1
    assert "folds are 0..2" in capsys.readouterr().err


def test_changed_options_are_refused_not_mixed(config, tmp_path):
    from seg.errors import SegError
    from seg.training.cv import FIT_DONE, fit_arguments, fold_state

    folder = tmp_path / "fold_0"
    folder.mkdir()
    assert fold_state(folder, ["a"]) == "new"
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert fold_state(folder, ["a"]) == "resume"
    arguments = fit_arguments(config, 0, 3, tmp_path, ["--trainer.max_epochs", "2"])
    (folder / FIT_DONE).write_text(json.dumps({"arguments": arguments}))
    assert fold_state(folder, arguments) == "done"
    with pytest.raises(SegError, match="trained with other options"):
        fold_state(folder, fit_arguments(config, 0, 3, tmp_path, ["--trainer.max_epochs", "3"]))


def test_a_deeply_nested_manifest_is_one_line(config, tmp_path, capsys):
    scans = config.parent / "synth" / "imagesTr"
    (tmp_path / "cv.json").write_text('{"folds": ' + "[" * 5000 + "]" * 5000 + "}")
    # seg cv finds it before training anything; seg predict before loading any checkpoint
    assert main(["cv", "--config", str(config), "--folds", "3", "--output", str(tmp_path), *FIT]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cv.json: cannot read" in err and "nested deeper than" in err, err
    assert not (tmp_path / "fold_0").exists()
    assert main(["predict", "--checkpoint", str(tmp_path), "--input", str(scans), "--output",
                 str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cv.json: cannot read the fold list: nested deeper than" in err, err


def test_without_a_config_every_fold_plans_the_dataset(config, tmp_path, capsys):
    root = config.parent / "synth"
    quick = ["--trainer.max_time", "00:00:01:00", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1",
             "--data.num_workers", "0", "--data.cache_rate", "0", "--model.hd95", "false"]
    assert main(["cv", "--folds", "3", "--output", str(tmp_path), "--print-commands", "--", "--data.root",
                 str(root), *quick]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and all("--config" not in shlex.split(line) for line in lines)

    parent = tmp_path / "planned"
    assert main(["cv", "--folds", "3", "--fold-list", "0", "--output", str(parent), "--device", "cpu", "--",
                 "--data.root", str(root), *quick, *FIT[1:]]) == 0
    plan = parent / "fold_0" / "plan.yaml"  # seg fit --data.root planned the fold, for its own budget
    assert "Planned by `seg plan`" in plan.read_text() and "00:00:01:00" in plan.read_text()
    done = json.loads((parent / "fold_0" / "fit_done.json").read_text())
    assert done["data_root"] == str(root) and "--config" not in done["arguments"]
    assert json.loads((parent / "cv.json").read_text())["config"] is None


def test_no_config_and_no_dataset_is_one_line(tmp_path, capsys):
    assert main(["cv", "--output", str(tmp_path), "--", "--trainer.max_epochs", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--data.root DATASET" in err, err
    assert not (tmp_path / "cv.json").exists()
