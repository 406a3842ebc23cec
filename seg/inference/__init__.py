"""Inference without Lightning: a checkpoint's network, the sliding-window engine, and folder prediction."""

from seg._exports import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "OnnxNetwork": "seg.inference.onnx_model",
    "Predictor": "seg.inference.predictor",
    "TrainedModel": "seg.inference.checkpoint",
    "WindowInference": "seg.inference.window",
    "export_onnx": "seg.inference.onnx_model",
    "load_onnx_model": "seg.inference.onnx_model",
    "load_trained_model": "seg.inference.checkpoint",
})
