"""Datasets and their path to batches: layout, checks, preprocessing, splits and the Lightning DataModule.

The re-exports are lazy (PEP 562): `seg synth` and `seg check-data` import `seg.data.*` modules that need
only nibabel and numpy, and should not pay for importing torch, MONAI and Lightning.
"""

from seg._exports import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "NiftiDataModule": "seg.data.datamodule",
    "Split": "seg.data.split",
    "split_cases": "seg.data.split",
    "inference_transforms": "seg.data.transforms",
    "train_transforms": "seg.data.transforms",
    "val_transforms": "seg.data.transforms",
})
