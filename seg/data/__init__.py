"""Datasets and their path to batches: layout, checks, preprocessing, splits and the Lightning DataModule."""

from seg.data.datamodule import NiftiDataModule
from seg.data.split import Split, split_cases
from seg.data.transforms import inference_transforms, train_transforms, val_transforms

__all__ = ["NiftiDataModule", "Split", "inference_transforms", "split_cases", "train_transforms", "val_transforms"]
