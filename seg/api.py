"""The Python API: `seg.predict`, `seg.load` and `seg.plan`, the commands' work for a notebook or a pipeline.

    import seg
    result = seg.predict("best.ckpt", "scan.nii.gz")              # one scan: result.label, result.report
    model = seg.load("runs/cv", device="cuda")                     # load once (here a `seg cv` ensemble) ...
    for image in images:                                            # ... predict many (nibabel images)
        label = model.predict(image).label
    config = seg.plan("Task04_Hippocampus").config                 # what `seg plan` writes, reasons included

`predict` runs `seg predict`'s own folder run (`seg.inference.folder.predict_folder`): the same cases, outputs,
report and errors (the `seg.errors.SegError` family). Without `output` it writes into a temporary folder that is
removed before it returns; an in-memory image is written there first, as `<case_id>.nii.gz` (the label map comes
back on its grid and header). TotalSegmentator's `python_api` does the same.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from seg.errors import DataError, SegError
from seg.inference.cases import CaseResult
from seg.inference.folder import load_predictor, predict_folder
from seg.inference.outputs import output_stem
from seg.inference.predictor import Predictor

# predict_folder's options that are the model's, fixed when it is loaded (`load`); the rest are per call
LOAD_OPTIONS = ("device", "tta", "overlap", "sw_batch_size", "backend", "precision", "postprocessing")


@dataclass
class Prediction:
    """What `predict` returns.

    Attributes:
        labels: case id -> label map (uint8 below 257 classes) on the input's grid, with the input's header; the
            cases that have one ("ok", "partial", "skipped").
        reports: case id -> the case's report (statistics per class, quality flags, uncertainty), as in report.json.
        results: every case's `CaseResult` (status, message, volumes, outputs), as the rows of summary.csv.
    """

    labels: dict[str, nib.Nifti1Image] = field(default_factory=dict)
    reports: dict[str, dict] = field(default_factory=dict)
    results: list[CaseResult] = field(default_factory=list)

    @property
    def label(self) -> nib.Nifti1Image:
        """The label map of a prediction of one case."""
        return self.labels[self._only()]

    @property
    def report(self) -> dict:
        """The report of a prediction of one case."""
        return self.reports[self._only()]

    def _only(self) -> str:
        if len(self.labels) != 1:
            raise SegError(f"this prediction has {len(self.labels)} label maps; use .labels[case_id]")
        return next(iter(self.labels))


class Model:
    """A loaded model (`load`): predict with it many times without reading the checkpoint again.

    Attributes:
        predictor: the `seg.inference.predictor.Predictor` (device, TTA, window, precision).
        postprocessing: the postprocessing.json applied to every label map, or None.
        name: how report.json and the DICOM SEG name the model (the checkpoint files' names).
    """

    def __init__(self, predictor: Predictor, postprocessing: str | os.PathLike | None = None,
                 name: str = "in-memory model"):
        self.predictor, self.postprocessing, self.name = predictor, postprocessing, name

    @property
    def class_names(self) -> list[str]:
        return self.predictor.class_names

    def predict(self, input, output: str | os.PathLike | None = None, *, affine: np.ndarray | None = None,
                case_id: str = "image", progress: bool = False, **options) -> Prediction:
        """Segment `input`: a scan's path, a folder (as `seg predict --input`), a nibabel image, or an array with
        `affine` (4 x 4, voxel to RAS mm; a 4D array is channels last). With `output` the files of `seg predict`
        are written there; `options` are `predict_folder`'s (`save_probabilities`, `save_gates`, `uncertainty`,
        `preview`, `skip_existing`, ...). One scan (a path or an image) that cannot be predicted raises its
        `SegError`; a folder's failed cases are results, as in summary.csv.
        """
        moved = sorted(set(options) & set(LOAD_OPTIONS))
        if moved:
            raise TypeError(f"{', '.join(moved)}: an option of the model; give it to seg.load")
        with tempfile.TemporaryDirectory(prefix="seg-predict-") as scratch:
            scratch = Path(scratch)
            if isinstance(input, (str, os.PathLike)):
                source = Path(input)
                if affine is not None:
                    raise SegError("affine= is for an array input; a file has its own")
            else:
                source = scratch / "input" / f"{output_stem(case_id)}.nii.gz"
                source.parent.mkdir()
                nib.save(as_image(input, affine), source)
            out = Path(output) if output is not None else scratch / "output"
            results = predict_folder(self.predictor, source, out, progress=progress,
                                     postprocessing=self.postprocessing, checkpoint_name=self.name, **options)
            prediction = Prediction(results=results)
            for r in results:
                if r.status in ("ok", "partial", "skipped"):
                    prediction.labels[r.case_id] = in_memory(out / f"{output_stem(r.case_id)}.nii.gz")
                    prediction.reports[r.case_id] = r.report
        if not source.is_dir():
            failed = next((r for r in results if r.status == "failed"), None)
            if failed is not None:
                raise SegError(failed.message)
        return prediction


def load(checkpoint, device: str = "auto", tta: bool = False, overlap: float | None = None,
         sw_batch_size: int | None = None, backend: str = "pytorch", precision: str = "auto",
         postprocessing: str | os.PathLike | None = None) -> Model:
    """Load a model once: a `seg fit` checkpoint, several (an ensemble), a `seg cv` folder (its folds and its
    postprocessing) or, with `backend="onnxruntime"`, a `.onnx` from `seg export`. The options are those of
    `seg predict` (`--device`, `--tta`, `--overlap`, `--sw-batch-size`, `--backend`, `--precision`,
    `--postprocessing`)."""
    predictor, checkpoints, implied = load_predictor(checkpoint, device, tta, overlap, sw_batch_size, backend,
                                                     precision)
    return Model(predictor, postprocessing if postprocessing is not None else implied,
                 ", ".join(p.name for p in checkpoints))


def predict(checkpoint, input, output: str | os.PathLike | None = None, **options) -> Prediction:
    """`seg predict` as a function: `load(checkpoint, ...)` then `Model.predict(input, output, ...)`; `options`
    are both's (see `Model.predict`). `checkpoint` may be a loaded `Model`."""
    loading = {k: options.pop(k) for k in LOAD_OPTIONS if k in options}
    model = checkpoint if isinstance(checkpoint, Model) else load(checkpoint, **loading)
    if loading and isinstance(checkpoint, Model):
        raise TypeError(f"{', '.join(loading)}: options of seg.load; this model is loaded already")
    return model.predict(input, output, **options)


