"""A model built in memory gets the same preprocessing check as a checkpoint or an ONNX model."""

import pytest

from seg.errors import CheckpointError
from seg.inference.checkpoint import TrainedModel, build_network
from seg.inference.predictor import Predictor


def test_the_predictor_refuses_malformed_preprocessing_in_one_line():
    hparams = {"out_channels": 2, "channels": [4, 8], "strides": [2], "roi_size": [16, 16, 16]}
    preprocessing = {"version": 1, "spatial_dims": 3, "orientation": "RAS", "spacing": [1.0, 1.0, -1.0]}
    with pytest.raises(CheckpointError) as err:
        Predictor(TrainedModel(build_network(hparams).eval(), preprocessing, hparams), device="cpu")
    assert str(err.value).startswith("checkpoint's preprocessing 'spacing' is [1.0, 1.0, -1.0]; expected 3 voxel")
