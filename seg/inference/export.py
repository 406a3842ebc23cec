"""`seg export`: a `seg fit` checkpoint's network as an ONNX model, with seg's settings in its metadata.

    seg export --checkpoint runs/x/checkpoints/best.ckpt --output model.onnx [--gates]
    seg predict --backend onnxruntime --checkpoint model.onnx --input scans/ --output predictions/

Dynamic batch and spatial axes; the preprocessing, class names, spatial dims, window and seg version as JSON
strings in `metadata_props`; checked with `onnx.checker` and compared with PyTorch on random windows before it is
written (atomically). Needs `pip install seg[onnx]`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from seg.errors import SegError
from seg.inference.checkpoint import load_trained_model
from seg.inference.onnx_model import TOLERANCE, export_onnx, require


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", "-c", required=True, help="a checkpoint written by `seg fit`")
    parser.add_argument("--output", "-o", required=True, type=Path, help="the .onnx file to write")
    parser.add_argument("--gates", action="store_true",
                        help="also output the attention-gate (gate_<level>) and CBAM (cbam_<level>) maps, so that "
                             "`seg predict --save-gates` works on the ONNX model")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE,
                        help=f"largest max abs logit difference ONNX Runtime vs PyTorch accepted (default {TOLERANCE:g})")


def run(args: argparse.Namespace) -> int:
    require("onnx")
    require("onnxruntime")  # before the checkpoint is read: the missing package is the first thing to fix
    if args.output.suffix != ".onnx":
        raise SegError("the output must end in .onnx", args.output)
    if not args.output.parent.is_dir():
        raise SegError("the output's folder does not exist", args.output.parent)
    model = load_trained_model(args.checkpoint, map_location="cpu")
    data, difference = export_onnx(model, args.output, gates=args.gates, tolerance=args.tolerance)
    print(f"seg export: {args.output} ({len(data) / 2**20:.1f} MB); ONNX Runtime vs PyTorch max abs difference "
          f"{difference:.2e} on random windows", file=sys.stderr)
    return 0
