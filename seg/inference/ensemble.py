"""Ensembles of checkpoints: the softmax of several models averaged window by window.

`EnsembleNetwork` takes the place of one model's network inside its `TrainedModel`, so the one sliding-window engine (Gaussian blending, slabs for big scans, mirroring) runs every model on each window and keeps only
their average: memory as for one model, no full-size map per model. It returns the log of the averaged softmax:
the Predictor's softmax of it gives back the average itself, and its argmax is the average's. (A single model's
logits are blended before the softmax; log-probabilities differ from its logits by a per-voxel constant, which
neither the blending's argmax nor its softmax sees, so an ensemble of copies of one model predicts what that model
predicts.)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from seg.errors import CheckpointError, SegError
from seg.io import read_json

CV_MANIFEST = "cv.json"  # written by `seg cv` in its output folder: the folds and their run folders
# Preprocessing entries that must agree for models to be averaged; `plan` (the reasons of `seg plan`) need not.
_IGNORED = {"plan", "fingerprint"}  # where the settings came from, and what the report compares scans with


class EnsembleNetwork(nn.Module):
    """Several networks on one input; returns `log(mean_k softmax(net_k(x)))`, `(N, classes, *S)`, float32.

    Args:
        networks: modules mapping `(N, C, *S)` to logits `(N, classes, *S)` (in eval mode).
    """

    def __init__(self, networks: Sequence[nn.Module]):
        super().__init__()
        if not networks:
            raise ValueError("an ensemble needs at least one network")
        self.networks = nn.ModuleList(networks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = None
        for network in self.networks:
            probabilities = torch.softmax(network(x).float(), dim=1)
            mean = probabilities if mean is None else mean.add_(probabilities)
        mean = mean / len(self.networks)
        return torch.log(mean.clamp_min_(torch.finfo(mean.dtype).tiny))

    def forward_with_gates(self, x: torch.Tensor, **kwargs):
        raise SegError("attention-gate maps are per model: --save-gates and overlays take one checkpoint")


def check_compatible(models: Sequence, paths: Sequence[Path]) -> None:
    """Refuse, in one line naming both checkpoints, models that do not share classes, preprocessing and patch size."""
    first, first_path = models[0], paths[0]
    for model, path in zip(models[1:], paths[1:]):
        differences = []
        if list(model.class_names) != list(first.class_names) or model.num_classes != first.num_classes:
            differences.append(f"classes {list(first.class_names)} vs {list(model.class_names)}")
        keys = (set(first.preprocessing) | set(model.preprocessing)) - _IGNORED
        for key in sorted(keys):
            a, b = first.preprocessing.get(key), model.preprocessing.get(key)
            if a != b and not (key == "class_names" and differences):
                differences.append(f"preprocessing '{key}' {_short(a)} vs {_short(b)}")
        if tuple(model.roi_size) != tuple(first.roi_size):
            differences.append(f"window {list(first.roi_size)} vs {list(model.roi_size)}")
        if differences:
            raise CheckpointError(f"cannot be averaged with {first_path}: {'; '.join(differences[:3])}; an ensemble "
                                  "needs models trained with the same classes, preprocessing and patch size", path)


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_ensemble(paths: Sequence[str | os.PathLike], map_location: str | torch.device = "cpu"):
    """One `TrainedModel` that predicts the average of the checkpoints' models (itself for one checkpoint).

    The first checkpoint's module carries the ensemble (its preprocessing, window, overlap and batch of windows);
    its network is replaced by an `EnsembleNetwork` of every model's network.
    """
    from seg.inference.checkpoint import load_trained_model

    paths = [Path(p) for p in paths]
    models = [load_trained_model(p, map_location=map_location) for p in paths]
    if len(models) == 1:
        return models[0]
    check_compatible(models, paths)
    ensemble = models[0]
    ensemble.network = EnsembleNetwork([m.network for m in models])
    # mirroring TTA flips an axis only when every member was trained mirrored on it
    ensemble.hparams = {**ensemble.hparams,
                        "mirror_axes": sorted(set.intersection(*(set(m.mirror_axes) for m in models)))}
    ensemble.ensemble_checkpoints = paths
    return ensemble


def cv_checkpoints(folder: Path) -> tuple[list[Path], Path | None]:
    """The best checkpoint of every fold of a `seg cv` output folder, and its `cv/postprocessing.json` if written."""
    manifest = folder / CV_MANIFEST
    if not manifest.is_file():
        raise CheckpointError(f"is a folder but not a `seg cv` run (no {CV_MANIFEST}); give checkpoint files or the "
                              "--output folder of `seg cv`", folder)
    content = read_json(manifest, "the fold list", error=CheckpointError)
    folds = content.get("folds") if isinstance(content, dict) else None
    if not (isinstance(folds, list) and folds
            and all(isinstance(k, int) and not isinstance(k, bool) and 0 <= k < 1000 for k in folds)):
        raise CheckpointError("cannot read the fold list: no 'folds' list of fold numbers; use the --output folder "
                              "of `seg cv`", manifest)
    checkpoints = []
    for k in folds:
        path = folder / f"fold_{k}" / "checkpoints" / "best.ckpt"
        if not path.is_file():
            raise CheckpointError(f"fold {k} has no best checkpoint: finish its training with `seg cv` first", path)
        checkpoints.append(path)
    postprocessing = folder / "cv" / "postprocessing.json"
    return checkpoints, postprocessing if postprocessing.is_file() else None


def resolve_checkpoints(values: Sequence[str | os.PathLike] | str | os.PathLike) -> tuple[list[Path], Path | None]:
    """`--checkpoint` values -> checkpoint files, and the postprocessing file a `seg cv` folder implies (or None)."""
    values = [values] if isinstance(values, (str, os.PathLike)) else list(values)
    paths = [Path(v) for v in values]
    folders = [p for p in paths if p.is_dir()]
    if folders and len(paths) > 1:
        raise CheckpointError("is a folder: give either one `seg cv` folder or checkpoint files", folders[0])
    if folders:
        return cv_checkpoints(folders[0])
    return paths, None
