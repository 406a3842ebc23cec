"""seg: Attention U-Net segmentation of NIfTI scans, with gate-activation overlays."""

__version__ = "0.1.0"
