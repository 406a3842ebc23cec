"""Predict one scan with a trained model, in the scan's own geometry: label map, probabilities, gate maps.

The path is the validation path run forwards and then backwards: `inference_transforms` (the checkpoint's
own preprocessing) -> sliding-window inference with Gaussian blending (`seg.inference.window.WindowInference`,
optionally mirrored window by window; for labels alone in slabs when the volume is big) ->
`monai.transforms.Invertd` back to the scan's grid. The three stages are separate methods (`load`, `infer`,
`to_original`) so that a folder runner can overlap them. Nothing here needs Lightning.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Invertd

from seg import hardware
from seg.data.checks import time_series
from seg.data.guard import guard_file, load_header
from seg.data.layout import strip_nifti_suffix
from seg.data.preprocessing import check_preprocessing
from seg.data.transforms import inference_transforms
from seg.errors import CheckpointError, DataError, SegError
from seg.inference.checkpoint import MAX_OVERLAP, TrainedModel, load_trained_model
from seg.inference.slabs import class_indices, stitch_budget


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """"auto" -> the GPU when there is one, else the CPU; refuses "cuda" on a machine without one."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise SegError(f"unknown device '{device}'; use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SegError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    return device


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The `torch.autocast` dtype of the network for `precision` on `device`; None: float32 throughout.

    "auto": float16 on a GPU; bfloat16 on a CPU with native bf16 instructions (`seg.hardware.cpu_bf16_units`:
    AMX or AVX-512 BF16, the hippocampus network's window 3.1x or 2.0x faster), else float32.
    The stitching, softmax and argmax stay float32 either way.
    """
    if precision not in PRECISIONS:
        raise SegError(f"unknown precision '{precision}'; use {', '.join(PRECISIONS)}")
    if precision == "auto":
        if device.type == "cuda":
            return torch.float16
        return torch.bfloat16 if device.type == "cpu" and hardware.cpu_bf16_units() else None
    if precision == "fp16" and device.type == "cpu":
        raise SegError("--precision fp16 runs on a GPU; on the CPU use bf16 or fp32")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def label_dtype(num_classes: int) -> np.dtype:
    """The smallest unsigned integer type that holds every class index (of the written label map)."""
    return np.dtype(np.uint8 if num_classes <= 256 else np.uint16)


@dataclass
class LoadedScan:
    """A scan after preprocessing, ready for the network.

    Attributes:
        case_id: the case name.
        paths: its file(s), one per channel or one 4D file.
        reference: the first file as a lazy nibabel image: the grid (shape, affine, header) outputs are written in.
        data: the transforms' output dict; `data["image"]` is `(C, *S)` float32 with its applied operations.
        seconds: time spent loading and preprocessing.
    """

    case_id: str
    paths: list[Path]
    reference: nib.Nifti1Image
    data: dict
    seconds: float = 0.0

    def release_image(self) -> None:
        """Drop the voxels of the preprocessed image, keeping what `Invertd` needs (its meta and applied operations).

        Call after `Predictor.infer` when the scan waits to be written, so that a queue of scans holds labels,
        not images.
        """
        image = self.data["image"]
        self.data["image"] = MetaTensor(torch.empty(0), meta=image.meta,
                                        applied_operations=image.applied_operations)


@dataclass
class NetworkOutput:
    """The network's answer on the preprocessed grid (CPU tensors).

    Attributes:
        label: `(1, *S)` uint8/int16 class indices (argmax).
        probabilities: `(num_classes, *S)` float32 softmax, or None when not asked for.
        gates: "gate_<level>" -> `(1, *S)` float32 in [0, 1] (coarsest level first); empty when not asked for.
    """

    label: torch.Tensor
    probabilities: torch.Tensor | None = None
    gates: dict[str, torch.Tensor] = field(default_factory=dict)


@contextmanager
def _naming(scans: Sequence[LoadedScan]):
    """The engine's refusals (non-finite logits) name the scan, when there is one to name."""
    try:
        yield
    except SegError as err:
        if err.path is not None or len(scans) != 1:
            raise
        raise type(err)(str(err), scans[0].paths[0]) from None


class Predictor:
    """A trained model ready to segment scans one after another, with no work repeated per scan.

    The model is moved to the device once and the transforms are built once. The network runs under
    `torch.autocast` as `precision` says (`autocast_dtype`: by default float16 on a GPU, bfloat16 on a CPU with
    native bf16 instructions, else float32); stitching and softmax stay float32.

    Args:
        model: a `TrainedModel` (from `load_trained_model`): the network, its preprocessing and settings.
        device: "auto", "cpu", "cuda" or a torch device.
        tta: average the softmax over mirrored copies of every window: every combination of flips of the spatial
            axes the model was trained mirrored on (`TrainedModel.mirror_axes`; up to 8 for a 3D model, 4 for a 2D
            model: its two in-plane axes), window by window, so label maps still stream through slabs.
        overlap: sliding-window overlap; None keeps the model's own (`sw_overlap`).
        sw_batch_size: windows per forward pass; None keeps the model's own.
        precision: "auto", "fp32", "bf16" or "fp16" (GPU only) for the network's forward passes.
    """

    def __init__(self, model: TrainedModel, device: str | torch.device = "auto", tta: bool = False,
                 overlap: float | None = None, sw_batch_size: int | None = None, precision: str = "auto"):
        if not getattr(model, "preprocessing", None):
            raise SegError("the model has no preprocessing settings; load it with load_trained_model")
        check_preprocessing(model.preprocessing, model.hparams, None)  # a model built in memory is checked too
        if overlap is not None and not 0.0 <= overlap <= MAX_OVERLAP:  # NaN fails both comparisons too
            raise SegError(f"--overlap must be in [0, {MAX_OVERLAP}], got {overlap}: above it windows step by a "
                           "few voxels and a run may not end")
        if sw_batch_size is not None and sw_batch_size < 1:
            raise SegError(f"--sw-batch-size must be at least 1, got {sw_batch_size}")
        self.device = resolve_device(device)
        if not isinstance(model.network, torch.nn.Module):  # ONNX Runtime runs the exported float32 graph
            if precision not in ("auto", "fp32"):
                raise SegError(f"--precision {precision} needs the PyTorch backend; ONNX Runtime runs the exported "
                               "float32 model")
            precision = "fp32"
        self.autocast_dtype = autocast_dtype(self.device, precision)
        self.model = model.to(self.device)
        self.model.network.eval()
        self.tta = tta
        self.engine = model.inference(sw_batch_size, overlap, mirror=tta)
        self.preprocessing = dict(model.preprocessing)
        self.num_classes = model.num_classes
        self.in_channels = model.in_channels
        self.class_names = model.class_names
        self.transforms = inference_transforms(self.preprocessing)
        # nearest for class indices; the forward modes (bilinear for the image) for probabilities and gates
        self._invert_label = Invertd("pred", transform=self.transforms, orig_keys="image", nearest_interp=True)
        self._invert_float = Invertd("pred", transform=self.transforms, orig_keys="image", nearest_interp=False)

    @classmethod
    def from_checkpoint(cls, checkpoint: str | os.PathLike, device: str | torch.device = "auto",
                        backend: str = "pytorch", **kwargs) -> Predictor:
        """A Predictor for a `seg fit` checkpoint (weights-only loading; `CheckpointError` when unusable).

        With `backend="onnxruntime"` the network runs in ONNX Runtime: `checkpoint` is a `.onnx` from `seg export`,
        or a `seg fit` checkpoint exported in memory; "auto" is then the GPU only when onnxruntime-gpu is there.
        """
        if backend == "onnxruntime":
            from seg.inference.onnx_model import load_onnx_model, onnx_device

            return cls(load_onnx_model(checkpoint), device=onnx_device(device), **kwargs)
        if backend != "pytorch":
            raise SegError(f"unknown backend '{backend}'; use pytorch or onnxruntime")
        if Path(checkpoint).suffix == ".onnx":
            raise CheckpointError("an ONNX model runs with --backend onnxruntime", checkpoint)
        return cls(load_trained_model(checkpoint, map_location="cpu"), device=device, **kwargs)

    # ---- stage 1: files -> preprocessed tensor (CPU; safe to run in a background thread) --------------------
    def inspect(self, paths: Sequence[str | os.PathLike]) -> nib.Nifti1Image:
        """Check a case's files from their headers alone; returns the first as the reference image.

        Raises `DataError` naming the file for: not NIfTI / unreadable header, what the size guard refuses
        (`seg.data.guard`: a claim beyond the file or the memory, too big once resampled, RGB, complex, a
        zero-length axis), 2D or 5D+ data, a broken affine, a channel count the model does not take, channel
        files on different grids.
        """
        images = []
        for path in paths:
            image = load_header(path)
            shape = image.shape
            if len(shape) < 3 or (len(shape) == 3 and min(shape) < 1):
                raise DataError(f"image is {len(shape)}D with shape {tuple(shape)}; seg predict needs 3D volumes "
                                "(store a single slice as X x Y x 1)", path)
            if len(shape) > 4:
                raise DataError(f"image has {len(shape)} dimensions {tuple(shape)}; expected (X, Y, Z) or "
                                "(X, Y, Z, channels)", path)
            linear = image.affine[:3, :3]
            if not np.all(np.isfinite(image.affine)) or abs(np.linalg.det(linear)) < 1e-12:
                raise DataError("image has an invalid (singular or non-finite) affine; fix its sform/qform", path)
            # the header's claim against the file and the memory, and the size once resampled: no voxel read yet
            images.append(guard_file(path, self.preprocessing["spacing"], image=image))
        channels = sum(im.shape[3] if len(im.shape) == 4 else 1 for im in images)
        series = time_series(images[0].header) if len(images) == 1 else None
        if channels != self.in_channels and series:
            raise DataError(series, paths[0])
        if channels != self.in_channels:
            modalities = ", ".join(self.preprocessing.get("modalities") or [])
            raise DataError(f"scan has {channels} channel(s); the model expects {self.in_channels} ({modalities}): "
                            "give one file per channel (case_0000.nii.gz, case_0001.nii.gz, ...) or one 4D file",
                            paths[0])
        first = images[0]
        for path, image in zip(paths[1:], images[1:]):
            if image.shape[:3] != first.shape[:3] or not np.allclose(image.affine, first.affine, atol=1e-4):
                raise DataError(f"channel file is on another grid than {Path(paths[0]).name} "
                                f"(shape {image.shape[:3]} vs {first.shape[:3]}, or affine); resample it first", path)
        return first

    def load(self, paths: Sequence[str | os.PathLike], case_id: str | None = None) -> LoadedScan:
        """Read and preprocess a case: header checks, then the checkpoint's transforms (which refuse NaN/Inf).

        Args:
            paths: the case's file(s): one per channel (nnU-Net `_0000`, `_0001`, ...), or one file.
            case_id: its name; default: the first file's name without extension.
        """
        start = time.perf_counter()
        paths = [Path(p) for p in paths]
        if not paths:
            raise ValueError("a case needs at least one file")
        reference = self.inspect(paths)
        item = {"image": [os.fspath(p) for p in paths] if len(paths) > 1 else os.fspath(paths[0])}
        # one pass from file names: each step's input is dropped as soon as the next has its output
        item = self._apply(item)
        if min(item["image"].shape[1:]) < 1:
            raise DataError("image has no foreground (body) voxels to segment: all zero, or all air for CT", paths[0])
        name = case_id or strip_nifti_suffix(paths[0].name) or paths[0].name
        return LoadedScan(name, paths, reference, item, time.perf_counter() - start)

    def _apply(self, item: dict, start: int = 0, end: int | None = None) -> dict:
        """Run part of the transforms; a `SegError` raised inside comes out as itself, not wrapped by MONAI."""
        try:
            return self.transforms(item, start=start, end=end)
        except Exception as err:
            cause = err
            while cause is not None and not isinstance(cause, SegError):
                cause = cause.__cause__
            if cause is not None:
                raise cause from None
            raise

    # ---- stage 2: preprocessed tensor -> network output (the device) -------------------------------------------
    def fits_one_window(self, scan: LoadedScan) -> bool:
        """True when the whole preprocessed scan fits in one sliding window, so it can share a forward pass."""
        return all(size <= roi for size, roi in zip(scan.data["image"].shape[1:], self.engine.window))

    def infer(self, scan: LoadedScan, with_gates: bool = False, probabilities: bool = False,
              with_cbam: bool = False) -> NetworkOutput:
        """Sliding-window prediction (with mirroring when `tta`) on the preprocessed grid.

        Returns CPU tensors: the argmax label, and when asked the softmax probabilities and gate (and CBAM) maps.
        """
        return self.infer_batch([scan], with_gates, probabilities, with_cbam)[0]

    @torch.no_grad()
    def infer_batch(self, scans: Sequence[LoadedScan], with_gates: bool = False, probabilities: bool = False,
                    with_cbam: bool = False) -> list[NetworkOutput]:
        """`infer` for several scans; those that each fit in one window share forward passes.

        Small scans (hippocampus crops, single slices) are padded to the window as `sliding_window_inference`
        pads them (zeros, split evenly) and stacked, so each gets the prediction it gets alone, at a fraction of
        the cost: a batch of one runs PyTorch's slow CPU path for small 3D convolutions (measured 1.4x per
        scan at batch 2 on the hippocampus model) and leaves a GPU idle.
        """
        if len(scans) > 1 and not all(self.fits_one_window(s) for s in scans):
            return [self.infer_batch([s], with_gates, probabilities, with_cbam)[0] for s in scans]
        images, crops = [], []
        for scan in scans:
            image = scan.data["image"].as_tensor()
            pad, crop = [], [slice(None)]
            if len(scans) > 1:
                for size, roi in zip(image.shape[1:], self.engine.window):
                    half = (roi - size) // 2
                    pad = [half, roi - size - half] + pad  # F.pad lists the last axis first
                    crop.append(slice(half, half + size))
                image = torch.nn.functional.pad(image, pad)
            images.append(image)
            crops.append(tuple(crop))
        # one scan: a view, not a stacked copy of what may be a whole CT
        batch = (images[0][None] if len(images) == 1 else torch.stack(images)).to(self.device, non_blocking=True)
        del images
        if not (with_gates or probabilities or with_cbam):
            # labels alone (mirrored or not): no full-size maps kept, slabs when they would outgrow the input
            with self._autocast(), _naming(scans):
                labels = self.engine.labels(batch, max_buffer_bytes=stitch_budget(batch))
            return [NetworkOutput(label=labels[i][crop].cpu()) for i, crop in enumerate(crops)]
        with self._autocast(), _naming(scans):
            out = self.engine.predict(batch, gates=with_gates or with_cbam, cbam=with_cbam, softmax=probabilities)
        scores = out.pop("scores")
        outputs = []
        for i, crop in enumerate(crops):
            score = scores[i][crop]
            outputs.append(NetworkOutput(
                label=class_indices(score[None])[0].cpu(),
                probabilities=score.float().cpu() if probabilities else None,
                gates={k: v[i][crop].float().clamp_(0, 1).cpu() for k, v in out.items()},
            ))
        return outputs

    @property
    def precision(self) -> str:
        """What the network runs in: "fp32", "bf16" or "fp16"."""
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.autocast_dtype]

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # ---- stage 3: network output -> the scan's own grid (CPU; safe in a background thread) ---------------------
    @torch.no_grad()
    def to_original(self, scan: LoadedScan, output: NetworkOutput) -> dict:
        """Invert the preprocessing (crop, resampling, reorientation) on the network output.

        Returns a dict of numpy arrays on the reference image's grid `(X, Y, Z)`:
            "label": class indices (uint8 below 257 classes);
            "probabilities": `(num_classes, X, Y, Z)` float32, when computed;
            "gate_<level>": `(X, Y, Z)` float32 in [0, 1], when computed;
            "reference": the reference nibabel image (lazy; its header and affine are the output's).
        """
        result = {"reference": scan.reference}
        label = self._invert(self._invert_label, scan, output.label.float())
        result["label"] = np.rint(label[0], out=label[0]).astype(label_dtype(self.num_classes))
        floats = ([output.probabilities] if output.probabilities is not None else []) + list(output.gates.values())
        if floats:
            # one resampling for every float map: probabilities and gates share the grid
            stacked = self._invert(self._invert_float, scan, torch.cat(floats, 0).float())
            start = 0
            if output.probabilities is not None:
                prob = stacked[: self.num_classes]
                # Outside the foreground crop the inverse pads zeros; there the scan is background.
                prob[0] = 1.0 - prob[1:].sum(0)
                result["probabilities"] = np.clip(prob, 0.0, 1.0)
                start = self.num_classes
            for i, key in enumerate(output.gates):
                result[key] = np.clip(stacked[start + i], 0.0, 1.0)
        return result

    def _invert(self, inverter: Invertd, scan: LoadedScan, tensor: torch.Tensor) -> np.ndarray:
        data = {"image": scan.data["image"], "pred": MetaTensor(tensor)}
        inverted = inverter(data)["pred"]
        array = inverted.as_tensor() if isinstance(inverted, MetaTensor) else torch.as_tensor(inverted)
        array = array.float().numpy()
        expected = tuple(scan.reference.shape[:3])
        if array.shape[1:] != expected:  # a bug, not a user error: the output would not overlay the scan
            raise RuntimeError(f"inverted map has shape {array.shape[1:]}, the scan {expected}")
        return array

    # ---- all three ---------------------------------------------------------------------------------------------
    def predict_case(self, image_paths: Sequence[str | os.PathLike] | str | os.PathLike, with_gates: bool = False,
                     probabilities: bool = False) -> dict:
        """Segment one case; everything in the ORIGINAL scan's space.

        Args:
            image_paths: one file, or the case's channel files in channel order.
            with_gates: also return the attention-gate maps "gate_<level>" (coarsest first), in [0, 1].
            probabilities: also return the softmax "probabilities" `(num_classes, X, Y, Z)`.

        Returns:
            see `to_original`; raises `DataError` naming the file for a scan that cannot be used.
        """
        if isinstance(image_paths, (str, os.PathLike)):
            image_paths = [image_paths]
        scan = self.load(image_paths)
        return self.to_original(scan, self.infer(scan, with_gates=with_gates, probabilities=probabilities))

