"""Load a trained seg model from a checkpoint alone, safely (weights only, no pickle)."""

from __future__ import annotations

import pickle
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
    except Exception as err:  # arbitrary bytes trip torch's zip reader and unpickler in many ways (IndexError...)
        raise CheckpointError(f"cannot read checkpoint (corrupt or truncated?): {type(err).__name__}: "
                              f"{_first_line(err)}", path) from None
    info = checkpoint.get(CHECKPOINT_KEY) if isinstance(checkpoint, dict) else None
    if not isinstance(info, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError("not a seg checkpoint (no model settings inside); use a .ckpt written by `seg fit`",
                              path)
    if not isinstance(info.get("preprocessing"), dict) or not info["preprocessing"]:
        raise CheckpointError("checkpoint has no preprocessing settings; it was not trained with a dataset", path)
    hparams = checkpoint.get("hyper_parameters", {})
    if not isinstance(hparams, dict):
        raise CheckpointError("checkpoint's hyper_parameters are not a mapping; use a .ckpt written by `seg fit`", path)
    try:
        model = SegmentationModule(**{k: v for k, v in hparams.items() if not str(k).startswith("_")})
        model.load_state_dict(checkpoint["state_dict"])
    except (TypeError, RuntimeError, ValueError, KeyError) as err:
        raise CheckpointError(f"checkpoint does not match this version of seg: {_first_line(err)}", path) from None
    model.preprocessing = info["preprocessing"]
    return model.eval().to(map_location)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
