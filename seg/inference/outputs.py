"""Where `seg predict` writes: output names and paths, the output folder, the label map's volumes, `summary.csv`,
and the split of the cases into parts (processes, GPUs, nodes) with the merge of their summaries."""

from __future__ import annotations

import csv
import hashlib
import io
import os
from pathlib import Path

import nibabel as nib
import numpy as np

from seg.errors import SegError, escape, one_line
from seg.inference.cases import CaseResult
from seg.inference.report import summary_columns, summary_values
from seg.io import remove_stale_temporaries, save_nifti, write_atomic

SUMMARY = "summary.csv"
# Output names start with at most this many UTF-8 bytes (`output_stem`): with the longest suffix
# (`_probabilities.nii.gz`) under 120, and under the 255 most filesystems allow with the temporary prefix too.
STEM_BYTES = 96


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


def output_stem(case_id: str) -> str:
    """What a case's output names start with: the case id where it is a plain file name of at most `STEM_BYTES`
    UTF-8 bytes, else it sanitised (path separators, control characters and a leading dot as `_`), cut to fit,
    and followed by `-` and 8 hex digits of the id's SHA-256: unique per id, the same in every run and part.
    """
    safe = "".join(c if c.isprintable() and c not in "/\\" else "_" for c in case_id)
    safe = "_" + safe[1:] if safe.startswith(".") else safe
    if case_id and safe == case_id and len(safe.encode()) <= STEM_BYTES:
        return case_id
    digest = hashlib.sha256(case_id.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    cut = safe.encode()[: STEM_BYTES - len(digest) - 1].decode("utf-8", "ignore")  # never half a character
    return f"{cut}-{digest}"


def output_paths(output: Path, case_id: str, probabilities: bool, gate_names: list[str]) -> dict[str, Path]:
    """Output name per map: "label", "probabilities", "gate_<level>", each `<output_stem(case_id)><suffix>`."""
    stem = output_stem(case_id)
    paths = {"label": output / f"{stem}.nii.gz"}
    if probabilities:
        paths["probabilities"] = output / f"{stem}_probabilities.nii.gz"
    for name in gate_names:
        paths[name] = output / f"{stem}_{name}.nii.gz"
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
                     *summary_columns(class_names), "inputs", "outputs", "message"])
    for r in results:
        volumes = [f"{r.volumes_ml[n]:.3f}" if n in r.volumes_ml else "" for n in class_names]
        writer.writerow([escape(r.case_id), r.status, f"{r.seconds:.2f}", *volumes,
                         *summary_values(r.report, class_names), ";".join(escape(p.name) for p in r.inputs),
                         ";".join(escape(p.name) for p in r.outputs), one_line(r.message)])
    write_atomic(buffer.getvalue(), path, "the summary")



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
    write_atomic(buffer.getvalue(), output / SUMMARY, "the summary")
    return output / SUMMARY

