"""A dataset that cannot train is refused in one line by `seg check-data`, `seg plan` and `seg fit`, before anything
is written: one case, no foreground, a class in one case only, no case left for validation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from seg.cli import main
from seg.data.checks import check_dataset
from seg.data.synthetic import write_dataset

SIZE = (24, 24, 12)


def _relabel(root: Path, case: str, change) -> None:
    path = root / "labelsTr" / f"{case}.nii.gz"
    image = nib.load(path)
    nib.save(nib.Nifti1Image(change(np.asarray(image.dataobj)).astype(np.uint8), image.affine), path)


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("untrainable")
    one = write_dataset(base / "one", cases=1, size=SIZE)
    empty = write_dataset(base / "empty", cases=3, size=SIZE)
    for case in ("synth_000", "synth_001", "synth_002"):
        _relabel(empty, case, np.zeros_like)
    lesion_once = write_dataset(base / "lesion_once", cases=3, size=SIZE)
    for case in ("synth_001", "synth_002"):  # the lesion (2) becomes liver (1) in all but synth_000
        _relabel(lesion_once, case, lambda a: np.minimum(a, 1))
    lesion_twice = write_dataset(base / "lesion_twice", cases=3, size=SIZE)
    _relabel(lesion_twice, "synth_002", lambda a: np.minimum(a, 1))
    return {"one": one, "empty": empty, "lesion_once": lesion_once, "lesion_twice": lesion_twice,
            "clean": write_dataset(base / "clean", cases=3, size=SIZE)}


EXPECTED = {
    "one": "1 labelled case: training needs at least 2, one to train on and one to validate on",
    "empty": "no label map holds any foreground (every label is all background)",
    "lesion_once": "label 2 (lesion) is in one case only (synth_000): it would be missing from training or from "
                   "validation",
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_check_data_and_plan_refuse_in_one_line(roots, name, tmp_path, capsys):
    root = roots[name]
    (problem,) = check_dataset(root)
    assert problem.case_id == "dataset" and EXPECTED[name] in problem.message
    assert main(["check-data", str(root)]) == 1
    assert f"dataset: {root}: {EXPECTED[name]}" in capsys.readouterr().out
    plan = tmp_path / "plan.yaml"
    assert main(["plan", str(root), "--output", str(plan)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"seg plan: error: dataset: {root}: {EXPECTED[name]}") and len(err) == 2
    assert not plan.exists()


def test_a_trainable_dataset_has_no_problem(roots):
    assert check_dataset(roots["clean"]) == []


def seg(*args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline")  # a logger, if one were made, would write under the run
    return subprocess.run([sys.executable, "-m", "seg", *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=600)


def _refused(result, expected: str, run: Path) -> None:
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("seg fit: error: ") and expected in last, last
    assert not run.exists(), sorted(run.rglob("*"))  # no run folder: no plan, no wandb/offline-run-*, no config


def test_fit_without_config_refuses_one_case_before_planning(roots, tmp_path):
    run = tmp_path / "run"
    result = seg("fit", "--data.root", roots["one"], "--trainer.default_root_dir", run)
    _refused(result, EXPECTED["one"], run)


def test_fit_with_a_config_refuses_a_split_without_validation_before_the_logger(roots, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "trainer": {"max_epochs": 1, "accelerator": "cpu", "limit_train_batches": 1},
        "model": {"channels": [8, 16], "strides": [2]},
        "data": {"root": str(roots["clean"]), "patch_size": [16, 16, 8], "batch_size": 2, "num_workers": 0,
                 "val_fraction": 0.0}}))
    run = tmp_path / "run"
    result = seg("fit", "--config", config, "--trainer.default_root_dir", run)
    _refused(result, "no case is left for validation (data.val_fraction 0, no data.val_cases)", run)
    # the same config with both lesion cases held out: the network would never see a lesion
    result = seg("fit", "--config", config, "--trainer.default_root_dir", run, "--data.root", roots["lesion_twice"],
                 "--data.val_cases", "[synth_000, synth_001]")
    _refused(result, "label 2 (lesion) is only in validation cases ['synth_000', 'synth_001']: the network would "
                     "never see it in training", run)


def test_time_series_is_not_called_channels(tmp_path, capsys):
    root = write_dataset(tmp_path / "fmri", cases=2, size=SIZE)
    path = root / "imagesTr" / "synth_000.nii.gz"
    image = nib.load(path)
    series = nib.Nifti1Image(np.repeat(np.asarray(image.dataobj)[..., None], 6, axis=3), image.affine)
    series.header.set_xyzt_units("mm", "sec")
    series.header["pixdim"][4] = 2.5
    nib.save(series, path)
    problems = check_dataset(root)
    assert [p.message for p in problems] == [
        "a 4D time series (6 volumes, 2.5 sec apart) is not a multi-channel scan: split it (e.g. `fslsplit`) or give "
        "one volume"]


def test_labels_without_dataset_json_name_the_file_to_write(tmp_path):
    root = write_dataset(tmp_path / "plain", cases=2, size=SIZE)
    (root / "dataset.json").unlink()
    problems = check_dataset(root)
    assert len(problems) == 2  # both cases hold label 2
    message = problems[0].message
    assert "not declared" not in message
    assert message.startswith("label values [2] found but no dataset.json")
    written = json.loads(message.split(" with labels: ", 1)[1])
    assert written == {"labels": {"0": "background", "1": "<name>", "2": "<name>"}}
    assert str(root / "dataset.json") in message
