"""The ONNX guard: what an ONNX model file claims, checked against seg's needs and the memory before ONNX Runtime runs it.

ONNX Runtime allocates every weight its graph declares when a session is made, reading external data from any
file the model names, for as many bytes as the tensor's dims claim: a 1 KiB model can claim a weight of 16 M filters,
or point at `/dev/zero`, a file outside its folder or a sparse 64 GiB file. And a network that runs but disagrees
with its metadata (7 output channels for 2 classes, a 2D network under 3D metadata, two input channels where the
metadata says one) writes wrong labels without a word. `check_onnx_model` refuses all of these once, from the
`ModelProto` loaded without its external data, then by one probe run on a small window, before any scan is read:
one line naming the file, as `seg.data.guard` does for NIfTI headers.
"""

from __future__ import annotations

import math
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from seg.data.guard import MAX_VOXELS, MEMORY_ENV, format_bytes, memory_limit
from seg.errors import CheckpointError, first_line, one_line
from seg.inference.checkpoint import NETWORK_DEFAULTS, TrainedModel

# Storage bits of the element types below a byte (packed two or four to a byte); the others are numpy's itemsize.
PACKED_BITS = {"INT4": 4, "UINT4": 4, "FLOAT4E2M1": 4, "INT2": 2, "UINT2": 2}


def _tensors(proto) -> Iterator:
    """Every TensorProto of the model: initializers (sparse ones too) and tensor attributes, subgraphs included."""
    graphs, nodes = [proto.graph], [n for f in proto.functions for n in f.node]
    while graphs or nodes:
        if graphs:
            graph = graphs.pop()
            yield from graph.initializer
            for sparse in graph.sparse_initializer:
                yield from (sparse.values, sparse.indices)
            nodes.extend(graph.node)
            continue
        for attribute in nodes.pop().attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            for sparse in [*([attribute.sparse_tensor] if attribute.HasField("sparse_tensor") else []),
                           *attribute.sparse_tensors]:
                yield from (sparse.values, sparse.indices)
            graphs.extend([*([attribute.g] if attribute.HasField("g") else []), *attribute.graphs])


def _storage_bytes(tensor, count: int) -> int:
    """Bytes that `count` elements of `tensor`'s type take as raw data."""
    import onnx

    name = onnx.TensorProto.DataType.Name(tensor.data_type)
    if name in PACKED_BITS:
        return math.ceil(count * PACKED_BITS[name] / 8)
    return count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def check_weights(proto, path: Path) -> int:
    """Refuse weights whose claimed size is not what the file holds, or beyond the memory; returns their bytes.

    Each tensor's dims give its size. Inline data must be exactly that long; external data must lie in a regular
    file inside the model's folder, holding the claimed bytes at its offset. The total must fit in `memory_limit()`.
    """
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    folder = path.resolve().parent
    limit, total = memory_limit(), 0
    for tensor in _tensors(proto):
        name = one_line(tensor.name[:80]) or "(unnamed)"
        dims = list(tensor.dims)
        try:
            if any(d < 0 for d in dims) or tensor.data_type in (onnx.TensorProto.UNDEFINED, onnx.TensorProto.STRING):
                raise ValueError
            count = math.prod(dims)
            size = _storage_bytes(tensor, count)
        except (ValueError, TypeError, KeyError):
            raise CheckpointError(f"weight '{name}' has dims {dims[:8]} of element type {tensor.data_type}: not "
                                  "a tensor seg's networks hold; export the model with `seg export`", path) from None
        total += size
        if total > limit:
            raise CheckpointError(f"weight '{name}' (dims {dims[:8]}) takes the weights to {format_bytes(total)}, "
                                  f"more than the {format_bytes(limit)} of memory available (set {MEMORY_ENV} to "
                                  "change the limit); a forged or foreign model", path)
        what = f"weight '{name}' claims {format_bytes(size)} (dims {dims[:8]})"
        if uses_external_data(tensor):
            info = ExternalDataInfo(tensor)
            target = (folder / (info.location or "")).resolve()
            if not info.location or not target.is_relative_to(folder):
                raise CheckpointError(f"{what} from external data {one_line(repr(info.location)[:120])}, outside "
                                      "the model's folder: refused", path)
            try:
                status = os.stat(target)
            except OSError as err:
                raise CheckpointError(f"{what} from external data {target.name} ({err.strerror or err})", path) \
                    from None
            offset = int(info.offset or 0)
            if not stat.S_ISREG(status.st_mode):
                raise CheckpointError(f"{what} from {target}, not a regular file: refused", path)
            if (info.length is not None and int(info.length) != size) or offset < 0 or offset + size > status.st_size:
                raise CheckpointError(f"{what} from {target.name}, which holds {format_bytes(status.st_size)} "
                                      f"(offset {offset}, length {info.length}): truncated or forged", path)
        elif tensor.raw_data:
            if len(tensor.raw_data) != size:
                raise CheckpointError(f"{what} but holds {format_bytes(len(tensor.raw_data))}: truncated or forged",
                                      path)
        elif onnx.TensorProto.DataType.Name(tensor.data_type) not in PACKED_BITS:
            field = onnx.helper.tensor_dtype_to_field(tensor.data_type)
            values = len(getattr(tensor, field))
            expected = count * (2 if tensor.data_type in (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128)
                                else 1)
            if values != expected:
                raise CheckpointError(f"{what} but holds {values:,} values: truncated or forged", path)
    return total


