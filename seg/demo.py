"""`make demo`: synthetic scans -> `seg fit` -> `seg predict` on held-out scans -> where everything landed.

usage: python -m seg.demo [--output runs/demo] [--data data/synthetic/demo] [--config configs/demo.yaml]
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from seg.cli import main as seg
from seg.data.layout import load_dataset, strip_nifti_suffix


def dice_per_class(prediction: np.ndarray, truth: np.ndarray, num_classes: int) -> list[float]:
    scores = []
    for c in range(1, num_classes):
        p, t = prediction == c, truth == c
        denominator = p.sum() + t.sum()
        scores.append(float(2 * (p & t).sum() / denominator) if denominator else float("nan"))
    return scores


def step(title: str, argv: list[str]) -> None:
    print(f"\n== {title}: seg {' '.join(argv)}", flush=True)
    start = time.time()
    code = seg(argv)
    if code:
        sys.exit(f"demo: `seg {argv[0]}` failed with exit code {code}")
    print(f"== {title}: done in {time.time() - start:.0f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("runs/demo"), help="run folder (default runs/demo)")
    parser.add_argument("--data", type=Path, default=Path("data/synthetic/demo"), help="synthetic dataset folder")
    parser.add_argument("--config", type=Path, default=Path("configs/demo.yaml"))
    args = parser.parse_args()

    if not (args.data / "dataset.json").exists():
        step("1/3 synthetic data", ["synth", "--output", str(args.data), "--cases", "16", "--test-cases", "4"])
    step("2/3 training", ["fit", "--config", str(args.config), "--data.root", str(args.data),
                          "--trainer.default_root_dir", str(args.output)])
    best = args.output / "checkpoints" / "best.ckpt"
    predictions = args.output / "predictions"
    step("3/3 prediction on held-out scans", ["predict", "--checkpoint", str(best),
                                              "--input", str(args.data / "imagesTs"), "--output", str(predictions)])

    info = load_dataset(args.data)
    print("\nHeld-out Dice (scans the model never saw):")
    print(f"  {'case':<14}" + "".join(f"{name:>10}" for name in info.class_names))
    for label_path in sorted((args.data / "labelsTs").glob("*.nii*")):
        case_id = strip_nifti_suffix(label_path.name)
        truth = np.asarray(nib.load(label_path).dataobj)
        prediction = np.asarray(nib.load(predictions / f"{case_id}.nii.gz").dataobj)
        scores = dice_per_class(prediction, truth, info.num_classes)
        print(f"  {case_id:<14}" + "".join(f"{s:>10.3f}" for s in scores))
    with open(predictions / "summary.csv") as f:
        failed = [row for row in csv.DictReader(f) if row.get("status") != "ok"]
    if failed:
        sys.exit(f"demo: {len(failed)} scan(s) failed to predict, see {predictions / 'summary.csv'}")

    wandb_runs = sorted((args.output / "wandb").glob("offline-run-*")) + sorted((args.output / "wandb").glob("run-*"))
    print(f"\nCheckpoint:   {best}")
    print(f"Predictions:  {predictions}/ (label maps in each scan's own geometry, summary.csv)")
    print(f"Overlays:     {args.output / 'overlays'}/ (gate maps and PNGs per validation volume and epoch)")
    if wandb_runs:
        print(f"W&B run:      {wandb_runs[-1]}  (offline runs upload with `wandb sync {wandb_runs[-1]}`)")


if __name__ == "__main__":
    main()
