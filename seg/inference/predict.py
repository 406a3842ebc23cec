"""`seg predict`: segment every scan in a folder, each written back in the scan's own geometry.

    seg predict --checkpoint runs/x/checkpoints/best.ckpt --input scans/ --output predictions/
    seg predict --checkpoint f0.ckpt f1.ckpt ... --input scans/ --output predictions/   # an ensemble
    seg predict --checkpoint runs/cv --input scans/ --output predictions/   # every fold of a `seg cv` run

Several checkpoints (or the output folder of `seg cv`: every fold's best checkpoint) are one ensemble: their softmax
is averaged window by window (`seg.inference.ensemble`). `--postprocessing FILE` (implied by a `seg cv` folder: its
`cv/postprocessing.json`) applies the connected-component steps chosen out of fold to every label map
(`seg.postprocessing`); probabilities are written as predicted.

For each case (one file, or nnU-Net channel files `case_0000.nii.gz`, `case_0001.nii.gz`, ...) it writes
- `OUT/<case>.nii.gz`: the label map, uint8 (below 257 classes), on the input's grid with the input's header;
- with `--save-probabilities`: `OUT/<case>_probabilities.nii.gz`, one 4D float32 file, (X, Y, Z, classes),
  background first;
- with `--save-gates`: `OUT/<case>_gate_<level>.nii.gz`, float32 in [0, 1], coarsest level first;
- with `--preview`: `OUT/<case>_preview.png`, three views with the prediction's contours;
- with `--dicom-seg`, for a DICOM series: `OUT/<case>_seg.dcm`, a DICOM Segmentation (`seg.inference.dicom`);
- `OUT/summary.csv`: status (ok / partial / failed / skipped), seconds, volume in ml per class, the report's
  columns (`seg.inference.report`), the input and output files and the message; also a row for every folder entry
  that is not predicted: "failed"
  for a scan that cannot be read (dangling link, link loop, not a regular file), two files giving one case id, a
  case whose outputs would overwrite another's, or an unusable DICOM series; "ignored" for other files (and
  DICOM files that are not image slices). File names with control characters are written escaped (`repr`);
- `OUT/report.json`: the per-case report (statistics per class, quality flags, uncertainty), rewritten as cases
  finish; with `--skip-existing` the skipped cases keep their earlier entries (computed again from their files
  where there is none).

`<case>` is `output_stem(case_id)`: the case id, or where it is not a plain file name of at most `STEM_BYTES` a
sanitised, shortened form with a hash of the id; the summary and the report keep the original id.

A case is the unit of failure: any error in one case (reading, predicting, writing, a name the filesystem refuses)
is one line and a "failed" row, and the others are predicted as if alone. The label map is written first; without
it the case has "failed" (and older outputs of the case are removed: they would pass for this scan's). An output
after it that fails is named in the message, status "partial", and the outputs written stay. The exit code of
`seg predict` is 1 when any case is "failed" or "partial".

A folder holding DICOM files (in subfolders or mixed) and no NIfTI scan is read as DICOM: one case per image
series, named `<PatientID>_<SeriesNumber>`, converted to a temporary NIfTI and predicted as one.

Three stages overlap: a thread loads and preprocesses the next scan while the model predicts the current one,
and a thread inverts and writes the previous one; scans small enough for one sliding window are predicted
`sw_batch_size` at a time. Files are written under a hidden temporary name (`.tmp-<pid>-<name>`, removed at
the next start once that process is gone) and renamed into place, so an interrupted run never leaves a
half-written output; `--skip-existing` resumes it.

`--backend onnxruntime` runs the network in ONNX Runtime (`seg.inference.onnx_model`), all else unchanged.
`--num-parts N --part-id I` predicts nnU-Net's part I of N of the sorted cases and writes
`summary.part-I-of-N.csv`, merged into `summary.csv` when every part's is there; `--devices 0,1` runs one worker
process per GPU, each its part.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from seg.errors import SegError
from seg.inference.folder import predict_folder
from seg.inference.outputs import SUMMARY, merge_summaries, part_summary, shard
from seg.inference.predictor import PRECISIONS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("Report (summary.csv columns and OUT/report.json): per class volume_ml, voxels, mean and std "
                     "of the input intensity inside it, connected components; flags: empty, fragmented, border, "
                     "spacing, intensity (CT only), modality (a CT through a model trained on MR, or the reverse), "
                     "uncertain. The run ends with one line per case flagged for modality, spacing, intensity, "
                     "fragmented or an empty prediction (a count and report.json's path beyond 10 cases).")
    parser.add_argument("--checkpoint", "-c", nargs="+",
                        help="a checkpoint written by `seg fit`; several: their ensemble (softmax averaged); the "
                             "--output folder of `seg cv`: every fold's best.ckpt and its postprocessing.json; or "
                             "with --backend onnxruntime a .onnx from `seg export`")
    parser.add_argument("--postprocessing", default=None,
                        help="postprocessing.json (written by `seg cv`) to apply to the label maps")
    parser.add_argument("--input", "-i",
                        help="folder of .nii/.nii.gz scans (multi-modal: case_0000.nii.gz, case_0001.nii.gz, ...) "
                             "or one scan; or a folder of DICOM files (searched recursively, any number of series, "
                             "one case <PatientID>_<SeriesNumber> per image series; non-image files skipped)")
    parser.add_argument("--output", "-o", required=True, help="folder for the predictions (not the input folder)")
    parser.add_argument("--device", default="auto", help="auto (GPU when available), cpu or cuda")
    parser.add_argument("--tta", action="store_true",
                        help="average over mirrored copies of every window, on the axes the model was trained "
                             "mirrored on (data.flip_axes; up to 8x slower in 3D)")
    parser.add_argument("--save-probabilities", action="store_true",
                        help="also write <case>_probabilities.nii.gz: float32 (X, Y, Z, classes)")
    parser.add_argument("--save-gates", action="store_true",
                        help="also write the attention-gate maps <case>_gate_<level>.nii.gz (coarsest first)")
    parser.add_argument("--overlap", type=float, default=None,
                        help="sliding-window overlap in [0, 0.95] (default: the model's, usually 0.5)")
    parser.add_argument("--sw-batch-size", type=int, default=None,
                        help="windows (or whole small scans) per forward pass (default: the model's)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="the network's arithmetic: auto (float16 on a GPU; bfloat16 on a CPU with AMX or "
                             "AVX-512 BF16, about 3x faster there; else float32), fp32 (bit-for-bit reproducible), "
                             "bf16, fp16 (GPU). Stitching, softmax and argmax stay float32")
    parser.add_argument("--skip-existing", action="store_true",
                        help="skip cases whose outputs exist (resume an interrupted run)")
    parser.add_argument("--dicom-seg", action="store_true",
                        help="for DICOM series, also write <case>_seg.dcm: a DICOM Segmentation referencing the "
                             "source images, one segment per class, one frame per source slice holding it")
    parser.add_argument("--uncertainty", action="store_true",
                        help="compute the softmax for the report's uncertainty (mean predictive entropy inside the "
                             "foreground; with --tta, of the mirrored mean). Costs (classes x 4) bytes per voxel, "
                             "twice (network grid and scan grid), and disables label-only slabs")
    parser.add_argument("--preview", action="store_true",
                        help="also write <case>_preview.png: three views with the prediction's contours")

    parser.add_argument("--backend", choices=("pytorch", "onnxruntime"), default="pytorch",
                        help="what runs the network: pytorch (default) or onnxruntime (pip install seg[onnx]; "
                             "onnxruntime-gpu for --device cuda); a .ckpt is exported to ONNX in memory")
    parser.add_argument("--num-parts", type=int, default=1,
                        help="split the cases into this many parts (sorted, every N-th from --part-id: nnU-Net's)")
    parser.add_argument("--part-id", type=int, default=0,
                        help="the part this process predicts, 0 .. num-parts - 1; writes summary.part-I-of-N.csv, "
                             "and summary.csv once every part's is there")
    parser.add_argument("--devices", default=None,
                        help="one worker process per device on this node, e.g. 0,1,2,3 (GPU indices; cpu for a CPU "
                             "worker), each its part of the cases (within this --part-id of --num-parts); one "
                             "summary.csv at the end")
    parser.add_argument("--merge-summaries", action="store_true",
                        help="only merge the --num-parts part summaries in --output into summary.csv")


def worker_command(args: argparse.Namespace, device: str, part_id: int, num_parts: int) -> list[str]:
    """`seg predict` for one worker of `--devices`: the same options, its own device and part."""
    command = [sys.executable, "-m", "seg", "predict", "--checkpoint", *map(str, args.checkpoint), "--input",
               str(args.input), "--output", str(args.output), "--device", device, "--backend", args.backend,
               "--num-parts", str(num_parts), "--part-id", str(part_id), "--precision", args.precision]
    for flag in ("tta", "save_probabilities", "save_gates", "skip_existing", "uncertainty", "preview", "dicom_seg"):
        if getattr(args, flag):
            command.append("--" + flag.replace("_", "-"))
    for option in ("overlap", "sw_batch_size", "postprocessing"):
        if getattr(args, option) is not None:
            command += ["--" + option.replace("_", "-"), str(getattr(args, option))]
    return command


def run_devices(args: argparse.Namespace) -> int:
    """One `seg predict` process per device of `--devices`, each its part; then one `summary.csv`.

    Worker j of node part I (of N) predicts part I * k + j of N * k, so `--num-parts/--part-id` (nodes, e.g. a
    SLURM array) and `--devices` (GPUs of a node) compose. A GPU worker sees only its GPU (`CUDA_VISIBLE_DEVICES`).
    """
    devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    bad = [d for d in devices if d != "cpu" and not d.isdigit()]
    if not devices or bad:
        raise SegError(f"--devices takes GPU indices or cpu, comma separated (0,1,2,3); got {args.devices!r}")
    k = len(devices)
    num_parts = args.num_parts * k
    shard([], args.num_parts, args.part_id)
    workers = []
    for j, device in enumerate(devices):
        env = dict(os.environ)
        if device != "cpu":
            env["CUDA_VISIBLE_DEVICES"] = device
        command = worker_command(args, "cpu" if device == "cpu" else "cuda", args.part_id * k + j, num_parts)
        workers.append(subprocess.Popen(command, env=env))
    codes = [w.wait() for w in workers]
    merged = merge_summaries(Path(args.output), num_parts, required=args.num_parts == 1)
    where = merged or f"{Path(args.output)}/summary.part-*-of-{num_parts}.csv (merged once every node is done)"
    print(f"seg predict: {k} workers done (exit codes {', '.join(map(str, codes))}); summary: {where}",
          file=sys.stderr)
    return max(codes, default=0) and 1


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    if args.merge_summaries:
        print(f"seg predict: merged {args.num_parts} parts into {merge_summaries(Path(args.output), args.num_parts)}",
              file=sys.stderr)
        return 0
    missing = [name for name in ("checkpoint", "input") if getattr(args, name) is None]
    if missing:
        raise SegError(f"--{missing[0]} is required (except with --merge-summaries)")
    if args.devices:
        return run_devices(args)
    results = predict_folder(args.checkpoint, args.input, args.output, device=args.device, tta=args.tta,
                             save_probabilities=args.save_probabilities, save_gates=args.save_gates,
                             overlap=args.overlap, sw_batch_size=args.sw_batch_size,
                             skip_existing=args.skip_existing, postprocessing=args.postprocessing,
                             backend=args.backend, num_parts=args.num_parts, part_id=args.part_id,
                             uncertainty=args.uncertainty, preview=args.preview, dicom_seg=args.dicom_seg,
                             precision=args.precision)
    summary = Path(args.output) / SUMMARY
    if args.num_parts > 1:
        part = part_summary(Path(args.output), args.part_id, args.num_parts)
        done = all(part_summary(Path(args.output), i, args.num_parts).is_file() for i in range(args.num_parts))
        summary = f"{part}" + (f"; every part done, merged: {summary}" if done else "")
    counts = {s: sum(r.status == s for r in results) for s in ("ok", "partial", "failed", "skipped", "ignored")}
    partial = f", {counts['partial']} with an output missing" if counts["partial"] else ""
    ignored = f", {counts['ignored']} other files ignored" if counts["ignored"] else ""
    print(f"seg predict: {counts['ok'] + counts['partial']} predicted{partial}, {counts['failed']} failed, "
          f"{counts['skipped']} skipped{ignored} in {time.perf_counter() - start:.1f} s; summary: {summary}",
          file=sys.stderr)
    return 1 if counts["failed"] or counts["partial"] else 0
