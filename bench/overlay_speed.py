"""`seg overlays` against `seg predict` on the same CT-like scan: wall time of each command, and their ratio.

The issue's case: a CT of 122 x 101 x 30 voxels where `seg overlays` took 58 s and `seg predict` 10-13 s. This
writes a synthetic CT (`seg synth --modality CT`: HU, air at -1000) and a checkpoint of an untrained network with
the hippocampus plan's architecture (channels 16-32-64-128, window 40 x 56 x 40; timings do not depend on the
weights), then runs both commands as a user does (`python -m seg ...`, start-up included), alternating for
`--repeats` rounds, and prints the best of each and `overlays / predict` (the target: at most 2), in wall time
and in CPU time (the steadier one on a shared machine).

usage: python bench/overlay_speed.py [--size 122 101 30] [--spacing 1.5 1.5 3] [--model-spacing 1 1 1]
                                     [--model-modality MRI] [--repeats 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from seg.data.synthetic import write_dataset
from seg.inference.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_KEY, build_network


def write_checkpoint(path: Path, spacing: list[float], modality: str, channels: list[int],
                     roi: list[int]) -> Path:
    """A `seg fit`-shaped checkpoint of an untrained network: what `load_trained_model` reads."""
    hparams = {"spatial_dims": 3, "in_channels": 1, "out_channels": 3, "channels": channels,
               "strides": [2] * (len(channels) - 1), "roi_size": roi, "sw_batch_size": 4, "sw_overlap": 0.5,
               "class_names": ["liver", "lesion"]}
    scheme = ({"scheme": "ct", "clip": [-160.0, 240.0], "mean": 60.0, "std": 50.0} if modality == "CT"
              else {"scheme": "zscore", "nonzero": True})
    preprocessing = {"version": 1, "spatial_dims": 3, "orientation": "RAS", "spacing": spacing,
                     "normalization": [scheme], "modalities": [modality], "in_channels": 1, "num_classes": 3,
                     "labels": {"0": "background", "1": "liver", "2": "lesion"}, "class_names": ["liver", "lesion"],
                     "patch_size": roi, "crop_foreground": True,
                     "crop_threshold": [-500.0 if modality == "CT" else None]}
    torch.manual_seed(0)
    state = {f"model.{k}": v for k, v in build_network(hparams).state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": hparams,
                CHECKPOINT_KEY: {"format": CHECKPOINT_FORMAT, "preprocessing": preprocessing}}, path)
    return path


def timed(command: list[str], env: dict) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + system) of the command: on a shared machine the CPU time is the
    steadier measure of the work done, the wall time what a user waits."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return seconds, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, nargs=3, default=[122, 101, 30])
    parser.add_argument("--spacing", type=float, nargs=3, default=[1.5, 1.5, 3.0])
    parser.add_argument("--model-spacing", type=float, nargs=3, default=[1.5, 1.5, 3.0])
    parser.add_argument("--model-modality", choices=("CT", "MRI"), default="CT")
    parser.add_argument("--channels", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--roi", type=int, nargs=3, default=[40, 56, 40])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "WANDB_MODE": "disabled"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = write_dataset(tmp / "ct", cases=1, size=args.size, spacing=args.spacing, modality="CT", seed=7)
        scan = data / "imagesTr" / "synth_000.nii.gz"
        checkpoint = write_checkpoint(tmp / "model.ckpt", args.model_spacing, args.model_modality, args.channels,
                                      args.roi)
        seg = [sys.executable, "-m", "seg"]
        common = ["--checkpoint", str(checkpoint), "--input", str(scan), "--device", "cpu"]
        times = {"predict": [], "overlays": []}
        for round_ in range(args.repeats):
            times["predict"].append(timed([*seg, "predict", *common, "--output", str(tmp / f"p{round_}")], env))
            times["overlays"].append(timed([*seg, "overlays", *common, "--output", str(tmp / f"o{round_}")], env))
            print(f"round {round_}: " + ", ".join(f"{k} {v[-1][0]:.1f} s (CPU {v[-1][1]:.1f} s)"
                                                  for k, v in times.items()), flush=True)
    wall = {k: min(t[0] for t in v) for k, v in times.items()}
    cpu = {k: min(t[1] for t in v) for k, v in times.items()}
    print(f"scan {' x '.join(map(str, args.size))} at {' x '.join(f'{s:g}' for s in args.spacing)} mm, "
          f"{args.model_modality} model at {' x '.join(f'{s:g}' for s in args.model_spacing)} mm, "
          f"{args.threads} threads: seg predict {wall['predict']:.1f} s (CPU {cpu['predict']:.1f} s), "
          f"seg overlays {wall['overlays']:.1f} s (CPU {cpu['overlays']:.1f} s); overlays / predict: "
          f"{wall['overlays'] / wall['predict']:.2f} wall, {cpu['overlays'] / cpu['predict']:.2f} CPU")

if __name__ == "__main__":
    main()
