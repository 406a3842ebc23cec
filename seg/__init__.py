"""seg: Attention U-Net segmentation of NIfTI scans, with gate-activation overlays.

The Python API (`seg.api`): `seg.predict(checkpoint, input, output=None)`, `seg.load(checkpoint)` for a model
used many times, `seg.plan(root)`. Imported when first used, so that `import seg` (and every command) stays cheap.
"""

from seg._exports import lazy_exports

__version__ = "0.1.0"

__all__, __getattr__ = lazy_exports(__name__, {"load": "seg.api", "plan": "seg.api", "predict": "seg.api"})
