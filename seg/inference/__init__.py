"""Inference without Lightning: a checkpoint's network, the sliding-window engine, and folder prediction."""

from seg._exports import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "Predictor": "seg.inference.predictor",
    "TrainedModel": "seg.inference.checkpoint",
    "WindowInference": "seg.inference.window",
    "load_trained_model": "seg.inference.checkpoint",
})
