"""The network as ONNX: export with seg's settings in the metadata, and an ONNX Runtime network for the engine.

`export_onnx` writes a `TrainedModel`'s network with dynamic batch and spatial axes of any size (padded in the
graph to the network's divisor and cropped back; optionally with the attention-gate and CBAM maps as extra
outputs) and everything inference needs in `metadata_props` (JSON strings: the preprocessing, the network's
settings, the class names, the window, the divisor, the input's layout, seg's version), so a `.onnx` file is as
self-sufficient as a `seg fit` checkpoint. `load_onnx_model` reads one back as a `TrainedModel` whose network is
an `OnnxNetwork`: callable on a torch window batch, returning torch logits, so `WindowInference`, the slabs and
`seg predict` run unchanged over ONNX Runtime.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from seg.data.guard import format_bytes, memory_limit
from seg.errors import CheckpointError, SegError, one_line
from seg.data.preprocessing import check_preprocessing
from seg.inference.checkpoint import NETWORK_DEFAULTS, TrainedModel, check_hyper_parameters, load_trained_model
from seg.inference.onnx_guard import check_onnx_model
from seg.io import parse_json, write_atomic

METADATA_FORMAT = 1
# The hyper-parameters a TrainedModel reads; the rest of a checkpoint's (lr, loss, ...) is training's business.
INFERENCE_HPARAMS = (*NETWORK_DEFAULTS, "roi_size", "sw_batch_size", "sw_overlap", "class_names", "mirror_axes")
TOLERANCE = 1e-3  # max abs logit difference ONNX Runtime vs PyTorch that export accepts (measured: ~1e-5)
INSTALL_HINT = "pip install seg[onnx]"


def require(module: str):
    """Import `onnx` or `onnxruntime`, or a one-line `SegError` that says how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise SegError(f"{module} is not installed; the ONNX export and backend need it: {INSTALL_HINT}") from None


def pad_to_multiple(x: torch.Tensor, multiple) -> torch.Tensor:
    """`x` `(N, C, *S)` with zeros after the end of every spatial axis up to a multiple of `multiple` (per axis).

    Zero is the mean of a normalised scan, and what sliding-window inference pads with. Written with the input's
    own sizes, so the tracer records Shape/Mod/Pad ops and the pads stay dynamic in the ONNX graph.
    """
    pad = []
    for size, m in zip(reversed(x.shape[2:]), reversed(tuple(multiple))):
        pad += [0, (m - size % m) % m]  # F.pad lists the last axis first
    return nn.functional.pad(x, pad)


