"""An exported model takes any spatial size in plain ONNX Runtime, and says what it expects in its metadata."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime
import pytest
import torch

from seg.inference.checkpoint import TrainedModel, build_network
from seg.inference.onnx_model import export_onnx


@pytest.fixture(scope="module")
def exported() -> tuple[TrainedModel, bytes]:
    """An untrained 3D network with total stride 8 (the issue's), exported without gate outputs."""
    hparams = {"spatial_dims": 3, "in_channels": 1, "out_channels": 3, "channels": [4, 8, 16, 32],
               "strides": [2, 2, 2], "roi_size": [16, 16, 16]}
    preprocessing = {"patch_size": [16, 16, 16], "class_names": ["liver", "lesion"], "modalities": ["CT"],
                     "orientation": "RAS", "spacing": [1.5, 1.5, 2.0],
                     "normalization": [{"scheme": "ct", "clip": [-100.0, 200.0], "mean": 60.0, "std": 40.0}]}
    torch.manual_seed(0)
    model = TrainedModel(build_network(hparams).eval(), preprocessing, hparams)
    data, _ = export_onnx(model, None)
    return model, data


def pytorch_labels(network: torch.nn.Module, image: np.ndarray, divisor: list[int]) -> np.ndarray:
    """PyTorch's labels of `image` padded with zeros at the end of every axis to the divisor, cropped back."""
    pads = [(0, 0), (0, 0)] + [(0, -s % d) for s, d in zip(image.shape[2:], divisor)]
    with torch.no_grad():
        logits = network(torch.from_numpy(np.pad(image, pads))).numpy()
    return logits[(slice(None), slice(None), *(slice(0, s) for s in image.shape[2:]))].argmax(1)


@pytest.mark.parametrize("shape", [(1, 1, 37, 41, 29), (1, 1, 13, 17, 9), (2, 1, 24, 8, 40)])
def test_plain_onnxruntime_runs_any_size_and_matches_pytorchs_labels(exported, shape):
    model, data = exported
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    divisor = json.loads(meta["seg.divisor"])
    assert divisor == [8, 8, 8]
    image = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    logits = session.run(["logits"], {"image": image})[0]  # unpadded before: a broadcast error in a gate's Add
    assert logits.shape == (shape[0], 3, *shape[2:])
    np.testing.assert_array_equal(logits.argmax(1), pytorch_labels(model.network, image, divisor))


def test_metadata_says_the_input_layout_and_that_it_must_be_normalised(exported):
    model, data = exported
    meta = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    layout = json.loads(meta["seg.input"])
    assert layout["axes"] == ["batch", "channel", "x", "y", "z"] and layout["channels"] == ["CT"]
    assert layout["normalized"] is True and layout["any_size"] is True
    assert layout["normalization"] == model.preprocessing["normalization"]
    assert layout["orientation"] == "RAS" and layout["spacing_mm"] == [1.5, 1.5, 2.0]


def test_gate_outputs_are_cropped_to_the_cells_that_cover_the_input(exported):
    model, _ = exported
    data, difference = export_onnx(model, None, gates=True)  # the export's own check covers an unaligned size
    assert difference < 1e-4
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    outputs = dict(zip(names, session.run(None, {"image": np.zeros((1, 1, 37, 41, 29), np.float32)})))
    assert outputs["logits"].shape[2:] == (37, 41, 29)
    # gates coarsest first: on the grids of strides 4, 2, 1; ceil(37 / 4) = 10 cells cover 37 voxels
    assert [outputs[f"gate_{i}"].shape[2:] for i in range(3)] == [(10, 11, 8), (19, 21, 15), (37, 41, 29)]
