"""Peak memory of validation and `seg predict` on one CT-sized volume (512 x 512 x 400 float32) on the CPU.

Makes a two-case CT-like dataset (the big scan for validation, a small one so there is a training case) and a
tiny untrained checkpoint with the dataset's own preprocessing (native spacing: no resampling shrinks the
volume), then runs, each in a fresh process whose peak RSS (`ru_maxrss`, children included) it reports:
- validate: `seg validate` of the checkpoint on the big scan: dataset check, preprocessing, sliding-window
  inference, per-class Dice and HD95 (overlays off);
- predict: `seg predict` of the same scan with the checkpoint: preprocessing, sliding window, inversion to the
  scan's grid, the written label.
The untrained network segments speckle, the worst case for HD95 (surface voxels everywhere: its distances make
the validation peak; `--no-hd95` measures without them). The network (channels 4-8-16, a 96^3 window, one
window per pass) and the window overlap (0) set the run time, not the memory: the full-volume tensors do.

    python bench/big_volume.py [--workdir /tmp/seg-big-volume] [--size 512 512 400] [--no-hd95] [--only validate]
Prints one JSON object. About 15 minutes on 2 CPU cores, most of it HD95 on speckle.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

GIB = 1024**3
SPACING = (0.8, 0.8, 1.25)  # abdominal CT: sub-mm in plane, 1.25 mm slices
CLASSES = ["liver", "lesion"]


def ct_case(size, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A CT-like scan (HU, float32) and its label (uint8), cheaply: a phantom rendered at 1/4 size, upsampled."""
    from seg.data.synthetic import make_case

    coarse = tuple(max(8, s // 4) for s in size)
    image, label = make_case(coarse, spacing=tuple(4 * s for s in SPACING), rng=np.random.default_rng(seed))
    body = image > 0.1 * image.max()
    hu = np.where(body, 60.0 * image / max(float(np.median(image[body])), 1e-6) - 20.0, -1000.0).astype(np.float32)
    # nearest-neighbour upsampling (np.repeat) costs a copy per axis, not a resampling
    for axis, (big, small) in enumerate(zip(size, coarse)):
        reps = -(-big // small)
        hu = np.repeat(hu, reps, axis=axis).take(range(big), axis=axis)
        label = np.repeat(label, reps, axis=axis).take(range(big), axis=axis)
    rng = np.random.default_rng(seed + 1)
    for z in range(size[2]):  # CT noise, slice by slice so no second float64 volume is made
        hu[..., z] += rng.standard_normal(size[:2], dtype=np.float32) * 12.0
    return hu, label.astype(np.uint8)


def make(workdir: Path, size, channels, overlap: float, hd95: bool) -> dict:
    """Write the dataset, the prediction input folder and the checkpoint; returns their paths."""
    import lightning
    import nibabel as nib
    import torch

    from seg.data import NiftiDataModule
    from seg.inference.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_KEY
    from seg.training.module import SegmentationModule

    data = workdir / "data"
    for sub in ("imagesTr", "labelsTr"):
        (data / sub).mkdir(parents=True, exist_ok=True)
    # stored the way scanners' DICOM converters often write CT (L, P, S): reorienting to RAS is part of the cost
    affine = np.diag([-SPACING[0], -SPACING[1], SPACING[2], 1.0])
    cases = {"big_000": tuple(size), "small_001": (64, 64, 48)}
    for case_id, shape in cases.items():
        image_path, label_path = data / "imagesTr" / f"{case_id}.nii", data / "labelsTr" / f"{case_id}.nii"
        if not image_path.exists():
            image, label = ct_case(shape)
            nib.save(nib.Nifti1Image(label, affine), label_path)
            nib.save(nib.Nifti1Image(image, affine), image_path)  # uncompressed: gzip of 400 MB takes minutes
            del image, label
    (data / "dataset.json").write_text(json.dumps({
        "name": "BigCT", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "liver", "2": "lesion"},
        "numTraining": 2, "tensorImageSize": "3D",
        "training": [{"image": f"./imagesTr/{c}.nii", "label": f"./labelsTr/{c}.nii"} for c in cases]}, indent=1))
    scans = workdir / "scans"
    scans.mkdir(exist_ok=True)
    if not (scans / "big_000.nii").exists():
        os.link(data / "imagesTr" / "big_000.nii", scans / "big_000.nii")  # no second copy on disk

    roi = [96, 96, 96]
    preprocessing = NiftiDataModule(str(data), patch_size=roi, num_workers=0).preprocessing
    strides = [2] * (len(channels) - 1)
    torch.manual_seed(0)
    model = SegmentationModule(out_channels=len(CLASSES) + 1, channels=list(channels), strides=strides,
                               roi_size=roi, sw_batch_size=1, sw_overlap=overlap, class_names=CLASSES, hd95=hd95)
    # what `seg fit` writes, less the training state (`seg validate` takes the model's settings from it)
    checkpoint = workdir / f"tiny{'' if hd95 else '-nohd95'}.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams), "epoch": 0,
                "global_step": 0, "pytorch-lightning_version": lightning.__version__,
                CHECKPOINT_KEY: {"format": CHECKPOINT_FORMAT, "preprocessing": preprocessing,
                                 "class_names": CLASSES}}, checkpoint)
    config = workdir / "validate.yaml"
    config.write_text(json.dumps({
        "trainer": {"accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False},
        "model": {"channels": list(channels), "strides": strides, "sw_batch_size": 1, "sw_overlap": overlap},
        "data": {"root": str(data), "patch_size": roi, "val_cases": ["big_000"], "num_workers": 0,
                 "cache_rate": 0.0}}))
    return {"data": data, "scans": scans, "checkpoint": checkpoint, "config": config,
            "spacing": preprocessing["spacing"]}


def peak_of(command: list[str], env: dict) -> tuple[float, float, str]:
    """Run `command` in a fresh process; returns (its peak RSS in GiB, seconds, stderr tail)."""
    wrapper = ("import json, resource, subprocess, sys; done = subprocess.run(sys.argv[1:]); "
               "usage = resource.getrusage(resource.RUSAGE_CHILDREN); "
               "print(json.dumps({'rc': done.returncode, 'maxrss_kib': usage.ru_maxrss}))")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", wrapper, *command], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    report = json.loads(done.stdout.strip().splitlines()[-1])
    if report["rc"] != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return report["maxrss_kib"] * 1024 / GIB, seconds, done.stderr[-2000:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/seg-big-volume"))
    parser.add_argument("--size", type=int, nargs=3, default=[512, 512, 400])
    parser.add_argument("--channels", type=int, nargs="+", default=[4, 8, 16], help="network width per level")
    parser.add_argument("--overlap", type=float, default=0.0,
                        help="sliding-window overlap (time only: the aggregation buffers are full-volume anyway)")
    parser.add_argument("--no-hd95", dest="hd95", action="store_false",
                        help="validate without HD95 (its surface distances are the validation peak on garbage)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tta", action="store_true", help="also predict with --tta (8x the windows)")
    parser.add_argument("--only", choices=["validate", "predict", "predict_tta"], default=None)
    args = parser.parse_args()

    workdir = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    paths = make(workdir, args.size, args.channels, args.overlap, args.hd95)
    made = time.perf_counter() - start
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "WANDB_MODE": "disabled"}
    seg = [sys.executable, "-m", "seg"]
    input_gib = int(np.prod(args.size)) * 4 / GIB
    result = {
        "size": args.size, "spacing_mm": paths["spacing"], "input_float32_gib": round(input_gib, 3),
        "classes": len(CLASSES) + 1, "roi": [96, 96, 96], "sw_batch_size": 1, "overlap": args.overlap,
        "channels": args.channels, "hd95": args.hd95, "threads": args.threads, "setup_s": round(made, 1),
        "cpu": platform.processor() or platform.machine(), "ram_gib": round(
            os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1),
    }
    phases = {
        "validate": [*seg, "validate", "--config", str(paths["config"]), "--ckpt_path", str(paths["checkpoint"]),
                     "--overlays.every_n_epochs", "0", "--trainer.default_root_dir", str(workdir / "validate")],
        "predict": [*seg, "predict", "-c", str(paths["checkpoint"]), "-i", str(paths["scans"]),
                    "-o", str(workdir / "predictions"), "--device", "cpu"],
        # mirroring window by window: 8x the windows, through the same slabs, so the label path's memory
        "predict_tta": [*seg, "predict", "-c", str(paths["checkpoint"]), "-i", str(paths["scans"]),
                        "-o", str(workdir / "predictions_tta"), "--device", "cpu", "--tta"],
    }
    for name, command in phases.items():
        if (args.only and name != args.only) or (name == "predict_tta" and args.only != "predict_tta" and not args.tta):
            continue
        peak, seconds, _ = peak_of(command, env)
        result[name] = {"peak_rss_gib": round(peak, 2), "ratio_to_input": round(peak / input_gib, 1),
                        "seconds": round(seconds, 1)}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
