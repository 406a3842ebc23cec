"""`make demo`: synthetic scans -> `seg fit` -> `seg predict` on held-out scans -> where everything landed.

usage: python -m seg.demo [--output runs/demo] [--data data/synthetic/demo] [--config configs/demo.yaml]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from seg.cli import main as seg
from seg.data.layout import load_dataset, strip_nifti_suffix
from seg.data.synthetic import PHANTOM_VERSION
from seg.explain.export import dice_per_class, missing_classes


def held_out_table(scores: dict[str, dict[str, float]], missing: dict[str, dict[str, str]],
                   class_names: list[str]) -> list[str]:
    """The demo's held-out table: Dice per case and class, the missing classes, and the mean per class.

    Dice follows `seg.training.overlays.dice_per_class` (0 for a class missed or predicted where there is none,
    "n/a" when in neither); the mean is over the cases where it is defined.
    """
    lines = [f"  {'case':<14}" + "".join(f"{name:>10}" for name in class_names) + "  missing"]
    for case_id, dice in scores.items():
        why = "; ".join(f"{name}: {reason}" for name, reason in missing[case_id].items())
        lines.append(f"  {case_id:<14}" + "".join(f"{_dice(dice[n]):>10}" for n in class_names) + f"  {why or '-'}")
    defined = {n: [d[n] for d in scores.values() if not np.isnan(d[n])] for n in class_names}
    lines.append(f"  {'mean':<14}" + "".join(f"{_dice(np.mean(v) if v else np.nan):>10}" for v in defined.values())
                 + "".join(f"  {n} missing in {c} of {len(scores)}" for n in class_names
                           if (c := sum(n in m for m in missing.values()))))
    return lines


def _dice(value: float) -> str:
    return "n/a" if np.isnan(value) else f"{value:.3f}"


def _phantom_version(data: Path) -> int | None:
    try:
        return json.loads((data / "dataset.json").read_text())["generator"].get("phantom", 1)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


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

    if _phantom_version(args.data) != PHANTOM_VERSION:  # none yet, or made by an older seg
        step("1/3 synthetic data", ["synth", "--output", str(args.data), "--cases", "16", "--test-cases", "4"])
    step("2/3 training", ["fit", "--config", str(args.config), "--data.root", str(args.data),
                          "--trainer.default_root_dir", str(args.output)])
    best = args.output / "checkpoints" / "best.ckpt"
    predictions = args.output / "predictions"
    step("3/3 prediction on held-out scans", ["predict", "--checkpoint", str(best),
                                              "--input", str(args.data / "imagesTs"), "--output", str(predictions)])

    info = load_dataset(args.data)
    scores, missing = {}, {}
    for label_path in sorted((args.data / "labelsTs").glob("*.nii*")):
        case_id = strip_nifti_suffix(label_path.name)
        truth = np.asarray(nib.load(label_path).dataobj)
        prediction = np.asarray(nib.load(predictions / f"{case_id}.nii.gz").dataobj)
        scores[case_id] = dice_per_class(prediction, truth, info.class_names)
        missing[case_id] = missing_classes(prediction, truth, info.class_names)
    print("\nHeld-out Dice (scans the model never saw):")
    print("\n".join(held_out_table(scores, missing, info.class_names)))
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
