"""Training with Lightning: the SegmentationModule, its callbacks and the `seg fit|validate|test` CLI."""

from seg._exports import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "SegmentationModule": "seg.training.module",
    "GateOverlays": "seg.training.overlays",
    "LastCheckpoint": "seg.training.checkpoint_io",
    "AtomicCheckpointIO": "seg.training.checkpoint_io",
})
