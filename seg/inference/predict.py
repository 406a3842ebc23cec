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
- `OUT/summary.csv`: status (ok / failed / skipped), seconds, error message, volume in ml per class and the
  report's columns (`seg.inference.report`); also a row for every folder entry that is not predicted: "failed"
  for a scan that cannot be read (dangling link, link loop, not a regular file), two files giving one case id, a
  case whose outputs would overwrite another's, or an unusable DICOM series; "ignored" for other files (and
  DICOM files that are not image slices). File names with control characters are written escaped (`repr`);
- `OUT/report.json`: the per-case report (statistics per class, quality flags, uncertainty).

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
import csv
import errno
import io
import os
import stat
import subprocess
import sys
import tempfile
import time
import traceback
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from seg.data.layout import case_channel, group_channel_files, strip_nifti_suffix
from seg.errors import DataError, SegError, escape, one_line
from seg.inference import dicom
from seg.io import remove_stale_temporaries, save_nifti, write_bytes
from seg.inference.ensemble import EnsembleNetwork, load_ensemble, resolve_checkpoints
from seg.inference.predictor import PRECISIONS, LoadedScan, NetworkOutput, Predictor
from seg.inference.report import (REPORT, case_report, previous_reports, summary_columns, summary_values,
                                  write_report)
from seg.postprocessing import apply_postprocessing, load_postprocessing

SUMMARY = "summary.csv"
# Predictions waiting to be written: one keeps the writer busy and memory near one scan's worth per stage.
# Scans are loaded one ahead of the model, or a whole group ahead while they are small enough to be predicted
# together (`Predictor.infer_batch`, groups of the model's `sw_batch_size`).
WRITE_QUEUE = 1


@dataclass
class CaseResult:
    """What happened to one case.

    Attributes:
        case_id: the case name (the output is `<case_id>.nii.gz`).
        status: "ok", "failed", "skipped" (output already there, `--skip-existing`) or "ignored" (not a scan).
        inputs: the case's input files.
        message: why it failed (one line, names the file), or "".
        seconds: load + predict + write time of this case.
        volumes_ml: foreground class name -> volume in ml on the input grid (empty when failed).
        outputs: files written.
        report: the case's report (`seg.inference.report.case_report`), empty unless predicted.
    """

    case_id: str
    status: str
    inputs: list[Path]
    message: str = ""
    seconds: float = 0.0
    volumes_ml: dict[str, float] = field(default_factory=dict)
    outputs: list[Path] = field(default_factory=list)
    report: dict = field(default_factory=dict)


# ---- finding cases ------------------------------------------------------------------------------------------------
def unreadable_reason(path: Path) -> str | None:
    """Why a folder entry cannot be read as a scan (dangling link, link loop, folder, fifo, no permission), or None."""
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "symbolic link loop"
        if path.is_symlink():
            return f"dangling symbolic link (to {escape(os.readlink(path))})"
        return f"cannot be read ({err.strerror or err})"
    if stat.S_ISDIR(mode):
        return "a folder, not a file"
    if not stat.S_ISREG(mode):
        return "not a regular file (a fifo, socket or device)"
    if not os.access(path, os.R_OK):
        return "not readable (permission denied)"
    return None


