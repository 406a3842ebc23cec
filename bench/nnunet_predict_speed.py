"""`seg predict` against nnU-Net's own `nnUNetv2_predict` on the same folder, timed in one invocation.

nnU-Net predicts with a trained model folder. How long it takes does not depend on the weights, so the bench
makes one from nnU-Net's own plans for the training cases: it converts them to nnU-Net's raw layout
(`bench/plan_vs_nnunet.py`'s `to_nnunet`), runs nnU-Net's fingerprint and planning (no preprocessing), builds
nnU-Net's 3d_fullres network from those plans in nnU-Net's environment, and saves its freshly initialised weights
as fold 0's `checkpoint_final.pth`. (Its label maps are therefore meaningless: only the time is compared.)

Then, for `--repeats` rounds, it alternates the two whole commands as a user runs them, start-up included, on
one folder of the first `--cases` scans named `<case>_0000.nii.gz` (nnU-Net's convention, which seg reads too):

    nnUNetv2_predict -i IN -o OUT -d ID -c 3d_fullres -f 0 -device cpu --disable_tta
    seg predict -c CKPT -i IN -o OUT

Both get the same environment (OMP/MKL threads = --threads). Prints one JSON document: every round's seconds
and the ratio of the best rounds. nnU-Net lives in its own environment (`--nnunet-python`), never in seg's.

usage: python bench/nnunet_predict_speed.py --checkpoint CKPT [--data ../shared/data/hippocampus] [--cases 48]
       [--repeats 2] [--nnunet-python /work/nnunet-venv/bin/python] [--work /tmp/nnunet_predict_speed]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plan_vs_nnunet import nnunet_env, run_nnunet, to_nnunet  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DATASET_ID = 904

# Run in nnU-Net's python: its 3d_fullres network from the plans, saved as an untrained fold-0 checkpoint.
MAKE_CHECKPOINT = """
import inspect, json, sys, torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
plans_file, dataset_file, out = sys.argv[1:4]
plans, dataset = json.load(open(plans_file)), json.load(open(dataset_file))
pm = PlansManager(plans)
cm = pm.get_configuration("3d_fullres")
n_in, n_out = determine_num_input_channels(pm, cm, dataset), pm.get_label_manager(dataset).num_segmentation_heads
if "plans_manager" in inspect.signature(nnUNetTrainer.build_network_architecture).parameters:
    net = nnUNetTrainer.build_network_architecture(pm, cm, n_in, n_out, enable_deep_supervision=False)
else:
    net = nnUNetTrainer.build_network_architecture(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                                   cm.network_arch_init_kwargs_req_import, n_in, n_out, False)
torch.save({"network_weights": net.state_dict(), "init_args": {"configuration": "3d_fullres"},
            "trainer_name": "nnUNetTrainer", "inference_allowed_mirroring_axes": (0, 1, 2)}, out)
print(sum(p.numel() for p in net.parameters()))
"""


def make_model_folder(python: str, data: Path, work: Path) -> tuple[Path, int]:
    """nnU-Net's results folder for dataset DATASET_ID with an untrained fold 0; the network's parameter count."""
    raw = to_nnunet(data, work / "raw", DATASET_ID, "SegSpeed")
    plans = run_nnunet(python, DATASET_ID, work, preprocess=False)
    model = work / "results" / raw.name / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    (model / "fold_0").mkdir(parents=True, exist_ok=True)
    shutil.copy(plans, model / "plans.json")
    shutil.copy(plans.parent / "dataset.json", model / "dataset.json")
    done = subprocess.run([python, "-c", MAKE_CHECKPOINT, str(model / "plans.json"), str(model / "dataset.json"),
                           str(model / "fold_0" / "checkpoint_final.pth")], capture_output=True, text=True,
                          env=nnunet_env(work), check=True)
    return model, int(done.stdout.strip().splitlines()[-1])


def timed(command: list[str], env: dict, log: Path) -> float:
    start = time.perf_counter()
    with open(log, "w") as f:
        done = subprocess.run(command, env=env, stdout=f, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"{command[0]} failed (exit {done.returncode}); see {log}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a seg checkpoint (e.g. a trained hippocampus best.ckpt)")
    parser.add_argument("--data", type=Path, default=SHARED / "data" / "hippocampus")
    parser.add_argument("--cases", type=int, default=48, help="the first N scans of imagesTr")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--nnunet-python", default="/work/nnunet-venv/bin/python")
    parser.add_argument("--work", type=Path, default=Path("/tmp/nnunet_predict_speed"))
    args = parser.parse_args()

    shutil.rmtree(args.work, ignore_errors=True)
    model, parameters = make_model_folder(args.nnunet_python, args.data, args.work)
    scans = args.work / "scans"
    scans.mkdir()
    images = sorted(p for p in (args.data / "imagesTr").iterdir() if p.name.endswith((".nii", ".nii.gz")))
    for path in images[: args.cases]:
        name = path.name.removesuffix(".gz").removesuffix(".nii")
        (scans / f"{name}_0000.nii.gz").symlink_to(path.resolve())

    threads = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    nnunet = [str(Path(args.nnunet_python).parent / "nnUNetv2_predict"), "-i", str(scans), "-d", str(DATASET_ID),
              "-c", "3d_fullres", "-f", "0", "-device", "cpu", "--disable_tta"]
    seg = [sys.executable, "-m", "seg", "predict", "-c", args.checkpoint, "-i", str(scans)]
    rounds = {"nnunet": [], "seg": []}
    for round_ in range(args.repeats):
        for method, command, env in (("nnunet", nnunet, {**nnunet_env(args.work), **threads}),
                                     ("seg", seg, {**os.environ, **threads})):
            out = args.work / f"{method}_{round_}"
            seconds = timed([*command, "-o", str(out)], env, args.work / f"{method}_{round_}.log")
            written = len([p for p in out.iterdir() if p.name.endswith(".nii.gz")])
            if written != args.cases:
                sys.exit(f"{method} wrote {written} label maps for {args.cases} scans; see {out}")
            rounds[method].append(round(seconds, 2))
            print(f"round {round_} {method}: {seconds:.1f} s for {written} scans", file=sys.stderr)
    best = {m: min(v) for m, v in rounds.items()}
    print(json.dumps({
        "date": date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "cases": args.cases, "threads": args.threads, "seg_checkpoint": args.checkpoint,
        "nnunet_3d_fullres_parameters": parameters, "seconds_start_up_included": rounds,
        "scans_per_second_best": {m: round(args.cases / s, 2) for m, s in best.items()},
        "seg_throughput_over_nnunet": round(best["nnunet"] / best["seg"], 2),
    }, indent=1))


if __name__ == "__main__":
    main()