def crop_like(y: torch.Tensor, sizes, padded) -> torch.Tensor:
    """`y` `(N, C, *G)`, computed on a grid `padded`, cut back to the part that covers `sizes`: the logits to
    `sizes` itself, a map on a coarser grid to `ceil(sizes * G / padded)` cells."""
    ends = [(s * g + p - 1) // p for s, g, p in zip(sizes, y.shape[2:], padded)]
    return y[(slice(None), slice(None), *(slice(0, e) for e in ends))]


class _Exported(nn.Module):
    """The network with flat outputs: logits, then (with `gates`) gate_0.. (coarsest first) and cbam_0.. maps.

    Any spatial size: the input is padded with zeros up to the network's divisor (`size_multiple`: the product of
    its strides) and every output cropped back, so a 37 x 41 x 29 scan runs as it is (unpadded, the gates' skip
    and upsampled grids disagree by a voxel and ONNX Runtime fails on a broadcast).
    """

    def __init__(self, network: nn.Module, gates: bool):
        super().__init__()
        self.network, self.gates = network, gates

    def forward(self, x: torch.Tensor):
        sizes = x.shape[2:]
        x = pad_to_multiple(x, self.network.size_multiple)
        padded = x.shape[2:]
        if not self.gates:
            return crop_like(self.network(x), sizes, padded)
        logits, gate_maps, cbam_maps = self.network.forward_with_gates(x, return_cbam=True)
        return tuple(crop_like(y, sizes, padded) for y in (logits, *gate_maps, *cbam_maps))


def output_names(network: nn.Module, example: torch.Tensor, gates: bool) -> list[str]:
    if not gates:
        return ["logits"]
    with torch.no_grad():
        _, gate_maps, cbam_maps = network.forward_with_gates(example, return_cbam=True)
    return ["logits", *[f"gate_{i}" for i in range(len(gate_maps))], *[f"cbam_{i}" for i in range(len(cbam_maps))]]


def input_layout(model: TrainedModel) -> dict:
    """What the graph's `image` input holds, for a runtime outside seg (the `seg.input` metadata).

    The graph is the network alone: the scan must already be preprocessed as `seg predict` does (reoriented,
    resampled, cropped to the body, each channel normalised as `normalization` says); any spatial size is taken.
    """
    pre = model.preprocessing
    spatial = ["x", "y", "z"][: model.spatial_dims]
    return {
        "axes": ["batch", "channel", *spatial],
        "channels": list(pre.get("modalities") or [f"channel_{i}" for i in range(model.in_channels)]),
        "dtype": "float32",
        "orientation": pre.get("orientation", "RAS"),
        "spacing_mm": pre.get("spacing"),
        "normalized": True,  # the graph does not normalise: feed it what `normalization` gives
        "normalization": pre.get("normalization"),
        "any_size": True,
        "padding": "zeros after the end of each spatial axis up to a multiple of seg.divisor, done in the graph; "
                   "the outputs are cropped back to the input's size",
        "output": "logits (batch, classes, *spatial); argmax over axis 1 gives class indices, 0 background, "
                  "c the class seg.class_names[c - 1]",
    }


def metadata(model: TrainedModel, outputs: list[str]) -> dict[str, str]:
    """The ONNX `metadata_props`: JSON strings a `seg` reader (or anyone) can parse."""
    from seg import __version__

    hparams = {k: model.hparams[k] for k in INFERENCE_HPARAMS if k in model.hparams}
    hparams.setdefault("roi_size", list(model.roi_size))
    values = {"seg.format": METADATA_FORMAT, "seg.version": __version__, "seg.preprocessing": model.preprocessing,
              "seg.hparams": hparams, "seg.class_names": model.class_names, "seg.spatial_dims": model.spatial_dims,
              "seg.roi_size": list(model.roi_size), "seg.outputs": outputs,
              "seg.divisor": list(model.network.size_multiple), "seg.input": input_layout(model)}
    return {k: json.dumps(v) for k, v in values.items()}


def export_onnx(model: TrainedModel, output: str | os.PathLike | None = None, gates: bool = False,
                tolerance: float = TOLERANCE) -> tuple[bytes, float]:
    """Export `model`'s network to ONNX, check it, and compare ONNX Runtime with PyTorch on random windows.

    Args:
        model: a `TrainedModel` (PyTorch network).
        output: the `.onnx` file, written atomically (temporary name beside it, then renamed); None: in memory only.
        gates: also output the gate maps `gate_<level>` and CBAM maps `cbam_<level>` (on their own grids).
        tolerance: the largest max abs logit difference accepted; above it a one-line `SegError`.

    Returns:
        the serialized model, and the max abs difference of every output on the random windows.
    """
    onnx = require("onnx")
    require("onnxruntime")
    network = model.network.eval().cpu()
    roi = list(model.roi_size)
    example = torch.randn(2, model.in_channels, *roi)
    names = output_names(network, example, gates)
    # the logits share the image's axes; a gate or CBAM map has the batch and a grid of its own
    spatial = range(model.spatial_dims)
    dynamic = {name: {0: "batch", **{2 + d: f"spatial_{d}" if name == "logits" else f"{name}_spatial_{d}" for d in spatial}}
               for name in ["image", *names]}
    dynamic["image"] = dynamic["logits"]
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer's warnings (shape comparisons traced as constants: the padded input is always a multiple
        # of the strides; instance norm in eval mode) are about cases that do not arise here; the comparison
        # below is the check that counts.
        warnings.simplefilter("ignore")
        # The TorchScript exporter: torch.export's (dynamo) needs onnxscript and specializes the gates' shape
        # comparison; this one traces the shapes as ONNX Shape ops, so batch and spatial axes stay dynamic.
        torch.onnx.export(_Exported(network, gates), (example,), buffer, input_names=["image"], output_names=names,
                          dynamic_axes=dynamic, dynamo=False, opset_version=17)
    proto = onnx.load_from_string(buffer.getvalue())
    for value in proto.graph.output[1:]:  # gate and CBAM maps: one channel (the tracer infers a symbol here)
        channel = value.type.tensor_type.shape.dim[1]
        channel.Clear()
        channel.dim_value = 1
    for key, value in metadata(model, names).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto, full_check=True)
    data = proto.SerializeToString()
    difference = max_difference(network, OnnxNetwork(data, names), model)
    if not difference <= tolerance:  # NaN fails too
        raise SegError(f"ONNX Runtime and PyTorch differ by {difference:.3g} (tolerance {tolerance:g}) on random "
                       "windows; the export is wrong, nothing written", output)
    if output is not None:
        write_atomic(data, Path(output), "the ONNX model")
    return data, difference