def find_cases(input_path: Path) -> tuple[dict[str, list[Path]], list[CaseResult], list[CaseResult]]:
    """The cases under `input_path` (a folder or one file), and every entry that is not one, with the reason.

    Returns:
        cases: case id -> files in channel order (nnU-Net `_0000` naming groups channel files);
        failed: inputs that cannot be predicted, one result each: a NIfTI name that is a dangling link, a link
            loop or not a regular file; channel files not numbered 0..n-1; two files that give one case id
            (`twin.nii` and `twin.nii.gz`, `case.nii.gz` and `case_0000.nii.gz`), none of them predicted;
        ignored: entries that are not NIfTI scans (other names, hidden files), status "ignored".

    A folder with DICOM files and no NIfTI scan at its top gives one case per DICOM series (`dicom_cases`).
    """
    failed, ignored = [], []
    if input_path.is_dir() and not any(strip_nifti_suffix(p.name) for p in input_path.iterdir()):
        tree = dicom.dicom_files(input_path)
        if tree[0]:
            return dicom_cases(input_path, tree)
    if input_path.is_dir():
        files = []
        for path in sorted(input_path.iterdir()):
            stem = strip_nifti_suffix(path.name)
            why = unreadable_reason(path)
            if path.name.startswith(".") or stem is None:
                reason = "hidden file" if path.name.startswith(".") else why or "not a .nii/.nii.gz file"
                ignored.append(CaseResult(path.name, "ignored", [path], f"{escape(str(path))}: skipped: {reason}"))
            elif why is not None:
                failed.append(CaseResult(stem, "failed", [path], f"{escape(str(path))}: cannot read: {why}"))
            else:
                files.append(path)
    else:
        why = unreadable_reason(input_path)
        if why is not None:
            raise DataError("input not found; give a folder of .nii.gz scans or one scan" if not
                            (os.path.lexists(input_path)) else f"cannot read the input: {why}", input_path)
        if strip_nifti_suffix(input_path.name) is None:
            raise DataError("is a DICOM file; give the folder holding its series" if dicom.is_dicom(input_path)
                            else "is not a NIfTI file (.nii or .nii.gz)", input_path)
        files = [input_path]
    # Grouped case by case, so that one case with a gap in its channel numbers does not stop the others.
    buckets: dict[str, list[Path]] = {}
    for path in files:
        buckets.setdefault(case_channel(strip_nifti_suffix(path.name))[0], []).append(path)
    cases = {}
    for case_id, paths in sorted(buckets.items()):
        twins = _same_channel(paths)
        if twins:
            names = " and ".join(escape(p.name) for p in twins)
            failed.append(CaseResult(case_id, "failed", paths, f"{escape(str(paths[0].parent))}: {names} both give "
                                     f"case '{escape(case_id)}'; none of them is predicted: rename or remove one"))
            continue
        try:
            cases.update(group_channel_files(paths))
        except DataError:
            if len(paths) == 1:  # a lone `scan_2024.nii.gz` is a scan, not channel 2024 of one
                cases[strip_nifti_suffix(paths[0].name)] = paths
            else:
                names = ", ".join(escape(p.name) for p in paths)
                failed.append(CaseResult(case_id, "failed", paths, f"{escape(str(paths[0].parent))}: case "
                                         f"'{escape(case_id)}' has channel files {names}; number them "
                                         f"{case_id}_0000, {case_id}_0001, ..."))
    return cases, failed, ignored


def dicom_cases(folder: Path, tree: tuple[list[Path], list[Path]],
                ) -> tuple[dict[str, list[Path]], list[CaseResult], list[CaseResult]]:
    """`find_cases` for a DICOM folder (its DICOM and other files): one case per usable image series."""
    series, skipped = dicom.find_series(folder, tree)
    failed = [CaseResult(s.name, s.status, s.paths, s.message) for s in skipped if s.status == "failed"]
    ignored = [CaseResult(s.name, s.status, s.paths, s.message) for s in skipped if s.status != "failed"]
    return series, failed, ignored


def _same_channel(paths: list[Path]) -> list[Path]:
    """The files of one bucket that would be the same channel of the same case (`x.nii` / `x.nii.gz` / `x_0000`)."""
    seen: dict[tuple[str, int], list[Path]] = {}
    for path in paths:
        seen.setdefault(case_channel(strip_nifti_suffix(path.name)), []).append(path)
    return next((group for group in seen.values() if len(group) > 1), [])


def colliding_cases(case_ids, output: Path, probabilities: bool, gate_names: list[str]) -> dict[str, str]:
    """Case id -> why its outputs would overwrite another case's (`p_probabilities` and `p`, `x_gate_0` and `x`)."""
    owners: dict[Path, list[str]] = {}
    for case_id in case_ids:
        for path in output_paths(output, case_id, probabilities, gate_names).values():
            owners.setdefault(path, []).append(case_id)
    why: dict[str, str] = {}
    for path, ids in owners.items():
        if len(ids) > 1:
            for case_id in ids:
                others = ", ".join(f"'{escape(i)}'" for i in ids if i != case_id)
                why.setdefault(case_id, f"{escape(str(path))}: would be written for case '{escape(case_id)}' and "
                                        f"for case {others}; neither is predicted: rename one of the scans")
    return why


