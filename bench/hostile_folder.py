"""A folder of good scans with hostile files mixed in predicts every good scan as if it were alone (issue 31).

    python bench/hostile_folder.py [--good 50] [--checkpoint CKPT] [--out DIR]

Two rounds, NIfTI and DICOM (a folder is one or the other: DICOM is read only where no NIfTI scan is). Each
round predicts the good cases alone, then the same good cases with 10 hostile files or series beside them,
with `seg predict` in a fresh process whose TMPDIR is an empty folder, and checks:
- every good case's label map is byte-identical to the one predicted alone;
- the exit code is 1 and `summary.csv` marks exactly the 10 hostile inputs "failed";
- the peak RSS of the run stays within the run of the good cases alone plus what the size guard allows one
  scan (`seg.data.guard`: 4 working float32 copies of the largest good scan), here a few MB: a hostile file
  that claims gigabytes is refused from its header;
- nothing is left in TMPDIR, and no temporary is left in the output folder.

Without `--checkpoint` a tiny checkpoint is trained first (`seg fit`, two short epochs on synthetic data:
the labels need not be good, only the same with and without the hostile files). One JSON line per round is
printed and appended to `OUT/results.jsonl`; the exit code is 1 when any check fails.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(1, str(REPO / "tests" / "inference"))  # test_dicom imports its neighbours as pytest does

from machine import cpu_name  # noqa: E402 - bench/, beside this script
from seg.data.synthetic import write_dataset  # noqa: E402
from tests.hostile_files import gzip_bomb, header_bomb  # noqa: E402
from tests.inference.test_dicom import write_series  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "disabled"}


def train_checkpoint(work: Path) -> Path:
    data = write_dataset(work / "train_data", cases=6, size=(32, 32, 24))
    config = work / "config.yaml"
    config.write_text(
        f"trainer: {{max_epochs: 2, accelerator: cpu, default_root_dir: {work / 'run'}, limit_train_batches: 3}}\n"
        "model: {channels: [8, 16, 32], strides: [2, 2]}\n"
        f"data: {{root: {data}, patch_size: [32, 32, 16], batch_size: 2, num_workers: 0}}\n"
        "overlays: {every_n_epochs: 0}\n")
    done = subprocess.run([sys.executable, "-m", "seg", "fit", "--config", str(config), "--logging", "csv"],
                          capture_output=True, text=True, env=ENV)
    checkpoint = work / "run" / "checkpoints" / "last.ckpt"
    if done.returncode or not checkpoint.is_file():
        sys.exit(f"training the bench checkpoint failed:\n{done.stderr[-3000:]}")
    return checkpoint


# ---- hostile NIfTI files: each must be one "failed" row ---------------------------------------------------------
def hostile_nifti(folder: Path) -> list[str]:
    """Write 10 hostile NIfTI inputs into `folder`; return their case ids."""
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    volume = np.random.default_rng(0).normal(size=(32, 32, 24)).astype(np.float32)

    header_bomb(folder / "h_header_bomb.nii", shape=(1024, 1024, 1024))
    gzip_bomb(folder / "h_gzip_bomb.nii.gz", inflated=1 << 30, shape=(1024, 1024, 256))
    os.mkfifo(folder / "h_fifo.nii.gz")
    (folder / "h_dangling.nii.gz").symlink_to(folder / "no_such_file.nii.gz")
    nib.save(nib.Nifti1Image(volume, affine), folder / "h_truncated.nii.gz")
    raw = (folder / "h_truncated.nii.gz").read_bytes()
    (folder / "h_truncated.nii.gz").write_bytes(raw[: len(raw) // 2])
    (folder / "h_random_bytes.nii.gz").write_bytes(np.random.default_rng(1).bytes(5000))
    (folder / "h_empty.nii.gz").write_bytes(b"")
    nan_affine = affine.copy()
    nan_affine[0, 0] = np.nan
    image = nib.Nifti1Image(volume, None)
    image.header.set_sform(nan_affine, code=1)  # nibabel refuses to derive a qform from it: sform only
    nib.save(image, folder / "h_nan_affine.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((32, 0, 24), np.float32), affine), folder / "h_zero_axis.nii.gz")
    nib.save(nib.Nifti1Image(np.full((32, 32, 24), np.nan, np.float32), affine), folder / "h_all_nan.nii.gz")
    return sorted(p.name.split(".")[0] for p in folder.iterdir() if p.name.startswith("h_"))


def good_nifti(folder: Path, count: int, work: Path) -> None:
    data = write_dataset(work / "good_data", cases=1, test_cases=count, size=(32, 32, 24), seed=7)
    folder.mkdir(parents=True)
    for path in sorted((data / "imagesTs").iterdir()):
        shutil.copy(path, folder / path.name)


# ---- hostile DICOM series ------------------------------------------------------------------------------------------
def _edit_series(folder: Path, edit) -> None:
    import pydicom

    for path in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        edit(ds)
        ds.save_as(path)


def good_dicom(folder: Path, count: int) -> None:
    rng = np.random.default_rng(3)
    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    for i in range(count):
        volume = rng.normal(100, 30, size=(24, 24, 8)).astype(np.float32)
        volume[6:18, 6:18, 2:6] += 200
        write_series(folder / f"good{i:03d}", volume, affine, patient=f"G{i:03d}", series_number=1)


def hostile_dicom(folder: Path) -> list[str]:
    """Write 10 hostile DICOM inputs into `folder` (each in its own subfolder); return their case ids."""
    rng = np.random.default_rng(4)
    affine = np.diag([1.5, 1.5, 3.0, 1.0])

    def series(name: str, edit=None) -> Path:
        sub = folder / name
        write_series(sub, rng.normal(100, 30, size=(24, 24, 8)).astype(np.float32), affine, patient=name,
                     series_number=1)
        if edit is not None:
            _edit_series(sub, edit)
        return sub

    def delete(*keywords):
        def edit(ds):
            for keyword in keywords:
                delattr(ds, keyword)
        return edit

    def setter(**values):
        def edit(ds):
            for key, value in values.items():
                setattr(ds, key, value)
        return edit

    series("HNOSPACING", delete("PixelSpacing"))
    series("HNANSPACING", setter(PixelSpacing=["nan", "nan"]))
    series("HNEGSPACING", setter(PixelSpacing=["-1.5", "-1.5"]))
    series("HZEROSPACING", setter(PixelSpacing=["0", "0"]))
    series("HHUGE", setter(Rows=65535, Columns=65535))
    series("HBITS32", setter(BitsAllocated=32, BitsStored=32, HighBit=31))
    series("HBITS8", setter(BitsAllocated=8, BitsStored=8, HighBit=7))
    series("HNOPOSITION", delete("ImagePositionPatient", "ImageOrientationPatient"))
    series("HTRUNCATED", lambda ds: setattr(ds, "PixelData", ds.PixelData[: len(ds.PixelData) // 3]))
    series("HNOROWS", delete("Rows"))
    return sorted(f"{p.name}_1" for p in folder.iterdir() if p.name.startswith("H"))


# ---- one round ----------------------------------------------------------------------------------------------------
def predict(checkpoint: Path, scans: Path, output: Path, tmp: Path) -> tuple[int, float, float, str]:
    """`seg predict` in a fresh process with TMPDIR=tmp; exit code, seconds, peak RSS in MB, stderr."""
    tmp.mkdir(parents=True, exist_ok=True)
    script = ("import resource, subprocess, sys\n"
              "done = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
              "sys.stderr.write(done.stdout + done.stderr)\n"
              "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
              "sys.exit(done.returncode)\n")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", script, sys.executable, "-m", "seg", "predict", "--checkpoint",
                           str(checkpoint), "--input", str(scans), "--output", str(output), "--device", "cpu"],
                          capture_output=True, text=True, env={**ENV, "TMPDIR": str(tmp)}, timeout=3600)
    seconds = time.perf_counter() - start
    peak_mb = int(done.stdout.strip().splitlines()[-1]) / 1024 if done.stdout.strip() else float("nan")
    return done.returncode, seconds, peak_mb, done.stderr


def label_digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(np.asarray(nib.load(p).dataobj).tobytes()).hexdigest()
            for p in sorted(folder.glob("*.nii.gz"))}  # label maps only: no probabilities or gates are asked for


def summary_rows(folder: Path) -> list[dict]:
    """The rows of `folder/summary.csv`; none when the run ended without writing it."""
    if not (folder / "summary.csv").is_file():
        return []
    with open(folder / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def run_round(kind: str, checkpoint: Path, work: Path, good: int) -> dict:
    alone, mixed = work / f"{kind}_alone", work / f"{kind}_mixed"
    if kind == "nifti":
        good_nifti(alone, good, work)
    else:
        good_dicom(alone, good)
    shutil.copytree(alone, mixed, symlinks=True)
    expected = hostile_nifti(mixed) if kind == "nifti" else hostile_dicom(mixed)

    code_alone, seconds_alone, rss_alone, log_alone = predict(checkpoint, alone, work / f"{kind}_pred_alone",
                                                             work / f"{kind}_tmp_alone")
    code_mixed, seconds_mixed, rss_mixed, log_mixed = predict(checkpoint, mixed, work / f"{kind}_pred_mixed",
                                                             work / f"{kind}_tmp_mixed")
    rows = summary_rows(work / f"{kind}_pred_mixed")
    failed = sorted(row["case"] for row in rows if row["status"] == "failed")
    ok_alone = sorted(row["case"] for row in summary_rows(work / f"{kind}_pred_alone") if row["status"] == "ok")
    ok_mixed = sorted(row["case"] for row in rows if row["status"] == "ok")
    digests_alone = label_digests(work / f"{kind}_pred_alone")
    digests_mixed = {name: digest for name, digest in label_digests(work / f"{kind}_pred_mixed").items()
                     if name in digests_alone}
    left_in_tmp = sorted(str(p.relative_to(work)) for p in (work / f"{kind}_tmp_mixed").rglob("*"))
    left_in_output = sorted(p.name for p in (work / f"{kind}_pred_mixed").glob(".tmp*"))
    # The guard lets one scan take 4 float32 working copies; the good scans are a few hundred KB each.
    largest = max(p.stat().st_size for p in alone.rglob("*") if p.is_file())
    rss_allowance_mb = 64 + 4 * 4 * largest / (1 << 20)
    checks = {
        "alone_exit_0": code_alone == 0,
        "summary_written": bool(rows),
        "alone_all_ok": len(ok_alone) == good,
        "mixed_exit_1": code_mixed == 1,
        "failed_exactly_the_hostile": failed == expected,
        "every_good_case_ok": ok_mixed == ok_alone,
        "labels_identical": digests_mixed == digests_alone and len(digests_alone) == good,
        "peak_rss_within_bound": rss_mixed <= rss_alone + rss_allowance_mb,
        "nothing_left_in_tmp": not left_in_tmp,
        "no_temporaries_in_output": not left_in_output,
    }
    return {"round": kind, "good": good, "hostile": expected, "failed": failed, "checks": checks,
            "passed": all(checks.values()), "exit_alone": code_alone, "exit_mixed": code_mixed,
            "seconds_alone": round(seconds_alone, 1), "seconds_mixed": round(seconds_mixed, 1),
            "peak_rss_mb_alone": round(rss_alone, 1), "peak_rss_mb_mixed": round(rss_mixed, 1),
            "left_in_tmp": left_in_tmp[:10], "log_tail": log_mixed.strip().splitlines()[-14:],
            "cpu": cpu_name(), "date": time.strftime("%Y-%m-%d %H:%M")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--good", type=int, default=50, help="good scans (and series) per round (default 50)")
    parser.add_argument("--checkpoint", type=Path, help="a seg checkpoint (default: train a tiny one first)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_hostile_folder"), help="work folder")
    parser.add_argument("--rounds", default="nifti,dicom", help="which rounds (default nifti,dicom)")
    args = parser.parse_args()
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    checkpoint = args.checkpoint or train_checkpoint(args.out)
    passed = True
    for kind in args.rounds.split(","):
        result = run_round(kind, checkpoint, args.out, args.good)
        line = json.dumps(result)
        print(line, flush=True)
        with open(args.out / "results.jsonl", "a") as f:
            f.write(line + "\n")
        passed &= result["passed"]
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
