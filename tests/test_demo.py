"""`make demo`: its held-out table, and the demo config learning both classes of the phantoms."""

from __future__ import annotations

import math

from seg.demo import held_out_table

# 12 of the demo's 50 epochs (60 steps) on 12 phantoms: both classes found in every validation volume, above
# these floors (measured: liver 0.50, lesion 0.064). With the version-1 phantom the lesion was never predicted.
LIVER_DICE, LESION_DICE = 0.4, 0.02


def test_held_out_table_gives_dice_missing_classes_and_means_over_defined_cases():
    scores = {"a": {"liver": 0.9, "lesion": 0.0}, "b": {"liver": 0.8, "lesion": math.nan},
              "c": {"liver": 0.7, "lesion": 0.6}}
    missing = {"a": {"lesion": "not predicted"}, "b": {"lesion": "in neither"}, "c": {}}
    lines = held_out_table(scores, missing, ["liver", "lesion"])
    assert lines[0].split() == ["case", "liver", "lesion", "missing"]
    assert lines[1].split() == ["a", "0.900", "0.000", "lesion:", "not", "predicted"]
    assert lines[2].split()[:3] == ["b", "0.800", "n/a"] and lines[3].split() == ["c", "0.700", "0.600", "-"]
    # the lesion's mean over the two cases where it is defined (0 and 0.6), and how often it was missing
    assert lines[4].split() == ["mean", "0.800", "0.300", "lesion", "missing", "in", "2", "of", "3"]


def test_demo_config_learns_both_classes_in_a_short_run(tmp_path):
    """`configs/demo.yaml` for 12 of its 50 epochs on 12 phantoms: the liver and the lesion are both found."""
    import csv
    import os
    import subprocess
    import sys
    from pathlib import Path

    from seg.data.synthetic import write_dataset

    data = write_dataset(tmp_path / "synth", cases=12)  # the demo's size and spacing
    config = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    result = subprocess.run([sys.executable, "-m", "seg", "fit", "--config", str(config), "--data.root", str(data),
                             "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.max_epochs", "12",
                             "--logging", "csv", "--overlays.every_n_epochs", "0"],
                            capture_output=True, text=True, env=env, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(next((tmp_path / "run" / "csv").rglob("metrics.csv"))) as f:
        last = [row for row in csv.DictReader(f) if row.get("val/dice_mean")][-1]
    assert int(last["epoch"]) == 11  # the last epoch, validated though not on the every-5 schedule
    scores = {k: float(last[f"val/{k}"]) for k in ("dice_liver", "dice_lesion", "missing_lesion")}
    assert scores["dice_liver"] > LIVER_DICE and scores["dice_lesion"] > LESION_DICE, scores
    assert scores["missing_lesion"] == 0, scores  # predicted in every validation volume

