"""Inference without Lightning: a checkpoint's network, the sliding-window engine, and folder prediction.

The re-exports are lazy (PEP 562), as in `seg.data`: importing one submodule does not import the others.
"""

from importlib import import_module

_EXPORTS = {
    "OnnxNetwork": "seg.inference.onnx_model",
    "Predictor": "seg.inference.predictor",
    "TrainedModel": "seg.inference.checkpoint",
    "WindowInference": "seg.inference.window",
    "export_onnx": "seg.inference.onnx_model",
    "load_onnx_model": "seg.inference.onnx_model",
    "load_trained_model": "seg.inference.checkpoint",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'seg.inference' has no attribute {name!r}")
