"""Finding the cases of `seg predict`: one per scan (or nnU-Net channel group, or DICOM series) of the input, and
every folder entry that is not one, with the reason (`CaseResult` rows "failed" and "ignored")."""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from seg.data.layout import case_channel, group_channel_files, strip_nifti_suffix
from seg.errors import DataError, escape
from seg.inference import dicom


@dataclass
class CaseResult:
    """What happened to one case.

    Attributes:
        case_id: the case name (the output is `<output_stem(case_id)>.nii.gz`: the case id unless it is not a
            plain, short file name).
        status: "ok", "partial" (the label map is written, another output is not: `message` names it), "failed"
            (no label map), "skipped" (outputs already there, `--skip-existing`) or "ignored" (not a scan).
        inputs: the case's input files.
        message: why it failed (one line, names the file), or "".
        seconds: load + predict + write time of this case.
        volumes_ml: foreground class name -> volume in ml on the input grid (empty when failed).
        outputs: files written (for "skipped": there).
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
        if tree.found or tree.refused:
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


def dicom_cases(folder: Path, tree: dicom.DicomTree,
                ) -> tuple[dict[str, list[Path]], list[CaseResult], list[CaseResult]]:
    """`find_cases` for a DICOM folder (`dicom.dicom_files`): one case per usable image series."""
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

