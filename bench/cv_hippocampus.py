"""Hippocampus, 5 folds on a short CPU budget each: one fold vs the 5-fold ensemble vs ensemble + postprocessing.

Splits the shared hippocampus cases (seeded, as `bench/hippocampus_accuracy.py`) into a training folder and held-out
cases that no fold trains on (`imagesTs`/`labelsTs` of the training folder, symlinks to the originals). Then:
  1. `seg cv --config configs/hippocampus.yaml --folds 5 -- --data.root TRAIN --trainer.max_time 00:00:MM:00`
     (out-of-fold scores and the postprocessing choice in OUT/cv/cv/); with `--plan`, the config is the one
     `seg plan TRAIN --minutes MM` derives for one fold's budget (the default command's recipe), so that 5 folds of
     MM minutes can be set against one model of 5 x MM minutes from `bench/hippocampus_accuracy.py --methods plan`;
  2. `seg predict` of the held-out scans with fold 0's best.ckpt, with the five best.ckpt files (the ensemble) and
     with `--checkpoint OUT/cv` (the ensemble + cv/postprocessing.json);
  3. `seg evaluate` of each against the held-out labels.
Prints one JSON line per method: Dice per class and their mean, HD95, and the prediction time per scan (the
`seconds` of predict's summary.csv: load + predict + write). `seg cv` resumes, so an interrupted run can be started
again with the same options. Run it on an otherwise idle machine: the folds are time-bounded.

usage: python bench/cv_hippocampus.py [--minutes 4] [--plan] [--seg-args "..."] [--test-cases 40]
                                     [--out runs/bench_cv_hippocampus]
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from hippocampus_accuracy import SHARED, make_split, plan_config  # noqa: E402

from seg.data.plan import max_time  # noqa: E402


def seg(*args) -> None:
    subprocess.run([sys.executable, "-m", "seg", *map(str, args)], check=True, cwd=REPO)


def score(name: str, checkpoints: list, scans: Path, labels: Path, dataset: Path, out: Path) -> dict:
    predictions = out / f"pred_{name}"
    start = time.time()
    seg("predict", "--checkpoint", *checkpoints, "--input", scans, "--output", predictions)
    wall = time.time() - start
    subprocess.run([sys.executable, "-m", "seg", "evaluate", "--predictions", predictions, "--labels", labels,
                    "--dataset", dataset], check=False, cwd=REPO)
    summary = json.loads((predictions / "summary.json").read_text())
    with open(predictions / "summary.csv") as f:
        seconds = [float(r["seconds"]) for r in csv.DictReader(f) if r["status"] == "ok"]
    row = {"method": name, "cases": summary["cases"], "predict_wall_s": round(wall, 1),
           "seconds_per_scan": round(sum(seconds) / len(seconds), 3)}
    for cls, s in summary["classes"].items():
        row[f"dice_{cls}"] = s["dice"]["mean"] and round(s["dice"]["mean"], 4)
        row[f"hd95_{cls}_mm"] = s["hd95"]["mean"] and round(s["hd95"]["mean"], 2)
    row["dice_mean"] = summary["mean"]["dice"] and round(summary["mean"]["dice"], 4)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=4.0, help="training budget per fold")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--plan", action="store_true",
                        help="train every fold with the config `seg plan` derives for --minutes (default: "
                             "configs/hippocampus.yaml)")
    parser.add_argument("--seg-args", default="", help="extra `seg fit` arguments for every fold, e.g. "
                        "'--data.flip_axes [0,1,2]'")
    parser.add_argument("--test-cases", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=SHARED / "data" / "hippocampus")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_cv_hippocampus")
    args = parser.parse_args()
    train_dir, _ = make_split(args.data, args.out, args.test_cases, args.seed)
    cv = args.out / "cv"
    config = (plan_config(train_dir, args.minutes, args.out / "plan.yaml") if args.plan
              else REPO / "configs" / "hippocampus.yaml")
    seg("cv", "--config", config, "--folds", args.folds, "--output", cv, "--", "--data.root", train_dir,
        "--trainer.max_time", max_time(args.minutes), "--logging", "csv", *args.seg_args.split())
    oof = json.loads((cv / "cv" / "summary.json").read_text())
    print(json.dumps({"method": "out_of_fold", "cases": oof["cases"], "dice_mean": oof["mean"]["dice"],
                      **{f"dice_{c}": s["dice"]["mean"] for c, s in oof["classes"].items()},
                      "postprocessing": {v["name"]: v["step"] for v in
                                         json.loads((cv / "cv" / "postprocessing.json").read_text())["classes"]
                                         .values()}}), flush=True)
    scans, labels, dataset = train_dir / "imagesTs", train_dir / "labelsTs", train_dir / "dataset.json"
    folds = [cv / f"fold_{k}" / "checkpoints" / "best.ckpt" for k in range(args.folds)]
    for name, checkpoints in (("fold_0", folds[:1]), ("ensemble", folds), ("ensemble_postprocessed", [cv])):
        row = score(name, checkpoints, scans, labels, dataset, args.out)
        # the training minutes behind the prediction, for bench/learning_curves.py: one fold's, or all the folds'
        print(json.dumps({**row, "minutes": args.minutes * (1 if name == "fold_0" else args.folds)}), flush=True)


if __name__ == "__main__":
    main()
