"""The folder run of `seg predict` (`predict_folder`): three stages that overlap, one case the unit of failure.

`FolderRun` does one case's steps (load, infer, finish: invert and write; or skipped, or failed); the overlap of the
stages and the progressive report.json are `seg.inference.stages`. The command is `seg.inference.predict`.
About 450 lines: `predict_folder`'s docstring documents every option of `seg predict`, and `FolderRun.finish`
keeps one case's outputs in their order (label map first, each later one partial on its own) in one place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np

from seg.data.guard import guard_file
from seg.errors import DataError, SegError, escape, first_line, one_line
from seg.inference import dicom, dicom_seg
from seg.inference.cases import CaseResult, find_cases, unreadable_reason
from seg.inference.ensemble import EnsembleNetwork, load_ensemble, resolve_checkpoints
from seg.inference.outputs import (SUMMARY, check_output_folder, class_volumes, clean_stale_tmp, colliding_cases,
                                   merge_summaries, output_paths, output_stem, part_summary, prepare_output_folder,
                                   save_like, shard, write_summary)
from seg.inference.predictor import LoadedScan, NetworkOutput, Predictor
from seg.inference.report import REPORT, case_report, console_lines, previous_reports
from seg.inference.stages import ReportLog, Stages
from seg.postprocessing import apply_postprocessing, load_postprocessing



class FolderRun:
    """One `predict_folder` call: the predictor, the output folder and what to save; per case `load`, `infer`,
    `finish` (or `skipped`, or `failed`). Use it in a `with` block: it removes its DICOM scratch folder at the end.

    Args:
        dicom_cases: the cases that are DICOM series: converted in `load` (into `scratch`, a hidden folder under the
            output folder, not /tmp: removed by `close`, or by the next run if this one is killed), SEG in `finish`.
        checkpoint_name: what the DICOM SEG's algorithm identification and the report name as the model.
    """

    def __init__(self, predictor: Predictor, output: Path, save_probabilities: bool, save_gates: bool, report,
                 postprocessing: dict | None = None, uncertainty: bool = False, preview: bool = False,
                 dicom_seg: bool = False, dicom_cases=(), checkpoint_name: str = "in-memory model"):
        self.predictor, self.output, self.report = predictor, output, report
        self.postprocessing = postprocessing
        self.save_probabilities, self.save_gates = save_probabilities, save_gates
        self.uncertainty, self.preview, self.dicom_seg = uncertainty, preview, dicom_seg
        levels = predictor.model.gate_levels
        self.gate_names = [f"gate_{i}" for i in range(levels)] if save_gates else []
        self.dicom_cases: set[str] = set(dicom_cases)
        self.checkpoint_name = checkpoint_name
        self.scratch = dicom.Scratch(output, self.dicom_cases) if self.dicom_cases else None

    def __enter__(self) -> FolderRun:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Remove the converted DICOM series."""
        if self.scratch is not None:
            self.scratch.cleanup()

    def paths(self, case_id: str) -> dict[str, Path]:
        """Every output of the case, by name: "label" first, then "probabilities", "gate_<i>", "preview", "dicom_seg"."""
        paths = output_paths(self.output, case_id, self.save_probabilities, self.gate_names)
        stem = output_stem(case_id)
        if self.preview:
            paths["preview"] = self.output / f"{stem}_preview.png"
        if self.dicom_seg and case_id in self.dicom_cases:
            paths["dicom_seg"] = self.output / f"{stem}_seg.dcm"
        return paths

    def failed(self, case_id: str, inputs: list[Path], err: BaseException, seconds: float = 0.0) -> CaseResult:
        """The "failed" result of a case that has no label map; never raises (a case is the unit of failure)."""
        message = describe(err, inputs[0] if inputs else self.output)
        self.report(message)
        for path in self.paths(case_id).values():  # an older output would pass for this scan's
            remove_quietly(path)
        return CaseResult(case_id, "failed", inputs, message, seconds)

    def load(self, case_id: str, paths: list[Path]) -> LoadedScan:
        for path in paths:  # checked again: a file swapped for a fifo since the folder was listed would block
            why = unreadable_reason(path)
            if why is not None:
                raise DataError(f"cannot read: {why}", path)
        if case_id not in self.dicom_cases:
            return self.predictor.load(paths, case_id)
        nifti = dicom.series_to_nifti(paths, self.scratch.path(case_id))
        try:
            scan = self.predictor.load([nifti], case_id)
        except SegError as err:  # name the series, not the temporary file
            raise DataError(str(err).replace(str(nifti), f"{escape(str(paths[0].parent))} (series {case_id})")) \
                from None
        return dataclasses.replace(scan, paths=paths)  # the series' files, not the converted copy

    def infer(self, scans: list[LoadedScan]) -> tuple[list[NetworkOutput], float]:
        """Predict a group of scans; returns the outputs and the seconds per scan."""
        start = time.perf_counter()
        outputs = self.predictor.infer_batch(scans, with_gates=self.save_gates,
                                             probabilities=self.save_probabilities or self.uncertainty)
        for scan in scans:
            scan.release_image()  # from here on only its geometry is needed
        return outputs, (time.perf_counter() - start) / len(scans)

    def finish(self, scan: LoadedScan, output: NetworkOutput, seconds: float) -> CaseResult:
        """Invert to the scan's grid and write; runs in the writer thread.

        The label map comes first: without it the case has "failed". Each other output (probabilities, gate maps,
        the report, the preview, the DICOM SEG) that fails is named in the message, status "partial", and the others
        stay.
        """
        start = time.perf_counter()
        case_id = scan.case_id
        try:
            paths = self.paths(case_id)
            try:
                maps = self.predictor.to_original(scan, output)
                reference = maps["reference"]
                if self.postprocessing is not None:
                    apply_postprocessing(maps["label"], reference.affine, self.postprocessing)
                save_like(np.ascontiguousarray(maps["label"]), reference, paths["label"])
                volumes = class_volumes(maps["label"], reference.affine, self.predictor.class_names)
            except Exception as err:
                return self.failed(case_id, scan.paths, as_write_error(err, paths["label"]),
                                   seconds + time.perf_counter() - start)
            written, problems = [paths["label"]], {}

            def attempt(name: str, path: Path | None, write):
                """`write()`, or the reason it failed in `problems` (and no older file of that name left)."""
                try:
                    value = write()
                except Exception as err:
                    problems[name] = describe(as_write_error(err, path) if path else err, path or scan.paths[0])
                    if path is not None:
                        remove_quietly(path)
                    return None
                if path is not None:
                    written.append(path)
                return value

            for name, path in paths.items():
                if name in maps and name != "label":
                    # NIfTI keeps the components of the probabilities in the 4th dimension
                    array = np.moveaxis(maps[name], 0, -1) if name == "probabilities" else maps[name]
                    attempt(name, path, lambda: save_like(np.ascontiguousarray(array), reference, path))
            image = attempt("report", None, lambda: first_channel(reference))
            case = attempt("report", None, lambda: case_report(
                maps["label"], image, reference.affine, self.predictor.class_names, self.predictor.preprocessing,
                maps.get("probabilities"), dicom.modality(scan.paths[0]) if case_id in self.dicom_cases else None,
            )) if image is not None else None
            if "preview" in paths:
                attempt("preview", paths["preview"], lambda: self.write_preview(
                    case_id, first_channel(reference) if image is None else image, maps["label"], reference.affine,
                    paths["preview"]))
            if "dicom_seg" in paths:
                attempt("dicom_seg", paths["dicom_seg"], lambda: dicom_seg.write_segmentation(
                    maps["label"], reference.affine, scan.paths, self.predictor.class_names, paths["dicom_seg"],
                    algorithm=self.algorithm(), codes=self.predictor.preprocessing.get("codes")))
            del image, maps
        finally:
            if case_id in self.dicom_cases:
                with contextlib.suppress(Exception):  # the scratch copy only: the case's outputs are written
                    scan.reference.uncache()
                    self.scratch.path(case_id).unlink(missing_ok=True)
        message = ""
        if problems:
            message = one_line(f"{escape(str(paths['label']))}: written, but not " +
                               "; not ".join(f"the {name.replace('_', ' ')}: {why}" for name, why in problems.items()))
            self.report(message)
        return CaseResult(case_id, "partial" if problems else "ok", scan.paths, message,
                          seconds + time.perf_counter() - start, volumes, written, case or {})

    def write_preview(self, case_id: str, image: np.ndarray, label: np.ndarray, affine: np.ndarray,
                      path: Path) -> None:
        """`<case>_preview.png`: axial, coronal and sagittal views through the prediction, with its contours."""
        from seg.figure import render_overlay  # matplotlib: only when a preview is asked for

        modalities = self.predictor.preprocessing.get("modalities") or ()
        # dpi 100: at 60 the three views of a 122 x 101 x 30 CT were 548 x 226 pixels, their labels hard to read
        render_overlay(path, image, {}, affine, prediction=label, class_names=self.predictor.class_names,
                       title=case_id, dpi=100, modality=modalities[0] if modalities else None)

    def algorithm(self) -> dict:
        """How the DICOM SEG names the algorithm: seg, its version and the checkpoint."""
        from seg import __version__

        return {"name": "seg", "version": __version__, "checkpoint": self.checkpoint_name}

    def skipped(self, case_id: str, paths: list[Path], earlier: dict | None = None) -> CaseResult | None:
        """A result for a case whose outputs are all there already, else None (predict it).

        Its report is `earlier` (the case's entry in the earlier report.json), else computed again from the label
        map, the scan and the probabilities when saved (a run killed before its report had the case).
        """
        outputs = self.paths(case_id)
        try:
            if not all(p.is_file() for p in outputs.values()):
                return None
            image = nib.load(outputs["label"])
            label = np.asarray(image.dataobj)
            volumes = class_volumes(label, image.affine, self.predictor.class_names)
            report = earlier or self.report_from_files(case_id, paths, label, image.affine, outputs)
        except Exception:  # written atomically by us, so this is someone else's file: predict again
            return None
        return CaseResult(case_id, "skipped", paths, "", 0.0, volumes, list(outputs.values()), report)

    def report_from_files(self, case_id: str, paths: list[Path], label: np.ndarray, affine: np.ndarray,
                          outputs: dict[str, Path]) -> dict:
        """The report of a case predicted earlier, from its written label map (postprocessed), the scan (for the
        intensities; none for a DICOM series) and its probabilities when they were saved (else no uncertainty)."""
        image, modality, probabilities = None, None, None
        if case_id in self.dicom_cases:
            modality = dicom.modality(paths[0])
        else:
            image = first_channel(guard_file(paths[0]))
            if image.shape != label.shape:
                image = None
        if "probabilities" in outputs:
            probabilities = np.moveaxis(np.asarray(nib.load(outputs["probabilities"]).dataobj), -1, 0)
        return case_report(label, image, affine, self.predictor.class_names, self.predictor.preprocessing,
                           probabilities, modality)



