"""ACDC cine MR with nothing but `seg fit --data.root`: held-out Dice by patient, and where the time goes.

Splits the shared ACDC volumes by patient (seeded): TEST_PATIENTS patients (both of their volumes) go to
`imagesTs/labelsTs` of a training folder made of symlinks, the others to `imagesTr/labelsTr`. Then:
  1. `seg fit --data.root TRAIN --trainer.max_time MM` with no config: seg plans the dataset itself (`seg plan`,
     for that time budget), splits the training patients again for model selection, and trains; Lightning's
     simple profiler records where the time went;
  2. `seg test --ckpt_path best` scores the held-out patients' volumes (never seen, not used for selection);
  3. the network's own training step on the plan's batch shape, timed in this process, against the run's step
     rate: a ratio near 1 means the loader keeps up.
Prints one JSON document. Run it on an otherwise idle machine: it is time-bounded.

ACDC: Bernard et al., IEEE TMI 37(11):2514-2525, 2018; non-commercial research use (../shared/data/acdc/SOURCE.md).

usage: python bench/acdc.py [--minutes 15] [--test-patients 10] [--out runs/bench_acdc]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import date
from pathlib import Path

from seg.data.plan import max_time

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def make_split(source: Path, out: Path, test_patients: int, seed: int) -> tuple[Path, list[str]]:
    """A training folder of symlinks: the held-out patients' volumes in imagesTs/labelsTs, the rest in imagesTr."""
    meta = json.loads((source / "dataset.json").read_text())
    entries = sorted(meta["training"], key=lambda e: e["image"])
    patients = sorted({re.match(r"\./imagesTr/(patient\d+)_", e["image"]).group(1) for e in entries})
    held_out = set(random.Random(seed).sample(patients, test_patients))
    folder = out / "data"
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    train, test = [], []
    for entry in entries:
        patient = re.match(r"\./imagesTr/(patient\d+)_", entry["image"]).group(1)
        split = "Ts" if patient in held_out else "Tr"
        linked = {}
        for key, sub in (("image", f"images{split}"), ("label", f"labels{split}")):
            src = (source / entry[key]).resolve()
            dst = folder / sub / src.name
            if not dst.exists():
                dst.symlink_to(src)
            linked[key] = f"./{sub}/{src.name}"
        (test if split == "Ts" else train).append(linked)
    common = {k: meta[k] for k in ("name", "modality", "labels")}
    (folder / "dataset.json").write_text(json.dumps({**common, "training": train,
                                                      "test": [t["image"] for t in test]}, indent=1))
    return folder, sorted(held_out)


def profile_summary(path: Path) -> dict[str, float]:
    """Total seconds per action from Lightning's SimpleProfiler report (the `Action | Mean | Num | Total` table)."""
    totals = {}
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.split("|") if c.strip()]
        if len(cells) >= 4:
            try:
                totals[cells[0]] = float(cells[3])
            except ValueError:
                continue
    return totals


