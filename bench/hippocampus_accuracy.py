"""Held-out Dice on MSD Hippocampus after a fixed CPU training budget: seg against MONAI's own recipe.

Splits the shared hippocampus cases (seeded) into a training folder and a held-out test folder, both in MSD
layout with symlinks to the original files. Then, one after the other on the same machine:
  1. the MONAI reference (../shared/bench/monai_reference_hippocampus.py) trains on the training folder for
     MINUTES and scores the held-out cases;
  2. `seg fit --config configs/hippocampus.yaml --trainer.max_time 00:00:MM:00` trains on the training folder
     (holding out 10 % of it for model selection), and `seg test --ckpt_path best` scores the same held-out cases;
  3. with `--methods ...,plan`: the same with the config `seg plan TRAIN --minutes MM` derives from the data
     instead of the hand-tuned one.
Prints one JSON line per method. Run it on an otherwise idle machine: both are time-bounded. With --parallel the
two run at the same time, one thread and no loader worker each, so that whatever else loads the machine slows
both alike (a fair comparison on a shared machine, slower than each alone on two cores).

usage: python bench/hippocampus_accuracy.py [--minutes 10] [--test-cases 40] [--methods monai,seg,plan] [--parallel]
       [--out runs/bench_hippocampus]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from seg.data.plan import max_time

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def make_split(source: Path, out: Path, test_cases: int, seed: int) -> tuple[Path, Path]:
    meta = json.loads((source / "dataset.json").read_text())
    entries = sorted(meta["training"], key=lambda e: e["image"])
    random.Random(seed).shuffle(entries)
    test, train = entries[:test_cases], entries[test_cases:]
    train_dir, test_dir = out / "train", out / "test"
    for folder in (train_dir, test_dir):
        for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
            (folder / sub).mkdir(parents=True, exist_ok=True)

    def link(entry: dict, folder: Path, images: str, labels: str) -> dict:
        linked = {}
        for key, sub in (("image", images), ("label", labels)):
            src = (source / entry[key]).resolve()
            dst = folder / sub / src.name
            if not dst.exists():
                dst.symlink_to(src)
            linked[key] = f"./{sub}/{src.name}"
        return linked

    common = {k: meta[k] for k in ("name", "modality", "labels")}
    # seg: trains on imagesTr, `seg test` scores imagesTs/labelsTs. MONAI's script reads "training" entries.
    train_meta = {**common, "training": [link(e, train_dir, "imagesTr", "labelsTr") for e in train],
                  "test": [link(e, train_dir, "imagesTs", "labelsTs")["image"] for e in test]}
    test_meta = {**common, "training": [link(e, test_dir, "imagesTr", "labelsTr") for e in test]}
    (train_dir / "dataset.json").write_text(json.dumps(train_meta, indent=1))
    (test_dir / "dataset.json").write_text(json.dumps(test_meta, indent=1))
    return train_dir, test_dir


def run_monai(train_dir: Path, test_dir: Path, minutes: float, threads: int = 2, kind: str = "attention",
              seed: int | None = None) -> dict:
    """The MONAI reference script (`kind`: attention for AttentionUnet, unet for UNet), unchanged.

    The script seeds torch with 0 itself; another `seed` is given by running it under `runpy` with
    `torch.manual_seed` bound to that seed (initial weights and loader order change, nothing else)."""
    script = SHARED / "bench" / "monai_reference_hippocampus.py"
    args = [str(script), str(train_dir), str(test_dir), str(minutes), kind]
    command = [sys.executable, *args]
    if seed:
        command = [sys.executable, "-c", "import runpy, sys, torch; seed = torch.manual_seed; "
                   f"torch.manual_seed = lambda _: seed({int(seed)}); sys.argv = sys.argv[1:]; "
                   "runpy.run_path(sys.argv[0], run_name='__main__')", *args]
    start = time.time()
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "THREADS": str(threads)},
                            check=True)
    scores = json.loads(result.stdout.strip().splitlines()[-1])
    return {"method": "monai_reference" if kind == "attention" else f"monai_{kind}",
            "wall_s": round(time.time() - start, 1), **scores}


def plan_config(train_dir: Path, minutes: float, config: Path) -> Path:
    """Write the config `seg plan TRAIN --minutes MM` derives from the training folder; return its path."""
    subprocess.run([sys.executable, "-m", "seg", "plan", str(train_dir), "--minutes", f"{minutes:g}",
                    "--output", str(config)], check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return config


def run_seg(train_dir: Path, out: Path, minutes: float, threads: int | None = None, plan: bool = False,
            extra_args: tuple[str, ...] = (), name: str | None = None) -> dict:
    """`seg fit` for `minutes` then `seg test --ckpt_path best` on the held-out cases; `extra_args` go to both."""
    run_dir = out / (name or ("plan_run" if plan else "seg_run"))
    config = REPO / "configs" / "hippocampus.yaml"
    if plan:  # the config `seg plan` derives from the training folder, for the same time budget
        config = plan_config(train_dir, minutes, out / "plan.yaml")
    common = ["--config", str(config), "--data.root", str(train_dir),
              "--trainer.default_root_dir", str(run_dir), "--logging", "csv", *extra_args]
    env = dict(os.environ)
    extra = []
    if threads is not None:  # the --parallel mode: one thread, augmentation in the training process like MONAI's
        env["OMP_NUM_THREADS"] = str(threads)
        extra = ["--data.num_workers", "0"]
    start = time.time()
    subprocess.run([sys.executable, "-m", "seg", "fit", *common, *extra, "--trainer.max_time", max_time(minutes)],
                   check=True, cwd=REPO, env=env, stdout=subprocess.DEVNULL)
    fit_s = time.time() - start
    best = "best" if (run_dir / "checkpoints" / "best.ckpt").exists() else "last"  # no validation yet: last
    subprocess.run([sys.executable, "-m", "seg", "test", *common, *extra, "--ckpt_path", best],
                   capture_output=True, text=True, check=True, cwd=REPO, env=env)
    metrics = sorted((run_dir / "csv").glob("version_*/metrics.csv"))[-1]
    with open(metrics) as f:
        row = [r for r in csv.DictReader(f) if r.get("test/dice_mean")][-1]
    with open(sorted((run_dir / "csv").glob("version_*/metrics.csv"))[0]) as f:
        steps = max(int(r["step"]) for r in csv.DictReader(f) if r.get("step"))
    return {"method": name or ("seg_plan" if plan else "seg"), "fit_wall_s": round(fit_s, 1), "steps": steps,
            "run_dir": str(run_dir),
            "dice_anterior": round(float(row["test/dice_Anterior"]), 4),
            "dice_posterior": round(float(row["test/dice_Posterior"]), 4),
            "dice_mean": round(float(row["test/dice_mean"]), 4),
            "hd95_mean_mm": round(float(row["test/hd95_mean"]), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--test-cases", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=SHARED / "data" / "hippocampus")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_hippocampus")
    parser.add_argument("--methods", default="monai,seg",
                        help="comma-separated: monai (the reference), seg (configs/hippocampus.yaml), plan (seg plan)")
    parser.add_argument("--parallel", action="store_true", help="run both at once, one thread each")
    parser.add_argument("--seg-args", default="", help="extra `seg fit/test` arguments for seg and plan, e.g. "
                        "'--trainer.precision 32-true' (the run folders then take a suffix from --tag)")
    parser.add_argument("--tag", default="", help="suffix of the run folders and method names")
    args = parser.parse_args()
    extra_args = tuple(args.seg_args.split())
    train_dir, test_dir = make_split(args.data, args.out, args.test_cases, args.seed)
    if args.parallel:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(2) as pool:
            monai = pool.submit(run_monai, train_dir, test_dir, args.minutes, 1)
            ours = pool.submit(run_seg, train_dir, args.out, args.minutes, 1)
            print(json.dumps({**monai.result(), "threads": 1, "parallel": True}), flush=True)
            print(json.dumps({**ours.result(), "threads": 1, "parallel": True}), flush=True)
        return
    methods = args.methods.split(",")
    if "monai" in methods:
        print(json.dumps(run_monai(train_dir, test_dir, args.minutes)), flush=True)
    if "seg" in methods:
        print(json.dumps(run_seg(train_dir, args.out, args.minutes, extra_args=extra_args,
                                 name=f"seg{args.tag}" if args.tag else None)), flush=True)
    if "plan" in methods:
        print(json.dumps(run_seg(train_dir, args.out, args.minutes, plan=True, extra_args=extra_args,
                                 name=f"seg_plan{args.tag}" if args.tag else None)), flush=True)


if __name__ == "__main__":
    main()
