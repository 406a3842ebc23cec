"""`seg overlays --checkpoint CKPT --input SCAN_OR_FOLDER --output DIR [--labels ...]`: gate maps, the overlay PNG
and concentration for any scan, without training (`seg.explain.export` per scan, the `Predictor` for the maps).

A bad scan is named in one line and skipped, as `seg predict` does; the exit code says that something failed.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np

from seg.errors import DataError, SegError, first_line
from seg.explain.export import CaseOverlay, _fmt, channel_title, export_case, map_order, write_concentration_csv
from seg.inference.report import case_report, console_lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, type=Path, help="a .ckpt written by `seg fit`")
    parser.add_argument("--input", required=True, type=Path,
                        help="a scan (.nii/.nii.gz) or a folder of scans (nnU-Net channel files _0000, _0001 grouped)")
    parser.add_argument("--output", required=True, type=Path, help="output folder: <output>/<case_id>/...")
    parser.add_argument("--labels", type=Path,
                        help="ground truth: a label file (with a single scan) or a folder of <case_id>.nii.gz; "
                             "adds contours, Dice and concentration.csv")
    parser.add_argument("--cbam", action="store_true", help="also export CBAM's spatial attention maps")
    parser.add_argument("--dilation-mm", type=float, default=2.0,
                        help="grow the ground truth by this many mm for the concentration (default 2)")
    parser.add_argument("--device", default="auto", help="auto (GPU when there is one), cpu or cuda")


def _label_path(labels: Path | None, case_id: str, single: bool) -> Path | None:
    from seg.data.layout import NIFTI_SUFFIXES

    if labels is None:
        return None
    if labels.is_file():
        if not single:
            raise DataError("a single label file goes with a single scan; give a folder of labels", labels)
        return labels
    if not labels.is_dir():
        raise DataError("no such file or folder", labels)
    found = next((labels / f"{case_id}{s}" for s in NIFTI_SUFFIXES if (labels / f"{case_id}{s}").is_file()), None)
    if found is None:
        raise DataError(f"no label for case '{case_id}' (expected {case_id}.nii.gz)", labels)
    return found


def _load_label(path: Path, reference: nib.Nifti1Image) -> np.ndarray:
    """A label volume on its scan's grid, as class indices; `DataError` naming the file otherwise."""
    try:
        image = nib.load(os.fspath(path))
        data = np.asarray(image.dataobj)
    except Exception as err:  # nibabel raises many types for files that are not NIfTI
        raise DataError(f"not a readable NIfTI label ({first_line(err)})", path) from None
    data = data.reshape(data.shape[:3]) if data.ndim == 4 and data.shape[3] == 1 else data
    if data.shape != reference.shape[:3] or not np.allclose(image.affine, reference.affine, atol=1e-3):
        raise DataError(f"label grid (shape {data.shape}) differs from its scan's ({reference.shape[:3]}, or the "
                        "affine); labels must be on the scan's grid", path)
    if not np.all(np.isfinite(data)):
        raise DataError("label has NaN or infinite values", path)
    return np.rint(data).astype(np.int16)


def overlay_scan(predictor, paths: Sequence[Path], case_id: str, folder: Path, label_path: Path | None = None,
                 cbam: bool = False, dilation_mm: float = 2.0) -> CaseOverlay:
    """Predict one scan with its gates in its own geometry (`Predictor`) and export its overlay files."""
    scan = predictor.load(paths, case_id)
    result = predictor.to_original(scan, predictor.infer(scan, with_gates=True, with_cbam=cbam))
    reference = result["reference"]
    label = _load_label(label_path, reference) if label_path is not None else None
    image = np.asarray(reference.dataobj, dtype=np.float32)
    image = image[..., 0] if image.ndim == 4 else image
    maps = {k: result[k] for k in map_order(result)}
    modalities = predictor.preprocessing.get("modalities") or ()
    overlay = export_case(folder, case_id, image, maps, reference.affine, result["label"], label,
                          predictor.class_names, dilation_mm,
                          image_title=channel_title(predictor.in_channels, modalities),
                          modality=modalities[0] if modalities else None)
    # the report `seg predict` writes, for the out-of-distribution lines `run` ends with
    return replace(overlay, report=case_report(result["label"], image, reference.affine, predictor.class_names,
                                               predictor.preprocessing))


def run(args: argparse.Namespace) -> int:
    import traceback

    from seg.errors import escape
    from seg.inference.cases import find_cases
    from seg.inference.predictor import Predictor

    # the same case finding as `seg predict`: every entry that is skipped is named, with the reason
    cases, broken, ignored = find_cases(args.input)
    if not cases and not broken:
        raise DataError("no NIfTI scans (.nii, .nii.gz) in this folder", args.input)
    predictor = Predictor.from_checkpoint(args.checkpoint, device=args.device)
    args.output.mkdir(parents=True, exist_ok=True)
    for r in ignored + broken:
        print(f"seg overlays: {'note' if r.status == 'ignored' else 'error'}: {r.message}", file=sys.stderr)
    results, failed = [], len(broken)
    for case_id, paths in cases.items():
        try:
            predictor.inspect(paths)  # the scan's own problems first: a broken scan is named, not its label
            label_path = _label_path(args.labels, case_id, single=args.input.is_file())
            results.append(overlay_scan(predictor, paths, case_id, args.output / case_id, label_path, args.cbam,
                                        args.dilation_mm))
        except Exception as err:  # one bad scan must not stop the others, as in `seg predict`
            failed += 1
            if not isinstance(err, SegError):  # a bug or an unforeseen file: show where it came from
                traceback.print_exception(err, file=sys.stderr)
                err = f"{escape(str(paths[0]))}: unexpected error ({type(err).__name__}: {err})"
            print(f"seg overlays: error: {' '.join(str(err).split())}", file=sys.stderr)
            continue
        print(f"{escape(case_id)}: {escape(str(results[-1].png))}" + "".join(
            f", concentration {k} {_fmt(v, 1)}" for k, v in results[-1].concentration.items()))
    if any(r.concentration for r in results):
        write_concentration_csv(args.output / "concentration.csv", results, predictor.class_names)
    for line in console_lines({r.case_id: r.report for r in results}):
        print(f"seg overlays: {line}", file=sys.stderr)
    return 1 if failed else 0