def as_write_error(err: BaseException, path: Path) -> BaseException:
    """An OSError from writing `path` as the `SegError` naming it (disk full, a name the filesystem refuses)."""
    if isinstance(err, OSError) and not isinstance(err, SegError):
        return SegError(f"cannot write ({err.strerror or err})", path)
    return err


def describe(err: BaseException, path: Path) -> str:
    """One line for a case's failure: a `SegError`'s own message, else the error and where it was raised."""
    try:
        if isinstance(err, SegError):
            return one_line(str(err))
        # a bug or an unforeseen file: keep the run going, and keep where it came from on the line
        frames = traceback.extract_tb(err.__traceback__)
        where = f"; at {Path(frames[-1].filename).name}:{frames[-1].lineno} in {frames[-1].name}" if frames else ""
        return one_line(f"{escape(str(path))}: unexpected error ({type(err).__name__}: {first_line(err)}{where})")
    except Exception:  # an exception whose str() raises
        return one_line(f"{escape(str(path))}: unexpected error ({type(err).__name__})")


def remove_quietly(path: Path) -> None:
    """Remove an older output; one the filesystem refuses (a folder, a name too long) is left as it is."""
    with contextlib.suppress(OSError, ValueError):
        path.unlink(missing_ok=True)


def first_channel(reference: nib.Nifti1Image) -> np.ndarray:
    """The scan's first channel on its grid, in its own units (for the report's intensity statistics)."""
    data = reference.dataobj
    return np.asarray(data[..., 0] if len(reference.shape) == 4 else data, dtype=np.float32)



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
    checkpoint_name: str | None = None,
) -> list[CaseResult]:
    """Segment every scan of a folder (or one scan) and write the outputs and `summary.csv` into `output`.

    Args:
        checkpoint: a `seg fit` checkpoint, several (an ensemble), the output folder of `seg cv` (every fold's
            best checkpoint, and its postprocessing), or a ready `Predictor` (then `device`, `tta`, `overlap`,
            `sw_batch_size` and `precision` are its own).
        input: a folder of `.nii` / `.nii.gz` scans, or one scan, or a folder of DICOM series (recursively).
        output: the folder for predictions; created; must not be (inside) the input folder.
        device: "auto" (GPU when there is one), "cpu" or "cuda".
        tta: average over mirrored copies (8 in 3D, 4 for a 2D model) on the axes the model was trained
            mirrored on (`TrainedModel.mirror_axes`); none for a model trained without mirroring.
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
        checkpoint_name: how report.json and the DICOM SEG name the model (default: the checkpoint files' names;
            "in-memory model" for a `Predictor`).

    Returns:
        one `CaseResult` per case (of this part), in case order. Per-case problems are results, not exceptions; a bad
        checkpoint, input or output folder raises `SegError`.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    input_path, output = Path(input), Path(output)
    console = Console(stderr=True, quiet=not progress, soft_wrap=True, highlight=False)
    report = functools.partial(note, console)

    cases, results, ignored = find_cases(input_path)
    shard([], num_parts, part_id)  # the arguments, before anything is loaded
    check_output_folder(input_path, output)
    if not cases and not results:
        raise DataError("no .nii or .nii.gz scans (or DICOM image series) found", input_path)

    if isinstance(checkpoint, Predictor):
        predictor = checkpoint
    else:  # before the output folder is made: a bad checkpoint leaves nothing behind
        predictor, checkpoints, implied = load_predictor(checkpoint, device, tta, overlap, sw_batch_size, backend,
                                                         precision)
        postprocessing = postprocessing if postprocessing is not None else implied
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
    if predictor.tta:
        report(tta_line(predictor.model))
    if checkpoint_name is None:
        checkpoint_name = ("in-memory model" if isinstance(checkpoint, Predictor) else
                           ", ".join(Path(c).name for c in ([checkpoint] if isinstance(checkpoint, (str, os.PathLike))
                                                            else checkpoint)))
    with FolderRun(predictor, output, save_probabilities, save_gates, report, plan, uncertainty, preview, dicom_seg,
                   dicom_cases={case_id for case_id, paths in cases.items() if dicom.is_dicom(paths[0])},
                   checkpoint_name=checkpoint_name) as run:
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
        from seg import __version__

        # one report per process: each part of a sharded run writes its own (report.part-I-of-N.json)
        report_path = output / (REPORT if num_parts == 1 else
                                REPORT.replace(".json", f".part-{part_id}-of-{num_parts}.json"))
        meta = {"version": __version__, "checkpoint": run.checkpoint_name, "tta": predictor.tta,
                "tta_axes": list(predictor.model.mirror_axes) if predictor.tta else [],
                "precision": predictor.precision}
        by_case: dict[str, CaseResult] = {}
        extra = []  # a failed input named like another case (a dangling `x.nii.gz` beside `x.nii`) keeps its own row
        for r in results:
            if r.case_id in by_case or r.case_id in cases:
                extra.append(r)
            else:
                by_case[r.case_id] = r
        earlier = previous_reports(report_path, report) if skip_existing else {}
        todo = []
        for case_id, paths in cases.items():
            # its outputs are the earlier run's, and so is its report
            done = run.skipped(case_id, paths, earlier.get(case_id)) if skip_existing else None
            if done is not None:
                by_case[case_id] = done
            else:
                todo.append((case_id, paths))
        log = ReportLog(by_case, report_path, predictor.preprocessing, meta, report)

        columns = [TextColumn("[bold]predict"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.description}", markup=False)]  # a case named `[/x]` is not rich markup
        with Progress(*columns, console=console, transient=False) as bar, \
                ThreadPoolExecutor(1, thread_name_prefix="seg-load") as loader, \
                ThreadPoolExecutor(1, thread_name_prefix="seg-write") as writer:
            task = bar.add_task("", total=len(todo))
            try:
                Stages(run, log, bar, task, loader, writer).predict_all(todo)
                bar.update(task, description="done")
            finally:
                # an interrupted run abandons the loads not started and finishes the writes it started
                loader.shutdown(wait=True, cancel_futures=True)
                writer.shutdown(wait=True, cancel_futures=True)

    ordered = [by_case[c] for c in sorted(by_case)] + extra + ignored
    if num_parts == 1:
        write_summary(ordered, output / SUMMARY, predictor.class_names)
    else:
        write_summary(ordered, part_summary(output, part_id, num_parts), predictor.class_names)
        merge_summaries(output, num_parts, required=False)
    try:
        log.save(durable=True)
    except OSError as err:
        raise SegError(f"cannot write the report ({err.strerror or err})", report_path) from None
    for line in console_lines({c: by_case[c].report for c in sorted(by_case) if by_case[c].report}, report_path):
        report(line)  # out-of-distribution input and empty or fragmented predictions, where the user looks
    return ordered


def load_predictor(checkpoint, device: str = "auto", tta: bool = False, overlap: float | None = None,
                   sw_batch_size: int | None = None, backend: str = "pytorch", precision: str = "auto",
                   ) -> tuple[Predictor, list[Path], Path | None]:
    """The `Predictor` of `predict_folder`'s `checkpoint` (one, several: an ensemble, or a `seg cv` folder); also the
    checkpoint files and the postprocessing file a `seg cv` folder implies (or None)."""
    checkpoints, implied = resolve_checkpoints(checkpoint)
    if len(checkpoints) == 1:
        predictor = Predictor.from_checkpoint(checkpoints[0], device=device, tta=tta, overlap=overlap,
                                              sw_batch_size=sw_batch_size, backend=backend, precision=precision)
    elif backend != "pytorch":
        raise SegError(f"--backend {backend} runs one model; an ensemble of {len(checkpoints)} checkpoints runs "
                       "with the PyTorch backend")
    else:
        predictor = Predictor(load_ensemble(checkpoints), device=device, tta=tta, overlap=overlap,
                              sw_batch_size=sw_batch_size, precision=precision)
    return predictor, checkpoints, implied


def tta_line(model) -> str:
    """What `--tta` averages: the flips of the axes the model was trained mirrored on (`TrainedModel.mirror_axes`)."""
    axes, dims = model.mirror_axes, model.spatial_dims
    if len(axes) == dims:
        return f"--tta: averaging {2 ** dims} mirrored copies of every window"
    if not axes:
        return ("--tta: not mirroring: this model was trained without mirroring (data.flip_axes []), and flipped "
                "copies would be scans it has never seen; train with data.flip_axes to use --tta")
    return (f"--tta: averaging {2 ** len(axes)} copies mirrored on axes {list(axes)} only: those the model was "
            "trained mirrored on (data.flip_axes)")


def note(console, line: str) -> None:
    """One line of the run on stderr (quiet without `progress`)."""
    console.print(f"seg predict: {line}", markup=False)