def _fail(path: Path, message: str):
    raise CheckpointError(f"{message}; the model does not match its own seg metadata: export it with `seg export`",
                          path)


def check_interface(proto, model: TrainedModel, path: Path) -> None:
    """The declared input and logits against the metadata: float32, rank, channels, and any fixed window size."""
    import onnx

    initializers = {t.name for t in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers]  # IR < 4 lists weights as inputs
    outputs = list(proto.graph.output)
    if [i.name for i in inputs] != ["image"] or not outputs or outputs[0].name != "logits":
        raise CheckpointError("the ONNX model's inputs/outputs are not seg's (image -> logits); export it with "
                              "`seg export`", path)
    dims = model.spatial_dims
    for value, channels, what in ((inputs[0], model.in_channels, "input channels"),
                                  (outputs[0], model.num_classes, "classes")):
        kind = value.type.tensor_type
        if not value.type.HasField("tensor_type") or kind.elem_type != onnx.TensorProto.FLOAT:
            _fail(path, f"'{value.name}' is not a float32 tensor")
        if not kind.HasField("shape"):
            continue  # no declared shape: the probe run checks it
        shape = [d.dim_value if d.HasField("dim_value") else None for d in kind.shape.dim]
        if len(shape) != dims + 2:
            _fail(path, f"'{value.name}' has {len(shape)} axes, but the metadata says a {dims}D network "
                        f"({dims + 2} axes: batch, channels, {dims} spatial)")
        if shape[1] is not None and shape[1] != channels:
            _fail(path, f"'{value.name}' has {shape[1]} channels, but the metadata says {channels} {what}")
        fixed = [(s, r) for s, r in zip(shape[2:], model.roi_size) if s is not None and s != r]
        if fixed:
            _fail(path, f"'{value.name}' has a fixed size {shape[2:]} other than the window {list(model.roi_size)}")


def check_window(model: TrainedModel, path: Path) -> None:
    """The window the metadata asks for: its float32 buffers within `memory_limit()` (as `seg.data.guard`)."""
    roi = model.roi_size
    if len(roi) != model.spatial_dims:
        raise CheckpointError(f"the window {list(roi)} has {len(roi)} axes for a {model.spatial_dims}D network; "
                              "export the model with `seg export`", path)
    voxels = math.prod(roi)
    channels = model.hparams.get("channels", NETWORK_DEFAULTS["channels"])
    # one batch of windows: the input, the logits and the first level's feature maps (two at a time)
    per_voxel = model.in_channels + model.num_classes + 2 * int(channels[0])
    need = 4 * voxels * (int(model.hparams.get("sw_batch_size", 4)) * per_voxel + 1)  # + the Gaussian weights
    limit = memory_limit()
    if voxels > MAX_VOXELS or need > limit:
        raise CheckpointError(f"the metadata's window {' x '.join(map(str, roi))} takes about {format_bytes(need)} "
                              f"of float32 buffers a batch of windows, more than the {format_bytes(limit)} of memory "
                              f"available (set {MEMORY_ENV} to change the limit)", path)


def probe_size(model: TrainedModel) -> list[int]:
    """The smallest window the network takes: the product of its strides on each axis, at most the window."""
    try:
        strides = [np.broadcast_to(np.asarray(s, dtype=np.int64), (model.spatial_dims,))
                   for s in model.hparams.get("strides", NETWORK_DEFAULTS["strides"])]
        multiple = np.prod(strides, axis=0) if strides else np.ones(model.spatial_dims, np.int64)
        return [int(min(r, m)) if m >= 1 else int(r) for r, m in zip(model.roi_size, multiple)]
    except (TypeError, ValueError):  # strides that are not integers: the whole window
        return list(model.roi_size)


def probe(model: TrainedModel, path: Path) -> None:
    """Run the network once on a small window of zeros: it must run, and give `(1, num_classes, *window)` logits."""
    size = probe_size(model)
    x = torch.zeros(1, model.in_channels, *size)
    try:
        logits = model.network(x)
    except Exception as err:  # ONNX Runtime's Fail, InvalidArgument, RuntimeException...
        _fail(path, f"ONNX Runtime cannot run it on a {' x '.join(map(str, size))} window of {model.in_channels} "
                    f"channel(s) ({first_line(err)[:300]})")
    expected = (1, model.num_classes, *size)
    if tuple(logits.shape) != expected:
        _fail(path, f"its logits for a window of shape {tuple(x.shape)} have shape {tuple(logits.shape)}, not "
                    f"{expected} ({model.num_classes} classes)")


def check_onnx_model(proto, model: TrainedModel, path: Path) -> None:
    """Everything above, cheapest first; the probe last, once the weights are known to be what they claim."""
    check_interface(proto, model, path)
    check_window(model, path)
    check_weights(proto, path)
    probe(model, path)


__all__ = ["check_interface", "check_onnx_model", "check_weights", "check_window", "probe"]
