"""`NiftiDataModule`: a dataset folder (MSD or nnU-Net layout) as Lightning train / val / test loaders."""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_warn
from monai.data import CacheDataset, DataLoader, Dataset, PersistentDataset

from seg.data.codes import read_codes_file
from seg.data.fingerprint import load_fingerprint, training_summary
from seg.data.layout import NIFTI_SUFFIXES, Case, group_channel_files, load_dataset
from seg.data.split import Split, save_split, split_cases
from seg.data.transforms import channel_schemes, make_preprocessing, train_transforms, val_transforms
from seg.errors import DataError


@contextlib.contextmanager
def _data_errors():
    """Surface a `DataError` raised inside MONAI's Compose, which wraps every error in a RuntimeError."""
    try:
        yield
    except RuntimeError as err:
        cause = err
        while cause is not None and not isinstance(cause, DataError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise cause from None


class _Cases(torch.utils.data.Dataset):
    """A MONAI dataset whose unreadable cases raise `DataError` (naming the file), not a wrapped RuntimeError."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        with _data_errors():
            return self.dataset[index]


class _RankShard(torch.utils.data.Dataset):
    """A whole split of which this process reads only `indices` (its DistributedSampler's): only they are built.

    Under DDP each rank validates a fixed part of the split, so building (and caching) every volume in every
    rank would hold the split `world_size` times over.
    """

    def __init__(self, length: int, indices: list[int], build):
        own = sorted(set(indices))
        self.length = length
        self.position = {index: k for k, index in enumerate(own)}
        self.dataset = build(own)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index):
        return self.dataset[self.position[index]]


def _item(case: Case) -> dict:
    """The dict a transform chain starts from: file paths (a list for one file per channel) and the case id."""
    images = [str(p) for p in case.images]
    item = {"image": images[0] if len(images) == 1 else images, "case_id": case.case_id}
    if case.label is not None:
        item["label"] = str(case.label)
    return item


class NiftiDataModule(LightningDataModule):
    """Patches for training, whole volumes for validation and testing, from a folder of NIfTI scans.

    Preprocessing (RAS, target spacing, per-channel normalisation, crop to the body) is described by
    `preprocessing`, a JSON dict measured from the dataset once (see `seg.data.fingerprint`) and saved with the
    model, so `seg predict` rebuilds it exactly (`seg.data.transforms.inference_transforms`).

    Batches are dicts: "image" (N, C, *spatial) float32 MetaTensor, "label" (N, 1, *spatial) int64, "case_id"
    (list of N str). Training: N = batch_size * samples_per_volume patches, 3D (N, C, D, H, W) or, with
    `spatial_dims=2`, axial slices (N, C, H, W). Validation and test: N = 1, the whole preprocessed volume
    (3D even in 2D mode; the model slides over it).

    Args:
        root: dataset folder (MSD `dataset.json` + imagesTr/labelsTr, nnU-Net v2, or the two folders alone).
        spatial_dims: 3 for volumes, 2 for axial slices.
        patch_size: training patch, one value per spatial dim (after resampling, in voxels).
        batch_size: volumes per training batch; each gives `samples_per_volume` patches.
        samples_per_volume: patches cut from each loaded volume.
        spacing: target voxel size in mm along R, A, S; None: the dataset's median spacing.
        normalization: "auto" (CT channels "ct", others "zscore"), "zscore" or "ct".
        ct_window: HU clip window for "ct"; None: the dataset's foreground 0.5 / 99.5 percentiles (nnU-Net).
        foreground_ratio: share of training patches centred on a labelled voxel.
        sampling: "classes" (default): patch centres drawn per class (MONAI `RandCropByLabelClassesd`), the
            foreground share split equally between the foreground classes, so a small class is seen as often as a
            large one; "posneg": centred on any labelled voxel (`RandCropByPosNegLabeld`).
        class_ratios: with "classes", the share of patch centres per class, background first (one value per
            class, e.g. `[1, 1, 2]`); None: from `foreground_ratio` as above.
        flip_axes: spatial axes (after RAS) that may be flipped; none by default, since a left-right flip
            swaps lateral structures (left/right hippocampus, kidney).
        augment: random rotation/scaling and intensity changes in training.
        augmentation: their strength: "light" (small rotations and scalings, mild intensity changes) or "strong"
            (nnU-Net's: rotation, scaling 0.7-1.4, gamma, contrast, low resolution; `seg.data.augmentation`).
        use_albumentations: in 2D, augment with albumentations (intensity and affine).
        albumentations_3d: in 3D, do the intensity augmentation with albumentations instead of MONAI.
        val_fraction: share of cases held out for validation (seeded), unless `val_cases` or `fold` is set.
        group_pattern: a regular expression whose first group names the patient of a case id, e.g.
            `^(patient\d+)_` for ACDC's `patient001_frame01`: a patient's cases are never on both sides of the split.
        val_cases: explicit validation case ids.
        fold: validate on fold `fold` of `num_folds` (nnU-Net style).
        num_folds: folds for `fold`.
        seed: seeds the split.
        cache_rate: share of the preprocessed cases kept in memory (`CacheDataset`). Under DDP each rank caches
            only the validation/test volumes it scores, but every training case: the distributed sampler deals
            each rank other cases every epoch. Fine for small datasets; for big ones use `cache_dir`.
        cache_dir: keep preprocessed cases on disk here instead (`PersistentDataset`): one copy that all ranks
            (and later runs) read, nothing held in memory; also holds the fingerprint.
        num_workers: loader worker processes (and cache-filling threads).
        check: run `seg.data.checks.check_or_raise` on the dataset in `prepare_data`.
        crop_foreground: crop each scan to the body (nonzero voxels; above -500 HU for CT).
        plan: the reasons of `seg plan` for this config (config key -> reason); kept in the preprocessing, and so in
            every checkpoint, to say where the settings came from.
        codes: a JSON file of DICOM SEG codes per label value (`seg.data.codes`), instead of dataset.json's
            "codes"; kept in the preprocessing, so `seg predict --dicom-seg` codes each segment with them.
    """

    def __init__(
        self,
        root: str,
        spatial_dims: int = 3,
        patch_size: list[int] = [96, 96, 96],  # noqa: B006 - LightningCLI shows and validates list defaults
        batch_size: int = 2,
        samples_per_volume: int = 2,
        spacing: list[float] | None = None,
        normalization: str = "auto",
        ct_window: list[float] | None = None,
        foreground_ratio: float = 1 / 3,
        sampling: Literal["classes", "posneg"] = "classes",
        class_ratios: list[float] | None = None,
        flip_axes: list[int] = [],  # noqa: B006
        augment: bool = True,
        augmentation: Literal["light", "strong"] = "light",
        use_albumentations: bool = True,
        albumentations_3d: bool = False,
        val_fraction: float = 0.2,
        group_pattern: str | None = None,
        val_cases: list[str] | None = None,
        fold: int | None = None,
        num_folds: int = 5,
        seed: int = 0,
        cache_rate: float = 1.0,
        cache_dir: str | None = None,
        num_workers: int = 2,
        check: bool = True,
        crop_foreground: bool = True,
        plan: dict[str, str] | None = None,
        codes: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(logger=False)  # `seg fit` logs the whole nested config instead
        self.info = load_dataset(root)
        if codes is not None:  # read now: a bad file is named before anything trains
            self.info.codes = read_codes_file(codes, self.info.labels)
        config = Path(root)
        if spatial_dims not in (2, 3):
            raise DataError(f"spatial_dims must be 2 or 3, got {spatial_dims}", config)
        if len(patch_size) != spatial_dims:
            raise DataError(f"patch_size {list(patch_size)} needs {spatial_dims} values for "
                            f"spatial_dims={spatial_dims}", config)
        if normalization not in ("auto", "zscore", "ct"):
            raise DataError(f"normalization must be 'auto', 'zscore' or 'ct', got '{normalization}'", config)
        if ct_window is not None and (len(ct_window) != 2 or ct_window[0] >= ct_window[1]):
            raise DataError(f"ct_window must be [low, high] with low < high, got {ct_window}", config)
        if not 0.0 <= foreground_ratio <= 1.0:
            raise DataError(f"foreground_ratio must be in [0, 1], got {foreground_ratio}", config)
        if class_ratios is not None and (len(class_ratios) != self.info.num_classes or min(class_ratios) < 0
                                         or sum(class_ratios) <= 0):
            names = ", ".join([self.info.labels.get(0, "background"), *self.info.class_names])
            raise DataError(f"class_ratios needs {self.info.num_classes} non-negative values, one per class "
                            f"({names}), got {list(class_ratios)}", config)
        if augmentation not in ("light", "strong"):
            raise DataError(f"augmentation must be 'light' or 'strong', got '{augmentation}'", config)
        bad_axes = [a for a in flip_axes if not 0 <= a < spatial_dims]
        if bad_axes:
            raise DataError(f"flip_axes {bad_axes} must be spatial axes 0..{spatial_dims - 1}", config)
        self._preprocessing: dict | None = None
        self.split: Split | None = None
        self._checked = False
        self.train_transforms = self.val_transforms = None
        self.train_dataset = self.val_dataset = self.test_dataset = None
        self._eval_samplers: dict[str, torch.utils.data.DistributedSampler] = {}

    # -- what the model needs to know, from the layout alone (LightningCLI links these at instantiation) --
    @property
    def in_channels(self) -> int:
        return self.info.in_channels

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    @property
    def class_names(self) -> list[str]:
        return self.info.class_names

    @property
    def preprocessing(self) -> dict:
        """Everything inference needs to preprocess a new scan the same way (see `seg.data.transforms`)."""
        if self._preprocessing is None:
            h = self.hparams
            ct = "ct" in channel_schemes(self.info.modalities, h.normalization)
            fingerprint = load_fingerprint(self.info, h.cache_dir, intensities=ct)
            self._preprocessing = make_preprocessing(
                self.info, fingerprint, spatial_dims=h.spatial_dims, patch_size=h.patch_size, spacing=h.spacing,
                normalization=h.normalization, ct_window=h.ct_window, crop_foreground=h.crop_foreground)
            self._preprocessing["fingerprint"] = training_summary(fingerprint)  # what predictions are compared with
            if h.plan:
                self._preprocessing["plan"] = {str(k): str(v) for k, v in h.plan.items()}
            if self.info.codes:
                self._preprocessing["codes"] = self.info.codes
        return self._preprocessing

    @property
    def data_extent(self) -> list[float]:
        """Voxels per patch axis of the median scan after resampling: what a patch can hold of real data.

        From the fingerprint's median RAS shape and spacing and the target spacing (a component <= 0 keeps the
        scan's own); 2D: the two in-plane axes.
        """
        fingerprint = load_fingerprint(self.info, self.hparams.cache_dir)
        target = self.preprocessing["spacing"]
        extent = [shape * (spacing / t if t > 0 else 1.0)
                  for shape, spacing, t in zip(fingerprint["shape"], fingerprint["spacing"], target)]
        return extent[: self.hparams.spatial_dims]

    @property
    def patch_spacing(self) -> list[float]:
        """The voxel size (mm) along each patch axis after resampling (a target component <= 0 keeps the median
        scan's own); 2D: the two in-plane axes. `seg fit`'s stride check suggests what `seg plan` would from it."""
        fingerprint = load_fingerprint(self.info, self.hparams.cache_dir)
        spacing = [t if t > 0 else s for s, t in zip(fingerprint["spacing"], self.preprocessing["spacing"])]
        return spacing[: self.hparams.spatial_dims]

    def check(self) -> None:
        """`seg check-data`'s checks, and, for training, that the split can train (`check_or_raise`), once;
        `DataError` if not. `seg fit` calls it before it makes a logger or a run folder; `prepare_data` otherwise.
        """
        if not self.hparams.check or self._checked:
            return
        try:
            from seg.data.checks import check_or_raise
        except ModuleNotFoundError as err:
            if err.name != "seg.data.checks":
                raise
            rank_zero_warn("seg.data.checks is not available: the dataset is used unchecked")
        else:
            # the split is checked for training only: scoring a checkpoint needs no class in the training cases
            fitting = self.trainer is None or self.trainer.state.fn == "fit"
            check_or_raise(self.hparams.root, workers=max(1, self.hparams.num_workers),
                           split=(lambda _: self.make_split()) if fitting else None)
        self._checked = True

    def make_split(self) -> Split:
        """The train / validation split of these settings (made once)."""
        h = self.hparams
        if self.split is None:
            self.split = split_cases([c.case_id for c in self.info.cases], val_fraction=h.val_fraction,
                                     val_cases=h.val_cases, fold=h.fold, num_folds=h.num_folds, seed=h.seed,
                                     source=self.info.root, group_pattern=h.group_pattern)
        return self.split

    # -- Lightning hooks --
    def prepare_data(self) -> None:
        """Check the dataset and measure its fingerprint once, before any other process reads it."""
        self.check()
        self.preprocessing  # noqa: B018 - measures and caches the fingerprint

    def setup(self, stage: str | None = None) -> None:
        """Split the cases (and write `split.json` beside the run), build the transforms and cached datasets."""
        h = self.hparams
        if self.train_transforms is None:
            self.make_split()
            self.train_transforms = train_transforms(
                self.preprocessing, samples_per_volume=h.samples_per_volume, foreground_ratio=h.foreground_ratio,
                sampling=h.sampling, class_ratios=h.class_ratios, flip_axes=h.flip_axes, augment=h.augment,
                albumentations=h.use_albumentations if h.spatial_dims == 2 else h.albumentations_3d,
                strength=h.augmentation)
            self.val_transforms = val_transforms(self.preprocessing)
        trainer = self.trainer
        if trainer is not None and trainer.is_global_zero:
            save_split(self.split, Path(trainer.default_root_dir) / "split.json")
        cases = {c.case_id: c for c in self.info.cases}
        if stage in (None, "fit") and self.train_dataset is None:
            self.train_dataset = self._dataset([_item(cases[i]) for i in self.split.train], self.train_transforms)
        if stage in (None, "fit", "validate") and self.val_dataset is None:
            self.val_dataset = self._eval_dataset("val", [_item(cases[i]) for i in self.split.val])
        if stage in (None, "test") and self.test_dataset is None:
            self.test_dataset = self._eval_dataset("test", self._test_items())

    def _eval_dataset(self, name: str, items: list[dict]):
        """Whole volumes for validation/test; under DDP only this rank's share is built and cached."""
        trainer = self.trainer
        if trainer is None or trainer.world_size < 2:
            return self._dataset(items, self.val_transforms)
        # Our own DistributedSampler (Lightning keeps a loader's DistributedSampler), so we know which volumes this
        # rank reads. It pads with repeated volumes like Lightning's; the module scores each case id once.
        sampler = torch.utils.data.DistributedSampler(range(len(items)), num_replicas=trainer.world_size,
                                                      rank=trainer.global_rank, shuffle=False)
        self._eval_samplers[name] = sampler
        return _RankShard(len(items), list(sampler),
                          lambda own: self._dataset([items[i] for i in own], self.val_transforms))

    def _test_items(self) -> list[dict]:
        """Labelled `imagesTs` cases (`labelsTs` beside them) when the dataset has any, else the validation split."""
        root = Path(self.info.root)
        images_dir, labels_dir = root / "imagesTs", root / "labelsTs"
        items = []
        if images_dir.is_dir() and labels_dir.is_dir():
            grouped = group_channel_files([p for p in images_dir.iterdir() if p.is_file()])
            for case_id, images in sorted(grouped.items()):
                label = next((labels_dir / f"{case_id}{s}" for s in NIFTI_SUFFIXES
                              if (labels_dir / f"{case_id}{s}").exists()), None)
                if label is not None:
                    items.append(_item(Case(case_id, tuple(images), label)))
        if items:
            return items
        cases = {c.case_id: c for c in self.info.cases}
        return [_item(cases[i]) for i in self.split.val]

    def _dataset(self, items: list[dict], transform) -> _Cases:
        h = self.hparams
        with _data_errors():
            if h.cache_dir is not None:
                # One subfolder per dataset version and preprocessing, so a changed setting never reads stale files.
                key = hashlib.sha256(json.dumps([self.preprocessing, load_fingerprint(
                    self.info, h.cache_dir)["key"]], sort_keys=True).encode()).hexdigest()[:16]
                dataset = PersistentDataset(items, transform, cache_dir=Path(h.cache_dir) / key)
            elif h.cache_rate > 0:
                dataset = CacheDataset(items, transform, cache_rate=h.cache_rate, num_workers=max(1, h.num_workers),
                                       progress=False)
            else:
                dataset = Dataset(items, transform)
        return _Cases(dataset)

    def _loader(self, dataset, batch_size: int, shuffle: bool, sampler=None) -> DataLoader:
        workers = self.hparams.num_workers
        trainer = self.trainer
        cuda = trainer.strategy.root_device.type == "cuda" if trainer is not None else torch.cuda.is_available()
        # MONAI's DataLoader seeds each worker's random transforms and flattens the patch lists into one batch.
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler, num_workers=workers,
                          persistent_workers=workers > 0, pin_memory=cuda)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, 1, shuffle=False, sampler=self._eval_samplers.get("val"))

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, 1, shuffle=False, sampler=self._eval_samplers.get("test"))
