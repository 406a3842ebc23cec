"""nnU-Net v2 trained by its own recipe for a wall-clock budget, scored by `seg evaluate` on seg's held-out cases.

Issue 28: nnU-Net beside seg at the same CPU budget. For `--dataset acdc` (nnU-Net's 2d configuration) or
`--dataset hippocampus` (3d_fullres), one after the other:
  1. the split of seg's own benches with their default seed, imported from them: ACDC `bench/acdc.py`'s
     `make_split` (10 held-out patients, both volumes each), hippocampus `bench/hippocampus_accuracy.py`'s
     (40 held-out cases); the training part is converted to nnU-Net's raw layout (`bench/plan_vs_nnunet.py`'s
     `to_nnunet`);
  2. `nnUNetv2_plan_and_preprocess -c CONF -np 1 -npfp 1` (not timed against the budget);
  3. `nnUNetv2_train ID CONF all -tr nnUNetTrainer_WallClock -device cpu`: fold "all" (every training case),
     nnU-Net's recipe unchanged, stopped at the budget by `bench/nnunet_wallclock_trainer.py` (copied into the
     environment's `nnunetv2/training/nnUNetTrainer/`), which saves `checkpoint_<M>min.pth` at each budget.
     Several `--minutes` (e.g. `15 60`) are one training run, checkpointed at each budget and stopped at the last;
  4. per budget, `nnUNetv2_predict -f all -chk checkpoint_<M>min.pth -device cpu` with nnU-Net's default settings
     (mirroring test-time augmentation on) on the held-out images, timed, start-up included;
  5. `seg evaluate` of those label maps against the held-out labels: the code that scores seg's own predictions.
Prints one JSON document (also written to `--out/nnunet_budget.json`): per budget the epochs and iterations done,
Dice per class and their mean, prediction seconds. Run it on an otherwise idle machine: the budget is wall-clock.

Threads (a 2-core machine): `plan_vs_nnunet.nnunet_env` sets OMP_NUM_THREADS=1 and nnUNet_n_proc_DA=1 (one
augmentation worker process); `nnUNetv2_train` and `nnUNetv2_predict -device cpu` then set torch's threads to every
core themselves.

nnU-Net's environment (never seg's), torch first and pinned, so that nnunetv2's dependencies cannot replace it:
    python3 -m venv /work/nnunet-venv && /work/nnunet-venv/bin/pip install torch==2.13.0
    echo torch==2.13.0 > /tmp/torch.txt && /work/nnunet-venv/bin/pip install -c /tmp/torch.txt nnunetv2
Without the constraint pip takes the newest torchvision (timm needs it, dynamic-network-architectures needs timm)
and with it torch 2.14 and its CUDA libraries (GBs). With it pip installs torchvision 0.28.0, whose wheel is a CUDA
build that cannot load beside the CPU torch (`import torchvision` raises "operator torchvision::nms does not exist").
nnU-Net's U-Net trainers never import it; only its Primus trainers do (through timm), and nnU-Net imports those
while it looks a trainer up by name in `nnUNetTrainer/primus/` before `variants/`. Hence the bench puts its trainer
in `nnUNetTrainer/` itself, which nnU-Net searches first (tested with nnunetv2 2.8.1).

usage: python bench/nnunet_budget.py --dataset acdc|hippocampus --minutes 15 [60]
       [--nnunet-python /work/nnunet-venv/bin/python] [--data DIR] [--test-cases N] [--seed 0]
       [--work /tmp/nnunet_budget] [--out runs/nnunet_budget]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import acdc  # noqa: E402
import hippocampus_accuracy  # noqa: E402
from machine import cpu_name  # noqa: E402
from nnunet_predict_speed import timed  # noqa: E402
from plan_vs_nnunet import nnunet_env, run_nnunet, to_nnunet  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TRAINER = "nnUNetTrainer_WallClock"
TRAINER_FILE = Path(__file__).resolve().parent / "nnunet_wallclock_trainer.py"
WORK_FOLDERS = ("split", "raw", "preprocessed", "results", "held_out_scans")
# per dataset: nnU-Net dataset id (apart from plan_vs_nnunet's, which hold every case), configuration, held out
DATASETS = {
    "acdc": {"id": 915, "name": "ACDCBudget", "configuration": "2d", "test_cases": 10},
    "hippocampus": {"id": 911, "name": "HippocampusBudget", "configuration": "3d_fullres", "test_cases": 40},
}


def split(dataset: str, source: Path, out: Path, test_cases: int, seed: int) -> tuple[Path, list[str]]:
    """seg's bench split: a folder with the training cases in imagesTr and the held-out ones in imagesTs/labelsTs,
    and the held-out patients (ACDC) or cases (hippocampus)."""
    if dataset == "acdc":
        return acdc.make_split(source, out, test_patients=test_cases, seed=seed)
    train_dir, _ = hippocampus_accuracy.make_split(source, out, test_cases=test_cases, seed=seed)
    return train_dir, sorted(_case_id(p) for p in (train_dir / "imagesTs").iterdir())


def _case_id(path: Path) -> str:
    return path.name.removesuffix(".gz").removesuffix(".nii")


def scan_folder(images: Path, folder: Path) -> Path:
    """`folder` of symlinks `<case>_0000.nii.gz` (nnU-Net's name for channel 0) to every scan in `images`."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in sorted(images.iterdir()):
        (folder / f"{_case_id(path)}_0000.nii.gz").symlink_to(path.resolve())
    return folder


def install_trainer(python: str) -> Path:
    """Copy the wall-clock trainer where nnU-Net looks trainers up by name; the path it was copied to.

    nnU-Net imports the modules of `nnunetv2/training/nnUNetTrainer/` first and its subfolders after, alphabetically:
    in `variants/` the trainer would only be found after `primus/` is imported, which imports timm and so
    torchvision, whose only wheel for torch 2.13 here is a CUDA build that does not load beside the CPU torch.
    """
    where = subprocess.run([python, "-c", "import nnunetv2.training.nnUNetTrainer as t; print(t.__path__[0])"],
                           capture_output=True, text=True, check=True).stdout.strip()
    target = Path(where) / TRAINER_FILE.name
    shutil.copy(TRAINER_FILE, target)
    return target


def versions(python: str) -> dict:
    code = ("import importlib.metadata as m, json; "
            "print(json.dumps({p: m.version(p) for p in ('nnunetv2', 'torch', 'torchvision')}))")
    return json.loads(subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout)


def machine() -> str:
    """lscpu's model name and the number of cores."""
    return f"{cpu_name()}, {os.cpu_count()} cores"


def evaluate(predictions: Path, folder: Path, output: Path) -> dict:
    """`seg evaluate` of `predictions` against `folder/labelsTs`: Dice per class, their mean, cases scored."""
    done = subprocess.run([sys.executable, "-m", "seg", "evaluate", "-p", str(predictions), "-l",
                           str(folder / "labelsTs"), "--dataset", str(folder / "dataset.json"), "-o", str(output)],
                          capture_output=True, text=True, cwd=REPO)
    if not (output / "summary.json").exists():
        sys.exit(f"seg evaluate wrote no summary: {done.stderr.strip()}")
    summary = json.loads((output / "summary.json").read_text())
    return {"dice": {name: round(c["dice"]["mean"], 4) if c["dice"]["mean"] is not None else None
                     for name, c in summary["classes"].items()},
            "dice_mean": round(summary["mean"]["dice"], 4), "cases_scored": summary["cases"],
            "cases_failed": summary["failed"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, choices=list(DATASETS))
    parser.add_argument("--minutes", type=float, nargs="+", required=True,
                        help="budgets in minutes; several are one training run checkpointed at each")
    parser.add_argument("--nnunet-python", default="/work/nnunet-venv/bin/python")
    parser.add_argument("--data", type=Path, default=None, help="default ../shared/data/<dataset>")
    parser.add_argument("--test-cases", type=int, default=None,
                        help="held-out patients (acdc, default 10) or cases (hippocampus, default 40)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/nnunet_budget"),
                        help="the split and nnU-Net's raw, preprocessed and results folders (emptied first)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "nnunet_budget")
    args = parser.parse_args(argv)
    spec = DATASETS[args.dataset]
    data = args.data or SHARED / "data" / args.dataset
    test_cases = args.test_cases if args.test_cases is not None else spec["test_cases"]
    budgets = sorted(set(args.minutes))
    python, conf, dataset_id = args.nnunet_python, spec["configuration"], str(spec["id"])

    for sub in WORK_FOLDERS:  # an earlier run's cases, plans and checkpoints (nothing else in --work)
        shutil.rmtree(args.work / sub, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    folder, held_out = split(args.dataset, data, args.work / "split", test_cases, args.seed)
    raw = to_nnunet(folder, args.work / "raw", spec["id"], spec["name"])
    install_trainer(python)
    env = nnunet_env(args.work)

    start = time.perf_counter()
    run_nnunet(python, spec["id"], args.work, configuration=conf)
    preprocess_s = time.perf_counter() - start

    bin_ = Path(python).parent
    train_env = {**env, "SEG_NNUNET_BUDGET_MINUTES": ",".join(f"{m:g}" for m in budgets)}
    train_s = timed([str(bin_ / "nnUNetv2_train"), dataset_id, conf, "all", "-tr", TRAINER, "-device", "cpu"],
                    train_env, args.out / "train.log")
    model = args.work / "results" / raw.name / f"{TRAINER}__nnUNetPlans__{conf}"
    reached = json.loads((model / "fold_all" / "wallclock.json").read_text())

    scans = scan_folder(folder / "imagesTs", args.work / "held_out_scans")
    runs = []
    for budget in reached["budgets"]:
        minutes = f"{budget['minutes']:g}"
        predictions = args.out / f"predictions_{minutes}min"
        shutil.rmtree(predictions, ignore_errors=True)
        predict_s = timed([str(bin_ / "nnUNetv2_predict"), "-i", str(scans), "-o", str(predictions), "-d", dataset_id,
                           "-c", conf, "-f", "all", "-tr", TRAINER, "-chk", budget["checkpoint"], "-device", "cpu"],
                          env, args.out / f"predict_{minutes}min.log")
        scores = evaluate(predictions, folder, args.out / f"scores_{minutes}min")
        runs.append({"minutes": budget["minutes"], "epochs_completed": budget["epochs_completed"],
                     "iterations": budget["iterations"], "iterations_per_epoch": budget["iterations_per_epoch"],
                     "train_s_at_budget": budget["seconds"], **scores, "predict_s": round(predict_s, 1),
                     "predict_s_per_case": round(predict_s / len(list(scans.iterdir())), 2)})
    document = {
        "date": date.today().isoformat(), "machine": machine(), "dataset": args.dataset, "data": str(data),
        "configuration": conf, "trainer": f"{TRAINER} (nnUNetTrainer stopped at the budget)", **versions(python),
        "seed": args.seed, "held_out": held_out, "held_out_volumes": len(list(scans.iterdir())),
        "training_volumes": json.loads((raw / "dataset.json").read_text())["numTraining"],
        "preprocess_s": round(preprocess_s, 1), "train_wall_s": round(train_s, 1),
        "first_step_s": reached["first_step_s"], "runs": runs,
    }
    text = json.dumps(document, indent=1)
    (args.out / "nnunet_budget.json").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
