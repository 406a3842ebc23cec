"""`seg export`: a `seg fit` checkpoint's network as an ONNX model, with seg's settings in its metadata.

    seg export --checkpoint runs/x/checkpoints/best.ckpt --output model.onnx [--gates]
    seg predict --backend onnxruntime --checkpoint model.onnx --input scans/ --output predictions/

Dynamic batch and spatial axes; the preprocessing, class names, spatial dims, window and seg version as JSON
strings in `metadata_props`; checked with `onnx.checker` and compared with PyTorch on random windows before it is
written (atomically). Needs `pip install seg[onnx]`.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from seg.errors import CheckpointError, SegError
from seg.inference.checkpoint import load_trained_model
from seg.inference.onnx_model import TOLERANCE, export_onnx, require


def tolerance(text: str) -> float:
    """`--tolerance`: a difference, so a finite number >= 0 (NaN would fail every export, a negative one too)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a number >= 0 (the largest max abs logit difference accepted), "
                                         f"got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", "-c", required=True, help="a checkpoint written by `seg fit`")
    parser.add_argument("--output", "-o", required=True, type=Path, help="the .onnx file to write")
    parser.add_argument("--gates", action="store_true",
                        help="also output the attention-gate (gate_<level>) and CBAM (cbam_<level>) maps, so that "
                             "`seg predict --save-gates` works on the ONNX model")
    parser.add_argument("--tolerance", type=tolerance, default=TOLERANCE,
                        help=f"largest max abs logit difference ONNX Runtime vs PyTorch accepted (default {TOLERANCE:g})")


def run(args: argparse.Namespace) -> int:
    require("onnx")
    require("onnxruntime")  # before the checkpoint is read: the missing package is the first thing to fix
    if args.output.suffix != ".onnx":
        raise SegError("the output must end in .onnx", args.output)
    if not args.output.parent.is_dir():
        raise SegError("the output's folder does not exist", args.output.parent)
    if Path(args.checkpoint).suffix.lower() == ".onnx":
        raise CheckpointError("is an ONNX model, not a checkpoint: `seg export` converts a `seg fit` checkpoint "
                              "(.ckpt); run the .onnx as it is with `seg predict --backend onnxruntime`",
                              args.checkpoint)
    model = load_trained_model(args.checkpoint, map_location="cpu")
    data, difference = export_onnx(model, args.output, gates=args.gates, tolerance=args.tolerance)
    print(f"seg export: {args.output} ({len(data) / 2**20:.1f} MB); ONNX Runtime vs PyTorch max abs difference "
          f"{difference:.2e} on random windows", file=sys.stderr)
    return 0