def as_image(image, affine: np.ndarray | None) -> nib.Nifti1Image:
    """A nibabel image for an in-memory input (an image, or an array with its affine)."""
    if isinstance(image, nib.spatialimages.SpatialImage):
        if affine is not None:
            raise SegError("affine= is for an array input; a nibabel image has its own")
        return image if isinstance(image, nib.Nifti1Image) else nib.Nifti1Image.from_image(image)
    if not isinstance(image, np.ndarray):
        raise DataError(f"cannot predict a {type(image).__name__}: give a path, a folder, a nibabel image or an "
                        "array with affine=")
    if affine is None or np.shape(affine) != (4, 4):
        raise DataError(f"an array input needs affine= (4 x 4, voxel to RAS mm); got {affine!r:.60}")
    return nib.Nifti1Image(image, np.asarray(affine, dtype=float))


def in_memory(path: Path) -> nib.Nifti1Image:
    """The NIfTI at `path`, read completely: it outlives the file (a temporary folder)."""
    image = nib.load(path)
    return nib.Nifti1Image(np.asarray(image.dataobj), image.affine, image.header)


@dataclass
class Plan:
    """What `plan` returns.

    Attributes:
        decisions: every planned value with its reason (`seg.data.plan.Decision`: key, value, reason).
        config: the config `seg plan` writes, as a dict (LightningCLI sections; `data.plan` holds the reasons).
        yaml: the YAML text `seg plan` writes, reasons as comments.
    """

    decisions: list
    config: dict
    yaml: str


def plan(root: str | os.PathLike, output: str | os.PathLike | None = None, device: str = "cpu",
         gpu_memory: float = 10.0, minutes: float | None = None, dims: str = "auto") -> Plan:
    """`seg plan` as a function: the training config for the dataset at `root`, each value with its reason; with
    `output`, the YAML is written there too. A dataset `seg check-data` rejects raises `DataError` (every problem)."""
    from seg.data.plan import plan_config, plan_dataset, render_yaml, write_plan

    decisions = plan_dataset(root, device=device, gpu_memory=gpu_memory, minutes=minutes, dims=dims)
    text = render_yaml(decisions, root)
    if output is not None:
        write_plan(output, text)
    return Plan(decisions, plan_config(decisions, root), text)