def network_step_seconds(config: dict, steps: int = 8) -> float:
    """Median forward + loss + backward + optimiser step of the planned network on the planned batch, random data."""
    import torch

    from seg.inference.checkpoint import build_network
    from monai.losses import DiceCELoss

    model, data = config["model"], config["data"]
    hparams = {"spatial_dims": data.get("spatial_dims", 3), "in_channels": 1, "out_channels": 4,
               "channels": model["channels"], "strides": model["strides"]}
    network = build_network(hparams).train()
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
    n = data["batch_size"] * data["samples_per_volume"]
    x = torch.randn(n, 1, *data["patch_size"])
    y = torch.randint(0, 4, (n, 1, *data["patch_size"]))
    times = []
    bf16 = str(config.get("trainer", {}).get("precision")).startswith("bf16")
    for i in range(steps + 2):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = network(x)
        loss = loss_fn(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def fit_and_test(data: Path, run: Path, minutes: float, fit_args: Sequence[str] = (),
                 plan_args: str | None = None) -> dict:
    """`seg fit --data.root DATA` for `minutes` into `run` (Lightning's simple profiler on), then `seg test
    --ckpt_path best` on DATA's held-out volumes (imagesTs); `fit_args` go to both. With `plan_args`, plan first
    (`seg plan DATA --minutes M PLAN_ARGS`) and train on that plan instead of the one `seg fit` makes.

    Returns the config the run used, `fit_wall_s`, `steps`, `test_dice` per class, `test_dice_mean` and the
    profiler's seconds per action (`profile`). The runs' output goes to `run`/fit.log and test.log.
    """
    import yaml

    common = ["--trainer.default_root_dir", str(run), "--logging", "csv"]
    planned = []
    run.mkdir(parents=True, exist_ok=True)
    if plan_args is not None:
        subprocess.run([sys.executable, "-m", "seg", "plan", str(data), "--minutes", f"{minutes:g}",
                        "--output", str(run / "plan.yaml"), *plan_args.split()], check=True, cwd=REPO,
                       stdout=subprocess.DEVNULL)
        planned = ["--config", str(run / "plan.yaml")]
    start = time.time()
    fit = subprocess.run([sys.executable, "-m", "seg", "fit", *planned, "--data.root", str(data), *common, *fit_args,
                          "--trainer.max_time", max_time(minutes),
                          "--trainer.profiler", "simple", "--trainer.enable_progress_bar", "false"],
                         capture_output=True, text=True, cwd=REPO)
    fit_s = time.time() - start
    (run / "fit.log").write_text(fit.stdout + fit.stderr)
    if fit.returncode != 0:
        raise SystemExit(f"seg fit failed; see {run / 'fit.log'}")
    config = yaml.safe_load((run / "plan.yaml").read_text())
    saved = sorted((run / "csv").glob("version_*/config.yaml"))  # what the run used: the plan and every override
    if saved:
        config = yaml.safe_load(saved[0].read_text())
    test = subprocess.run([sys.executable, "-m", "seg", "test", "--config", str(run / "plan.yaml"), "--data.root",
                           str(data), *common, *fit_args, "--ckpt_path", "best"], capture_output=True, text=True,
                          cwd=REPO)
    (run / "test.log").write_text(test.stdout + test.stderr)
    if test.returncode != 0:
        raise SystemExit(f"seg test failed; see {run / 'test.log'}")
    metrics = sorted((run / "csv").glob("version_*/metrics.csv"))
    with open(metrics[-1]) as f:
        row = [r for r in csv.DictReader(f) if r.get("test/dice_mean")][-1]
    with open(metrics[0]) as f:
        steps = max(int(r["step"]) for r in csv.DictReader(f) if r.get("step"))
    classes = [k.split("test/dice_", 1)[1] for k in row if k.startswith("test/dice_") and k != "test/dice_mean"]
    # Lightning's profiler writes its report at the end of fit to the log: parse it from there
    return {"config": config, "fit_wall_s": round(fit_s, 1), "steps": steps,
            "test_dice": {c: round(float(row[f"test/dice_{c}"]), 4) for c in classes},
            "test_dice_mean": round(float(row["test/dice_mean"]), 4), "profile": profile_summary(run / "fit.log")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=15.0)
    parser.add_argument("--test-patients", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=SHARED / "data" / "acdc")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_acdc")
    parser.add_argument("--plan-args", default=None,
                        help="trials: plan with `seg plan TRAIN --minutes M PLAN_ARGS` (e.g. '--dims 2d') and train on "
                             "that plan, instead of the plain `seg fit --data.root` a user runs")
    parser.add_argument("--fit-args", default="", help="trials: more `seg fit` options, e.g. '--data.patch_size [128,128]'")
    args = parser.parse_args()
    data, held_out = make_split(args.data, args.out, args.test_patients, args.seed)
    result = fit_and_test(data, args.out / "run", args.minutes, args.fit_args.split(), args.plan_args)
    config, totals, steps = result["config"], result["profile"], result["steps"]
    step_s = network_step_seconds(config)
    train_s = totals.get("run_training_epoch", float("nan"))
    print(json.dumps({
        "date": date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "minutes": args.minutes, "held_out_patients": held_out, "plan_args": args.plan_args,
        "fit_args": args.fit_args, "precision": config.get("trainer", {}).get("precision", "32-true"),
        "plan": {k: config["model"].get(k) for k in ("channels", "strides")} | {
            k: config["data"].get(k) for k in ("spatial_dims", "spacing", "patch_size", "batch_size",
                                               "samples_per_volume")},
        "fit_wall_s": result["fit_wall_s"], "steps": steps,
        "test_dice": result["test_dice"], "test_dice_mean": result["test_dice_mean"],
        "time_s": {k: round(v, 1) for k, v in totals.items() if k in (
            "run_training_epoch", "run_training_batch", "[_TrainingEpochLoop].train_dataloader_next",
            "[_EvaluationLoop].val_next", "[Strategy]SingleDeviceStrategy.validation_step", "setup",
            "[LightningDataModule]NiftiDataModule.setup", "[LightningDataModule]NiftiDataModule.prepare_data",
            "[Callback]GateOverlays.on_validation_batch_end", "[Callback]LastCheckpoint.on_train_epoch_end")},
        "network_step_s": round(step_s, 3),
        "run_step_s": round(train_s / max(steps, 1), 3),
        "loader_keeps_up_ratio": round(step_s / (train_s / max(steps, 1)), 3) if steps else None,
    }, indent=1))


if __name__ == "__main__":
    main()
