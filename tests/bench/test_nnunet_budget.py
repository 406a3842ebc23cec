"""bench/nnunet_budget.py: without nnU-Net, its split is the one of seg's own benches, its scan folder follows
nnU-Net's naming, and the trainer file it copies into nnU-Net's environment compiles."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from seg.data.synthetic import write_dataset

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    try:
        import nnunet_budget
    finally:
        sys.path.remove(str(BENCH))
    return nnunet_budget


def test_help_runs_without_nnunet():
    done = subprocess.run([sys.executable, str(BENCH / "nnunet_budget.py"), "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "--minutes" in done.stdout and "--nnunet-python" in done.stdout


def test_acdc_split_holds_out_the_patients_of_bench_acdc(bench, tmp_path):
    source = tmp_path / "acdc"
    for sub in ("imagesTr", "labelsTr"):
        (source / sub).mkdir(parents=True)
    training = []
    for patient in range(1, 13):
        for frame in (1, 12):
            name = f"patient{patient:03d}_frame{frame:02d}.nii.gz"
            for sub in ("imagesTr", "labelsTr"):
                (source / sub / name).write_bytes(b"")
            training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    (source / "dataset.json").write_text(json.dumps({"name": "ACDC", "modality": {"0": "MRI"},
                                                     "labels": {"0": "background", "1": "RV"}, "training": training}))
    folder, held_out = bench.split("acdc", source, tmp_path / "a", 3, 0)
    _, expected = bench.acdc.make_split(source, tmp_path / "b", 3, 0)
    assert held_out == expected and len(held_out) == 3
    assert sorted(p.name for p in (folder / "imagesTs").iterdir()) == sorted(
        f"{p}_frame{f:02d}.nii.gz" for p in held_out for f in (1, 12))
    assert len(json.loads((folder / "dataset.json").read_text())["training"]) == 18


def test_hippocampus_split_and_scan_folder(bench, tmp_path):
    root = write_dataset(tmp_path / "synth", cases=6, size=(12, 10, 8), spacing=(1.0, 1.0, 1.0))
    folder, held_out = bench.split("hippocampus", root, tmp_path / "split", 2, 0)
    train_dir, _ = bench.hippocampus_accuracy.make_split(root, tmp_path / "other", 2, 0)
    assert held_out == sorted(bench._case_id(p) for p in (train_dir / "imagesTs").iterdir()) and len(held_out) == 2
    scans = bench.scan_folder(folder / "imagesTs", tmp_path / "scans")
    assert sorted(p.name for p in scans.iterdir()) == [f"{c}_0000.nii.gz" for c in held_out]
    assert all(p.resolve() == (root / "imagesTr" / p.name.replace("_0000", "")).resolve() for p in scans.iterdir())


def test_the_trainer_file_compiles():
    compile((BENCH / "nnunet_wallclock_trainer.py").read_text(), "nnunet_wallclock_trainer.py", "exec")
