"""Folder prediction speed and peak memory: `seg predict` (PyTorch and ONNX Runtime) against a plain MONAI loop.

The three methods segment the same scans with the same checkpoint and write label maps on each scan's grid:
- seg:   `seg.inference.predict.predict_folder` (what `seg predict` runs): loading of the next scan overlaps the
         prediction, inversion and writing run in a background thread, scans that fit in one window share
         forward passes; the default precision ("auto": bf16 on a CPU with AMX, else float32);
- seg_fp32: the same with `--precision fp32`;
- onnx:  the same with `--backend onnxruntime`: the checkpoint exported in memory (`seg export`'s path) and run by
         ONNX Runtime's CPU execution provider with as many threads (needs `pip install seg[onnx]`);
- monai: the loop a MONAI user writes: LoadImaged, EnsureChannelFirstd, Orientationd, Spacingd,
         (CropForegroundd when the checkpoint crops), NormalizeIntensityd, sliding_window_inference (same
         window, overlap, Gaussian blending and batch), argmax, Invertd (nearest), SaveImage; one scan after
         another.
Each method runs in its own child process (so peak RSS does not mix), the methods alternate for `--repeats`
rounds (so drift in a shared machine's load hits both), and the best round of each is reported. Scans per
minute count from the first scan to the last file written (model loading and imports excluded; reported
apart). Peak memory is the child's `ru_maxrss`, and its growth over the RSS after imports and model loading.
Finally the label maps of seg and each other method are compared case by case (voxel agreement, Dice per class;
ONNX against seg_fp32, both float32), and the whole default command `seg predict -c CKPT -i DIR -o OUT` is timed
as a user runs it, start-up included (`cli_seconds`, one run per round).

usage: python bench/predict_speed.py --checkpoint CKPT --input DIR [--cases 48] [--repeats 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = ("seg", "seg_fp32", "onnx", "monai")

def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_seg(checkpoint: str, input_dir: Path, output: Path, backend: str = "pytorch", precision: str = "auto") -> dict:
    from seg.inference.predict import predict_folder
    from seg.inference.predictor import Predictor

    predictor = Predictor.from_checkpoint(checkpoint, device="cpu", backend=backend, precision=precision)
    baseline = rss_mb()
    start = time.perf_counter()
    results = predict_folder(predictor, input_dir, output, progress=False)
    seconds = time.perf_counter() - start
    assert all(r.status == "ok" for r in results), [r.message for r in results if r.status != "ok"]
    return {"seconds": seconds, "cases": len(results), "baseline_rss_mb": baseline, "precision": predictor.precision,
            "params_mb": sum(p.numel() * p.element_size() for p in predictor.model.network.parameters()) / 2**20}


def run_monai(checkpoint: str, input_dir: Path, output: Path) -> dict:
    import numpy as np
    import torch
    from monai.inferers import sliding_window_inference
    from monai.transforms import (Compose, CropForegroundd, EnsureChannelFirstd, Invertd, LoadImaged,
                                  NormalizeIntensityd, Orientationd, SaveImage,
                                  ScaleIntensityRanged, Spacingd)

    from seg.inference.checkpoint import load_trained_model

    model = load_trained_model(checkpoint, map_location="cpu")
    pre, hp = model.preprocessing, model.hparams
    steps = [LoadImaged("image"), EnsureChannelFirstd("image"), Orientationd("image", axcodes="RAS"),
             # float32 as in seg's transforms: nearest-neighbour ties at half-voxel positions round the same way
             Spacingd("image", pixdim=pre["spacing"], mode="bilinear", dtype=torch.float32)]
    if pre["crop_foreground"]:
        # seg crops to the body: nonzero voxels (MONAI's default, x > 0, would crop a CT to its soft tissue), or for
        # CT the voxels above -500 HU (seg also drops specks in the air first, which this loop does not)
        threshold = (pre.get("crop_threshold") or [None])[0]
        select = (lambda x: x != 0) if threshold is None else (lambda x: x > threshold)
        steps.append(CropForegroundd("image", source_key="image", select_fn=select, allow_smaller=True))
    schemes = pre["normalization"]
    if all(n["scheme"] == "zscore" for n in schemes) and len({n["nonzero"] for n in schemes}) == 1:
        steps.append(NormalizeIntensityd("image", nonzero=schemes[0]["nonzero"], channel_wise=True))
    elif len(schemes) == 1 and schemes[0]["scheme"] == "ct":  # clip to the HU window, then the dataset's mean/std
        (low, high), mean, std = schemes[0]["clip"], schemes[0]["mean"], schemes[0]["std"]
        steps.append(ScaleIntensityRanged("image", low, high, (low - mean) / std, (high - mean) / std, clip=True))
    else:
        raise SystemExit("the MONAI loop here does z-score or one CT channel; this checkpoint mixes schemes")
    transforms = Compose(steps)
    invert = Invertd("pred", transform=transforms, orig_keys="image", nearest_interp=True)
    save = SaveImage(output_dir=output, output_postfix="", separate_folder=False, output_dtype=np.uint8,
                     resample=False, print_log=False)
    files = sorted(p for p in input_dir.iterdir() if p.name.endswith((".nii", ".nii.gz")))
    baseline = rss_mb()
    start = time.perf_counter()
    with torch.no_grad():
        for path in files:
            d = transforms({"image": str(path)})
            logits = sliding_window_inference(d["image"][None], model.roi_size, hp["sw_batch_size"], model.network,
                                              overlap=hp["sw_overlap"], mode="gaussian")
            d["pred"] = logits[0].argmax(0, keepdim=True).float()
            d = invert(d)
            save(d["pred"])
    return {"seconds": time.perf_counter() - start, "cases": len(files), "baseline_rss_mb": baseline}


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    if args.child == "monai":
        result = run_monai(args.checkpoint, Path(args.input), Path(args.output))
    else:
        result = run_seg(args.checkpoint, Path(args.input), Path(args.output),
                         "onnxruntime" if args.child == "onnx" else "pytorch",
                         "fp32" if args.child == "seg_fp32" else "auto")
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def agreement(seg_dir: Path, monai_dir: Path, input_dir: Path, other: str = "monai") -> dict:
    """Voxel agreement and per-class Dice between seg's label maps and another method's; affine/shape checks."""
    import nibabel as nib
    import numpy as np

    equal, dices, affine_ok = [], {}, []
    for scan in sorted(input_dir.iterdir()):
        name = scan.name.removesuffix(".gz").removesuffix(".nii") + ".nii.gz"  # both write <case>.nii.gz
        a_img, b_img, ref = nib.load(seg_dir / name), nib.load(monai_dir / name), nib.load(scan)
        a, b = np.asarray(a_img.dataobj), np.asarray(b_img.dataobj)
        affine_ok.append((a.shape == ref.shape, bool(np.allclose(a_img.affine, ref.affine, atol=1e-6)),
                          bool(np.allclose(b_img.affine, ref.affine, atol=1e-6)), b.shape == ref.shape))
        equal.append(float((a == b).mean()))
        for k in range(1, int(max(a.max(), b.max())) + 1):
            denominator = (a == k).sum() + (b == k).sum()
            if denominator:
                dices.setdefault(k, []).append(2 * float(((a == k) & (b == k)).sum()) / denominator)
    return {"voxel_agreement_mean": statistics.mean(equal), "voxel_agreement_min": min(equal),
            f"dice_seg_vs_{other}": {k: round(statistics.mean(v), 4) for k, v in dices.items()},
            "seg_shape_and_affine_ok": all(s and a for s, a, _, _ in affine_ok),
            f"{other}_shape_and_affine_ok": all(s and b for _, _, b, s in affine_ok)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--input", required=True, help="folder of scans (e.g. hippocampus imagesTr)")
    parser.add_argument("--cases", type=int, default=48, help="the first N scans of the folder")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    work = Path(tempfile.mkdtemp(prefix="predict_speed."))
    try:
        scans = work / "scans"
        scans.mkdir()
        files = sorted(p for p in Path(args.input).iterdir() if p.name.endswith((".nii", ".nii.gz")))[: args.cases]
        for path in files:
            (scans / path.name).symlink_to(path.resolve())
        largest = max(_voxels(p) for p in files)
        # PASSIVE: OpenMP threads sleep at barriers instead of spinning. On a machine shared with other work,
        # libgomp's spinning made a one-thread-calling loop (the MONAI one) up to 5x slower, and seg, whose extra
        # threads switch libgomp to short spins, looked that much faster for a reason unrelated to its design.
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
               "OMP_WAIT_POLICY": "PASSIVE"}
        runs: dict[str, list[dict]] = {m: [] for m in METHODS}
        cli_seconds: list[float] = []
        for round_ in range(args.repeats):
            for method in METHODS:
                output = work / f"{method}_{round_}"
                start = time.perf_counter()
                done = subprocess.run([sys.executable, __file__, "--child", method, "--checkpoint", args.checkpoint,
                                       "--input", str(scans), "--output", str(output), "--threads", str(args.threads)],
                                      capture_output=True, text=True, env=env)
                if done.returncode:
                    sys.exit(f"{method} failed:\n{done.stderr[-3000:]}")
                result = json.loads(done.stdout.strip().splitlines()[-1])
                result["process_seconds"] = time.perf_counter() - start
                result["scans_per_minute"] = 60 * result["cases"] / result["seconds"]
                runs[method].append(result)
                print(f"round {round_} {method}: {result['scans_per_minute']:.1f} scans/min, "
                      f"peak RSS {result['peak_rss_mb']:.0f} MB", file=sys.stderr)
            output = work / f"cli_{round_}"
            start = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "seg", "predict", "-c", args.checkpoint, "-i", str(scans),
                                   "-o", str(output)], capture_output=True, text=True, env=env)
            if done.returncode:
                sys.exit(f"seg predict failed:\n{done.stderr[-3000:]}")
            cli_seconds.append(time.perf_counter() - start)
            print(f"round {round_} seg predict (command, start-up included): {cli_seconds[-1]:.1f} s",
                  file=sys.stderr)
        best = {m: max(r, key=lambda x: x["scans_per_minute"]) for m, r in runs.items()}
        report = {
            "cases": len(files), "threads": args.threads, "checkpoint": args.checkpoint,
            "largest_input_voxels": largest, "largest_input_float32_mb": round(largest * 4 / 2**20, 3),
            "model_params_mb": round(best["seg"]["params_mb"], 2), "seg_precision": best["seg"]["precision"],
            "cli_seconds": [round(s, 2) for s in cli_seconds],
            "cli_scans_per_second_best": round(len(files) / min(cli_seconds), 2),
            **{f"{m}_{k}": round(v, 2) for m, r in best.items() for k, v in r.items()
               if k in ("scans_per_minute", "seconds", "process_seconds", "peak_rss_mb", "baseline_rss_mb")},
            **{f"{m}_peak_growth_mb": round(r["peak_rss_mb"] - r["baseline_rss_mb"], 1) for m, r in best.items()},
            "speedup": round(best["seg"]["scans_per_minute"] / best["monai"]["scans_per_minute"], 2),
            "onnx_speedup_over_seg": round(best["onnx"]["scans_per_minute"] / best["seg"]["scans_per_minute"], 2),
            "seg_speedup_over_fp32": round(best["seg"]["scans_per_minute"] / best["seg_fp32"]["scans_per_minute"], 2),
            "all_rounds_scans_per_minute": {m: [round(x["scans_per_minute"], 1) for x in r] for m, r in runs.items()},
            **agreement(work / "seg_0", work / "monai_0", scans),
            "onnx_vs_seg_fp32": agreement(work / "seg_fp32_0", work / "onnx_0", scans, "onnx"),
            "seg_vs_seg_fp32": agreement(work / "seg_0", work / "seg_fp32_0", scans, "seg_fp32"),
        }
        print(json.dumps(report, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _voxels(path: Path) -> int:
    import nibabel as nib
    import numpy as np

    return int(np.prod(nib.load(path).shape))


if __name__ == "__main__":
    main()
