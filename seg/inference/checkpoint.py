"""Load a trained seg model from a checkpoint alone, safely (weights only, no pickle)."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from seg.errors import CheckpointError
from seg.training.module import CHECKPOINT_KEY, SegmentationModule


def load_trained_model(path: str | Path, map_location: str | torch.device = "cpu") -> SegmentationModule:
    """The `SegmentationModule` of a `seg fit` checkpoint, in eval mode, with its `preprocessing` dict.

    Raises `CheckpointError` for a missing, truncated, unsafe (arbitrary pickle) or foreign checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError("checkpoint not found", path)
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else "unsafe content"
        raise CheckpointError(f"refused: not a weights-only checkpoint ({first})", path) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as err:
        raise CheckpointError(f"cannot read checkpoint (corrupt or truncated?): {err}", path) from None
    if not isinstance(checkpoint, dict) or CHECKPOINT_KEY not in checkpoint or "state_dict" not in checkpoint:
        raise CheckpointError("not a seg checkpoint (no model settings inside); use a .ckpt written by `seg fit`",
                              path)
    info = checkpoint[CHECKPOINT_KEY]
    if not info.get("preprocessing"):
        raise CheckpointError("checkpoint has no preprocessing settings; it was not trained with a dataset", path)
    hparams = {k: v for k, v in checkpoint.get("hyper_parameters", {}).items() if not k.startswith("_")}
    try:
        model = SegmentationModule(**hparams)
        model.load_state_dict(checkpoint["state_dict"])
    except (TypeError, RuntimeError) as err:
        raise CheckpointError(f"checkpoint does not match this version of seg: {err}", path) from None
    model.preprocessing = info["preprocessing"]
    return model.eval().to(map_location)