def max_difference(network: nn.Module, onnx_network: OnnxNetwork, model: TrainedModel) -> float:
    """Max abs difference of every output, PyTorch vs ONNX Runtime, on random inputs of two batch sizes and three
    sizes (the roi, the roi doubled along the first axis, and sizes that are no multiple of the divisor, padded in
    the graph): the dynamic axes and the padding are exercised, not just traced."""
    roi = list(model.roi_size)
    generator = torch.Generator().manual_seed(0)
    reference = _Exported(network, onnx_network.gate_outputs)
    worst = 0.0
    for batch, shape in ((3, roi), (1, [2 * roi[0], *roi[1:]]), (1, [r + 3 for r in roi])):
        x = torch.randn(batch, model.in_channels, *shape, generator=generator)
        with torch.no_grad():
            expected = reference(x)
            expected = list(expected) if isinstance(expected, tuple) else [expected]
            if onnx_network.gate_outputs:
                ort_logits, ort_gates, ort_cbam = onnx_network.forward_with_gates(x, return_cbam=True)
                got = [ort_logits, *ort_gates, *ort_cbam]
            else:
                got = [onnx_network(x)]
        worst = max([worst, *(float((a - b).abs().max()) for a, b in zip(expected, got))])
    return worst


class OnnxNetwork:
    """An exported seg network run by ONNX Runtime, with the interface `WindowInference` drives.

    `(n, C, *roi)` torch tensor -> `(n, num_classes, *roi)` torch logits on the input's device;
    `forward_with_gates` as `AttentionUNet`'s when the model was exported with `--gates`. The session is made for
    the device of the last `to()` (CPU execution provider; CUDA's when `onnxruntime-gpu` is installed), with as
    many threads as PyTorch's.

    Args:
        model: the serialized ONNX model (bytes) or its file.
        outputs: the model's output names ("logits", then "gate_<i>", "cbam_<i>").
    """

    def __init__(self, model: bytes | str | os.PathLike, outputs: list[str]):
        self.model = model if isinstance(model, bytes) else os.fspath(model)
        self.outputs = list(outputs)
        self.gate_outputs = any(name.startswith("gate_") for name in self.outputs)
        self.device = torch.device("cpu")
        self._session = None

    # ---- the nn.Module calls the engine and the Predictor make --------------------------------------------------
    def to(self, device) -> OnnxNetwork:
        device = torch.device(device)
        if device.type == "cuda" and "CUDAExecutionProvider" not in require("onnxruntime").get_available_providers():
            raise SegError("--backend onnxruntime on --device cuda needs onnxruntime-gpu (pip install "
                           "onnxruntime-gpu); or use --device cpu")
        if device != self.device:
            self.device, self._session = device, None
        return self

    def eval(self) -> OnnxNetwork:
        return self

    def parameters(self):
        return iter(())

    @property
    def session(self):
        if self._session is None:
            ort = require("onnxruntime")
            options = ort.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()
            providers = ["CPUExecutionProvider"]
            if self.device.type == "cuda":
                providers.insert(0, ("CUDAExecutionProvider", {"device_id": self.device.index or 0}))
            self._session = ort.InferenceSession(self.model, options, providers=providers)
        return self._session

    def _run(self, x: torch.Tensor, names: list[str]) -> list[torch.Tensor]:
        # Host numpy in and out, for the CUDA provider too: an IO binding would save two copies per batch of
        # windows; not measured yet (bench/gpu_check.sh times this path).
        image = x.detach().float().cpu().contiguous().numpy()
        outputs = self.session.run(names, {"image": image})
        return [torch.from_numpy(np.asarray(o)).to(x.device) for o in outputs]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, ["logits"])[0]

    def forward_with_gates(self, x: torch.Tensor, return_cbam: bool = False):
        if not self.gate_outputs:
            raise SegError("the ONNX model was exported without gate maps; export it again with `seg export "
                           "--gates`")
        logits, *maps = self._run(x, self.outputs)
        names = self.outputs[1:]
        gates = [m for n, m in zip(names, maps) if n.startswith("gate_")]
        cbam = [m for n, m in zip(names, maps) if n.startswith("cbam_")]
        return (logits, gates, cbam) if return_cbam else (logits, gates)