def check_output_folder(input_path: Path, output: Path) -> None:
    """Refuse the input folder (or a folder inside it) and a file as the output folder."""
    source = input_path.resolve() if input_path.is_dir() else input_path.resolve().parent
    target = output.resolve()
    if target == source or source in target.parents:
        raise SegError(f"output folder {output} is {'the' if target == source else 'inside the'} input folder; "
                       "predictions must not mix with the scans: choose another --output")
    if output.exists() and not output.is_dir():
        raise SegError("output exists and is not a folder; choose another --output", output)


def prepare_output_folder(output: Path) -> None:
    """Create the output folder and make sure files can be written into it."""
    try:
        output.mkdir(parents=True, exist_ok=True)
        probe = output / f".tmp-{os.getpid()}-probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise SegError(f"cannot write to the output folder ({err.strerror or err}); check its permissions or "
                       "choose another --output", output) from None


def clean_stale_tmp(output: Path) -> list[Path]:
    """Remove temporary files left by runs that were killed (their process is gone); returns them."""
    return remove_stale_temporaries(output)


# ---- writing --------------------------------------------------------------------------------------------------------
def save_like(array: np.ndarray, reference: nib.Nifti1Image, path: Path) -> None:
    """Write `array` on the reference image's grid, atomically, keeping its header (`seg.io.save_nifti`).

    nibabel with the reference header rather than MONAI's SaveImage: the header keeps the input's sform and
    qform (matrices and codes) byte for byte, where SaveImage rebuilds them from a float affine.
    """
    save_nifti(array, reference.affine, path, reference=reference)


def output_paths(output: Path, case_id: str, probabilities: bool, gate_names: list[str]) -> dict[str, Path]:
    """Output name per map: "label", "probabilities", "gate_<level>"."""
    paths = {"label": output / f"{case_id}.nii.gz"}
    if probabilities:
        paths["probabilities"] = output / f"{case_id}_probabilities.nii.gz"
    for name in gate_names:
        paths[name] = output / f"{case_id}_{name}.nii.gz"
    return paths


def class_volumes(label: np.ndarray, affine: np.ndarray, class_names: list[str]) -> dict[str, float]:
    """Volume in ml of each foreground class: voxel count x voxel volume of the grid (|det| of the affine)."""
    voxel_ml = abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0
    counts = np.bincount(label.ravel(), minlength=len(class_names) + 1)
    return {name: float(counts[i + 1]) * voxel_ml for i, name in enumerate(class_names)}


