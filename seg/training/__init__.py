"""Training with Lightning: the SegmentationModule, its callbacks and the `seg fit|validate|test` CLI.

The re-exports are lazy (PEP 562), as in `seg.data`.
"""

from importlib import import_module

_EXPORTS = {
    "SegmentationModule": "seg.training.module",
    "GateOverlays": "seg.training.overlays",
    "LastCheckpoint": "seg.training.checkpoint_io",
    "AtomicCheckpointIO": "seg.training.checkpoint_io",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'seg.training' has no attribute {name!r}")