def onnx_device(device: str | torch.device) -> str | torch.device:
    """"auto" for ONNX Runtime: the GPU when PyTorch sees one and onnxruntime has the CUDA provider, else the CPU."""
    if str(device) != "auto":
        return device
    cuda = torch.cuda.is_available() and "CUDAExecutionProvider" in require("onnxruntime").get_available_providers()
    return "cuda" if cuda else "cpu"


def read_metadata(proto, path: Path) -> dict:
    props = {p.key: p.value for p in proto.metadata_props}
    if "seg.preprocessing" not in props:
        raise CheckpointError("not a seg ONNX model (no seg metadata); export one with `seg export`", path)
    meta = {k: parse_json(v, path, f"the ONNX model's {one_line(k[:40])} metadata (export it again)",
                          error=CheckpointError) for k, v in props.items() if k.startswith("seg.")}
    if meta.get("seg.format") != METADATA_FORMAT:
        raise CheckpointError(f"ONNX metadata format {meta.get('seg.format')!r}; this seg reads {METADATA_FORMAT}: "
                              "export it again with this version", path)
    return meta


def load_onnx_model(path: str | os.PathLike) -> TrainedModel:
    """A `TrainedModel` whose network is an `OnnxNetwork`: from a `.onnx` written by `seg export`, or from a
    `seg fit` checkpoint exported in memory (with gate outputs, checked against PyTorch as `seg export` does).

    Raises `CheckpointError` for a missing or unreadable file, one without seg's metadata or with malformed
    settings, or one that `seg.inference.onnx_guard` refuses (a network that disagrees with its metadata, weights
    beyond the file or the memory, a window beyond the memory); `SegError` when onnx or onnxruntime is missing.
    """
    path = Path(path)
    onnx = require("onnx")
    require("onnxruntime")
    if path.suffix != ".onnx":
        trained = load_trained_model(path, map_location="cpu")
        data, _ = export_onnx(trained, None, gates=True)
        names = [o.name for o in onnx.load_from_string(data).graph.output]
        return TrainedModel(OnnxNetwork(data, names), trained.preprocessing, trained.hparams)
    if not path.exists():
        raise CheckpointError("ONNX model not found", path)
    if not path.is_file():
        raise CheckpointError("not a regular file (a folder, FIFO or device); give the .onnx from `seg export`", path)
    if path.stat().st_size > memory_limit():
        raise CheckpointError(f"the ONNX model is {format_bytes(path.stat().st_size)}, more than the memory "
                              "available", path)
    try:
        proto = onnx.load(os.fspath(path), load_external_data=False)
    except Exception as err:  # protobuf's DecodeError and friends
        raise CheckpointError(f"cannot read the ONNX model (corrupt or truncated?): {type(err).__name__}", path) \
            from None
    meta = read_metadata(proto, path)
    hparams, preprocessing = meta.get("seg.hparams"), meta.get("seg.preprocessing")
    if not isinstance(hparams, dict) or not isinstance(preprocessing, dict):
        raise CheckpointError("the ONNX model's seg.hparams / seg.preprocessing are not mappings; export it again",
                              path)
    check_hyper_parameters(hparams, path)
    check_preprocessing(preprocessing, hparams, path)
    model = TrainedModel(OnnxNetwork(path, [o.name for o in proto.graph.output]), preprocessing, hparams)
    check_onnx_model(proto, model, path)  # once, before any scan: interface, window, weights, one probe run
    return model


__all__ = ["OnnxNetwork", "export_onnx", "load_onnx_model", "onnx_device", "require"]
