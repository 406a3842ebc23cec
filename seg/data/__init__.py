"""Datasets and their path to batches: layout, checks, preprocessing, splits and the Lightning DataModule.

The re-exports are lazy (PEP 562): `seg synth` and `seg check-data` import `seg.data.*` modules that need
only nibabel and numpy, and should not pay for importing torch, MONAI and Lightning.
"""

from importlib import import_module

_EXPORTS = {
    "NiftiDataModule": "seg.data.datamodule",
    "Split": "seg.data.split",
    "split_cases": "seg.data.split",
    "inference_transforms": "seg.data.transforms",
    "train_transforms": "seg.data.transforms",
    "val_transforms": "seg.data.transforms",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'seg.data' has no attribute {name!r}")