def write_summary(results: list[CaseResult], path: Path, class_names: list[str]) -> None:
    """`summary.csv`, atomically: one row per case, volumes in ml per foreground class, the report's columns."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["case", "status", "seconds", *[f"volume_ml_{n}" for n in class_names],
                     *summary_columns(class_names), "inputs", "message"])
    for r in results:
        volumes = [f"{r.volumes_ml[n]:.3f}" if n in r.volumes_ml else "" for n in class_names]
        writer.writerow([escape(r.case_id), r.status, f"{r.seconds:.2f}", *volumes,
                         *summary_values(r.report, class_names),
                         ";".join(escape(p.name) for p in r.inputs), one_line(r.message)])
    write_atomic(buffer.getvalue(), path)


def write_atomic(data: str | bytes, path: Path, what: str = "the summary") -> None:
    """`data` into `path` under a temporary name beside it, then renamed: readers never see half a file."""
    try:
        write_bytes(path, data.encode() if isinstance(data, str) else data)
    except OSError as err:
        raise SegError(f"cannot write {what} ({err.strerror or err})", path) from None


# ---- sharding over processes, GPUs and nodes ------------------------------------------------------------------------
def shard(case_ids, num_parts: int, part_id: int) -> set[str]:
    """The case ids of part `part_id` of `num_parts`: nnU-Net's split, every `num_parts`-th of the sorted ids
    from `part_id` on, so every process of a job agrees on it without talking to the others."""
    if num_parts < 1 or not 0 <= part_id < num_parts:
        raise SegError(f"--part-id must be in [0, --num-parts) and --num-parts at least 1; got part {part_id} of "
                       f"{num_parts}")
    return set(sorted(set(case_ids))[part_id::num_parts])


def part_summary(output: Path, part_id: int, num_parts: int) -> Path:
    return output / f"summary.part-{part_id}-of-{num_parts}.csv"


def merge_summaries(output: Path, num_parts: int, required: bool = True) -> Path | None:
    """One `summary.csv` from the parts' `summary.part-<i>-of-<n>.csv`, rows in the order of an unsharded run.

    Returns its path, or None when a part's file is missing and not `required` (a `SegError` if it is).
    """
    output = Path(output)
    parts = [part_summary(output, i, num_parts) for i in range(num_parts)]
    missing = [p for p in parts if not p.is_file()]
    if missing:
        if required:
            raise SegError(f"part {parts.index(missing[0])} of {num_parts} has no summary yet: run it first "
                           "(--part-id), then merge", missing[0])
        return None
    header, rows = None, []
    for path in parts:
        with open(path, newline="") as f:
            table = list(csv.reader(f))
        if not table or (header is not None and table[0] != header):
            raise SegError("part summary is empty or has other columns than the first part's (another model?)", path)
        header = table[0]
        rows += table[1:]
    # as `predict_folder` orders them: cases by id (a failed twin beside its case), ignored files last
    rows.sort(key=lambda row: (row[1] == "ignored", row[0]))
    buffer = io.StringIO()
    csv.writer(buffer).writerows([header, *rows])
    write_atomic(buffer.getvalue(), output / SUMMARY)
    return output / SUMMARY


# ---- the folder runner -----------------------------------------------------------------------------------------------
class _Run:
    """One `predict_folder` call: the predictor, the output folder and what to save."""

    def __init__(self, predictor: Predictor, output: Path, save_probabilities: bool, save_gates: bool, report,
                 postprocessing: dict | None = None, uncertainty: bool = False, preview: bool = False,
                 dicom_seg: bool = False):
        self.predictor, self.output, self.report = predictor, output, report
        self.postprocessing = postprocessing
        self.save_probabilities, self.save_gates = save_probabilities, save_gates
        self.uncertainty, self.preview, self.dicom_seg = uncertainty, preview, dicom_seg
        levels = predictor.model.gate_levels
        self.gate_names = [f"gate_{i}" for i in range(levels)] if save_gates else []
        self.dicom_cases: set[str] = set()  # cases that are DICOM series: converted in `load`, SEG in `finish`
        self.scratch: Path | None = None  # a temporary folder for the converted series
        self.checkpoint_name = "in-memory model"  # the DICOM SEG's algorithm identification names it

    def paths(self, case_id: str) -> dict[str, Path]:
        paths = output_paths(self.output, case_id, self.save_probabilities, self.gate_names)
        if self.preview:
            paths["preview"] = self.output / f"{case_id}_preview.png"
        if self.dicom_seg and case_id in self.dicom_cases:
            paths["dicom_seg"] = self.output / f"{case_id}_seg.dcm"
        return paths

    def failed(self, case_id: str, inputs: list[Path], err: BaseException, seconds: float = 0.0) -> CaseResult:
        if isinstance(err, SegError):
            message = str(err)
        else:  # a bug or an unforeseen file: keep the run going, but show where it came from
            message = one_line(f"{escape(str(inputs[0]))}: unexpected error ({type(err).__name__}: {_first_line(err)})")
            self.report("".join(traceback.format_exception(err)).rstrip())
        self.report(message)
        for path in self.paths(case_id).values():  # an older output would pass for this scan's
            path.unlink(missing_ok=True)
        return CaseResult(case_id, "failed", inputs, message, seconds)

    def load(self, case_id: str, paths: list[Path]) -> LoadedScan:
        if case_id not in self.dicom_cases:
            return self.predictor.load(paths, case_id)
        nifti = dicom.series_to_nifti(paths, self.scratch / f"{case_id}.nii")
        try:
            scan = self.predictor.load([nifti], case_id)
        except SegError as err:  # name the series, not the temporary file
            raise DataError(str(err).replace(str(nifti), f"{escape(str(paths[0].parent))} (series {case_id})")) \
                from None
        scan.paths = paths
        return scan

    def infer(self, scans: list[LoadedScan]) -> tuple[list[NetworkOutput], float]:
        """Predict a group of scans; returns the outputs and the seconds per scan."""
        start = time.perf_counter()
        outputs = self.predictor.infer_batch(scans, with_gates=self.save_gates,
                                             probabilities=self.save_probabilities or self.uncertainty)
        for scan in scans:
            scan.release_image()  # from here on only its geometry is needed
        return outputs, (time.perf_counter() - start) / len(scans)

    def finish(self, scan: LoadedScan, output: NetworkOutput, seconds: float) -> CaseResult:
        """Invert to the scan's grid and write; runs in the writer thread."""
        start = time.perf_counter()
        try:
            maps = self.predictor.to_original(scan, output)
            reference = maps["reference"]
            if self.postprocessing is not None:
                apply_postprocessing(maps["label"], reference.affine, self.postprocessing)
            written = []
            paths = self.paths(scan.case_id)
            for name, path in paths.items():
                if name not in maps:
                    continue
                array = maps[name]
                if name == "probabilities":
                    array = np.moveaxis(array, 0, -1)  # NIfTI keeps the components in the 4th dimension
                save_like(np.ascontiguousarray(array), reference, path)
                written.append(path)
            volumes = class_volumes(maps["label"], reference.affine, self.predictor.class_names)
            image = first_channel(reference)
            modality = dicom.modality(scan.paths[0]) if scan.case_id in self.dicom_cases else None
            case = case_report(maps["label"], image, reference.affine, self.predictor.class_names,
                               self.predictor.preprocessing, maps.get("probabilities"), modality)
            if "preview" in paths:
                self.write_preview(scan.case_id, image, maps["label"], reference.affine, paths["preview"])
                written.append(paths["preview"])
            if "dicom_seg" in paths:
                dicom.write_segmentation(maps["label"], reference.affine, scan.paths, self.predictor.class_names,
                                         paths["dicom_seg"], algorithm=self.algorithm(),
                                         codes=self.predictor.preprocessing.get("codes"))
                written.append(paths["dicom_seg"])
            del image
        except Exception as err:
            if isinstance(err, OSError) and not isinstance(err, SegError):
                err = SegError(f"cannot write the prediction ({err.strerror or err})",
                               self.paths(scan.case_id)["label"])
            return self.failed(scan.case_id, scan.paths, err, seconds + time.perf_counter() - start)
        finally:
            if scan.case_id in self.dicom_cases:
                scan.reference.uncache()
                (self.scratch / f"{scan.case_id}.nii").unlink(missing_ok=True)
        return CaseResult(scan.case_id, "ok", scan.paths, "", seconds + time.perf_counter() - start, volumes, written,
                          case)

    def write_preview(self, case_id: str, image: np.ndarray, label: np.ndarray, affine: np.ndarray,
                      path: Path) -> None:
        """`<case>_preview.png`: axial, coronal and sagittal views through the prediction, with its contours."""
        from seg.figure import render_overlay  # matplotlib: only when a preview is asked for

        render_overlay(path, image, {}, affine, prediction=label, class_names=self.predictor.class_names,
                       title=case_id, dpi=60)

    def algorithm(self) -> dict:
        """How the DICOM SEG names the algorithm: seg, its version and the checkpoint."""
        from seg import __version__

        return {"name": "seg", "version": __version__, "checkpoint": self.checkpoint_name}

    def skipped(self, case_id: str, paths: list[Path]) -> CaseResult | None:
        """A result for a case whose outputs are all there already, else None."""
        outputs = self.paths(case_id)
        if not all(p.is_file() for p in outputs.values()):
            return None
        try:
            label = nib.load(outputs["label"])
            volumes = class_volumes(np.asarray(label.dataobj), label.affine, self.predictor.class_names)
        except Exception:  # written atomically by us, so this is someone else's file: predict again
            return None
        return CaseResult(case_id, "skipped", paths, "", 0.0, volumes, list(outputs.values()))


def first_channel(reference: nib.Nifti1Image) -> np.ndarray:
    """The scan's first channel on its grid, in its own units (for the report's intensity statistics)."""
    data = reference.dataobj
    return np.asarray(data[..., 0] if len(reference.shape) == 4 else data, dtype=np.float32)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def predict_folder(
    checkpoint: str | os.PathLike | list[str | os.PathLike] | Predictor,
    input: str | os.PathLike,
    output: str | os.PathLike,
    device: str = "auto",
    tta: bool = False,
    save_probabilities: bool = False,
    save_gates: bool = False,
    overlap: float | None = None,
    sw_batch_size: int | None = None,
    skip_existing: bool = False,
    progress: bool = True,
    postprocessing: str | os.PathLike | None = None,
    backend: str = "pytorch",
    num_parts: int = 1,
    part_id: int = 0,
    uncertainty: bool = False,
    preview: bool = False,
    dicom_seg: bool = False,
    precision: str = "auto",
) -> list[CaseResult]:
    """Segment every scan of a folder (or one scan) and write the outputs and `summary.csv` into `output`.

    Args:
        checkpoint: a `seg fit` checkpoint, several (an ensemble), the output folder of `seg cv` (every fold's
            best checkpoint, and its postprocessing), or a ready `Predictor` (then `device`, `tta`, `overlap`,
            `sw_batch_size` and `precision` are its own).
        input: a folder of `.nii` / `.nii.gz` scans, or one scan, or a folder of DICOM series (recursively).
        output: the folder for predictions; created; must not be (inside) the input folder.
        device: "auto" (GPU when there is one), "cpu" or "cuda".
        tta: average over mirrored copies (8 in 3D, 4 for a 2D model).
        save_probabilities: also write `<case>_probabilities.nii.gz` (X, Y, Z, classes).
        save_gates: also write `<case>_gate_<level>.nii.gz`.
        overlap: sliding-window overlap (None: the model's).
        sw_batch_size: windows per forward pass (None: the model's).
        skip_existing: leave cases whose outputs exist alone (resume an interrupted run).
        progress: show a progress bar and notes on stderr.
        postprocessing: a `postprocessing.json` (`seg cv`) to apply to every label map; default: the one of a
            `seg cv` folder given as `checkpoint`, else none.
        backend: "pytorch", or "onnxruntime" (`checkpoint` a `.onnx` from `seg export`, or a `.ckpt` exported in
            memory).
        num_parts, part_id: predict only part `part_id` of `num_parts` (`shard`), and write
            `summary.part-<part_id>-of-<num_parts>.csv`; `summary.csv` once every part's summary is there.
        uncertainty: compute the softmax (without saving it) for the report's entropy score.
        preview: also write `<case>_preview.png`.
        dicom_seg: also write `<case>_seg.dcm` (DICOM Segmentation) for each DICOM series.
        precision: the network's precision (`seg.inference.predictor.autocast_dtype`): "auto" (float16 on a GPU,
            bfloat16 on a CPU with AMX or AVX-512 BF16, else float32), "fp32", "bf16", "fp16".

    Returns:
        one `CaseResult` per case (of this part), in case order. Per-case problems are results, not exceptions; a bad
        checkpoint, input or output folder raises `SegError`.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    input_path, output = Path(input), Path(output)
    console = Console(stderr=True, quiet=not progress, soft_wrap=True, highlight=False)

    def report(line: str) -> None:
        console.print(f"seg predict: {line}", markup=False)

    cases, results, ignored = find_cases(input_path)
    shard([], num_parts, part_id)  # the arguments, before anything is loaded
    check_output_folder(input_path, output)
    if not cases and not results:
        raise DataError("no .nii or .nii.gz scans (or DICOM image series) found", input_path)

    if isinstance(checkpoint, Predictor):
        predictor = checkpoint
    else:  # before the output folder is made: a bad checkpoint leaves nothing behind
        checkpoints, implied = resolve_checkpoints(checkpoint)
        postprocessing = postprocessing if postprocessing is not None else implied
        if len(checkpoints) == 1:
            predictor = Predictor.from_checkpoint(checkpoints[0], device=device, tta=tta, overlap=overlap,
                                                  sw_batch_size=sw_batch_size, backend=backend, precision=precision)
        elif backend != "pytorch":
            raise SegError(f"--backend {backend} runs one model; an ensemble of {len(checkpoints)} checkpoints runs "
                           "with the PyTorch backend")
        else:
            predictor = Predictor(load_ensemble(checkpoints), device=device, tta=tta, overlap=overlap,
                                  sw_batch_size=sw_batch_size, precision=precision)
    if save_gates and isinstance(predictor.model.network, EnsembleNetwork):
        raise SegError("--save-gates needs one checkpoint: attention-gate maps are per model, not averaged")
    if save_gates and not getattr(predictor.model.network, "gate_outputs", True):
        raise SegError("--save-gates needs gate maps: this ONNX model was exported without them; export it again "
                       "with `seg export --gates`", None if isinstance(checkpoint, Predictor) else checkpoints[0])
    plan = None
    if postprocessing is not None:
        plan = load_postprocessing(postprocessing, range(1, predictor.num_classes))
    prepare_output_folder(output)
    clean_stale_tmp(output)
    for r in ignored:
        report(r.message)
    run = _Run(predictor, output, save_probabilities, save_gates, report, plan, uncertainty, preview, dicom_seg)
    run.dicom_cases = {case_id for case_id, paths in cases.items() if dicom.is_dicom(paths[0])}
    run.checkpoint_name = ("in-memory model" if isinstance(checkpoint, Predictor) else
                           ", ".join(Path(c).name for c in ([checkpoint] if isinstance(checkpoint, (str, os.PathLike))
                                                            else checkpoint)))
    # Before anything is predicted: a scan named `p_probabilities` would write over the probabilities of `p`.
    for case_id, why in colliding_cases(cases, output, save_probabilities, run.gate_names).items():
        results.append(CaseResult(case_id, "failed", cases.pop(case_id), why))
    if num_parts > 1:  # after the collisions, which are found across every part's cases
        mine = shard([*cases, *(r.case_id for r in results)], num_parts, part_id)
        cases = {c: paths for c, paths in cases.items() if c in mine}
        results = [r for r in results if r.case_id in mine]
        ignored = ignored if part_id == 0 else []
    for r in sorted(results, key=lambda r: r.case_id):
        report(r.message)
    by_case: dict[str, CaseResult] = {}
    extra = []  # a failed input named like another case (a dangling `x.nii.gz` beside `x.nii`) keeps its own row
    for r in results:
        if r.case_id in by_case or r.case_id in cases:
            extra.append(r)
        else:
            by_case[r.case_id] = r
    todo = []
    for case_id, paths in cases.items():
        done = run.skipped(case_id, paths) if skip_existing else None
        if done is not None:
            by_case[case_id] = done
        else:
            todo.append((case_id, paths))

    columns = [TextColumn("[bold]predict"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.description}")]
    group_size = max(1, predictor.engine.sw_batch_size)
    scratch = tempfile.TemporaryDirectory(prefix="seg-dicom-") if run.dicom_cases else None
    run.scratch = Path(scratch.name) if scratch is not None else None
    with Progress(*columns, console=console, transient=False) as bar, \
            ThreadPoolExecutor(1, thread_name_prefix="seg-load") as loader, \
            ThreadPoolExecutor(1, thread_name_prefix="seg-write") as writer:
        task = bar.add_task("", total=len(todo))
        writes: deque[tuple[str, Future]] = deque()

        def loaded():
            """(case_id, paths, scan or None, error or None) in order, loading ahead in the background."""
            queue: deque = deque()
            upcoming = iter(todo)

            def top_up(depth: int) -> None:
                while len(queue) < depth and (case := next(upcoming, None)) is not None:
                    queue.append((case, loader.submit(run.load, *case)))

            top_up(1)
            while queue:
                (case_id, paths), future = queue.popleft()
                try:
                    scan, error = future.result(), None
                except Exception as err:
                    scan, error = None, err
                del future
                # small scans go to the model a group at a time: keep a group loading; big ones one ahead
                top_up(group_size if scan is not None and predictor.fits_one_window(scan) else 1)
                yield case_id, paths, scan, error

        def collect(block_until: int) -> None:
            while len(writes) > block_until:
                case_id, future = writes.popleft()
                by_case[case_id] = future.result()
                bar.advance(task)

        def predict(group: list[LoadedScan]) -> None:
            if not group:
                return
            bar.update(task, description=", ".join(scan.case_id for scan in group))
            try:
                outputs, seconds = run.infer(group)
            except Exception as err:
                if len(group) > 1:  # find the scan to blame, and predict the others
                    for scan in group:
                        predict([scan])
                else:
                    by_case[group[0].case_id] = run.failed(group[0].case_id, group[0].paths, err)
                    bar.advance(task)
                group.clear()
                return
            collect(WRITE_QUEUE - 1)
            for scan, out in zip(group, outputs):
                writes.append((scan.case_id, writer.submit(run.finish, scan, out, scan.seconds + seconds)))
            group.clear()

        group: list[LoadedScan] = []
        try:
            for case_id, paths, scan, error in loaded():
                if error is not None:
                    by_case[case_id] = run.failed(case_id, paths, error)
                    bar.advance(task)
                elif not predictor.fits_one_window(scan):
                    predict(group)
                    predict([scan])
                else:
                    group.append(scan)
                    if len(group) == group_size:
                        predict(group)
                del scan
            predict(group)
            collect(0)
            bar.update(task, description="done")
        finally:
            group.clear()
            # an interrupted run abandons the loads not started and finishes the writes it started
            loader.shutdown(wait=True, cancel_futures=True)
            writer.shutdown(wait=True, cancel_futures=True)
            if scratch is not None:
                scratch.cleanup()

    ordered = [by_case[c] for c in sorted(by_case)] + extra + ignored
    earlier = previous_reports(output / REPORT) if skip_existing else {}
    for r in ordered:
        if r.status == "skipped" and isinstance(earlier.get(r.case_id), dict):
            r.report = earlier[r.case_id]  # its outputs are the earlier run's, and so is its report
    if num_parts == 1:
        write_summary(ordered, output / SUMMARY, predictor.class_names)
    else:
        write_summary(ordered, part_summary(output, part_id, num_parts), predictor.class_names)
        merge_summaries(output, num_parts, required=False)
    from seg import __version__

    # one report per process: each part of a sharded run writes its own (report.part-I-of-N.json)
    report_name = REPORT if num_parts == 1 else REPORT.replace(".json", f".part-{part_id}-of-{num_parts}.json")
    write_report({r.case_id: r.report for r in ordered if r.report}, output / report_name, predictor.preprocessing,
                 {"version": __version__, "checkpoint": run.checkpoint_name, "tta": predictor.tta,
                  "precision": predictor.precision})
    return ordered


# ---- command line ----------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("Report (summary.csv columns and OUT/report.json): per class volume_ml, voxels, mean and std "
                     "of the input intensity inside it, connected components; flags: empty, border, spacing, "
                     "intensity (CT only), uncertain.")
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
    parser.add_argument("--tta", action="store_true", help="average over mirrored copies (8x slower in 3D)")
    parser.add_argument("--save-probabilities", action="store_true",
                        help="also write <case>_probabilities.nii.gz: float32 (X, Y, Z, classes)")
    parser.add_argument("--save-gates", action="store_true",
                        help="also write the attention-gate maps <case>_gate_<level>.nii.gz (coarsest first)")
    parser.add_argument("--overlap", type=float, default=None,
                        help="sliding-window overlap in [0, 1) (default: the model's, usually 0.5)")
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
    counts = {s: sum(r.status == s for r in results) for s in ("ok", "failed", "skipped", "ignored")}
    ignored = f", {counts['ignored']} other files ignored" if counts["ignored"] else ""
    print(f"seg predict: {counts['ok']} predicted, {counts['failed']} failed, {counts['skipped']} skipped{ignored} in "
          f"{time.perf_counter() - start:.1f} s; summary: {summary}", file=sys.stderr)
    return 1 if counts["failed"] else 0
