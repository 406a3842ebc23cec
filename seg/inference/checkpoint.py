"""Load a trained seg model from a checkpoint alone, safely (weights only, no pickle), without Lightning.

A `seg fit` checkpoint holds the LightningModule's `state_dict` (the network under `model.`), its
`hyper_parameters` and, under `CHECKPOINT_KEY`, the preprocessing the network was trained with. Inference needs
the network, the preprocessing and a few settings: `TrainedModel`.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from seg.data.preprocessing import Preprocessing, check_preprocessing, is_int, is_number, refuse
from seg.errors import CheckpointError, first_line, one_line
from seg.inference.window import WindowInference
from seg.models import NETWORK_DEFAULTS, AttentionUNet

CHECKPOINT_KEY = "seg"  # the checkpoint entry that makes a checkpoint self-sufficient for inference
CHECKPOINT_FORMAT = 1
# Above this windows step by a few voxels: at 0.999 a 128^3 window steps by one, 57 million windows on a 512^3 CT.
MAX_OVERLAP = 0.95


def build_network(hparams: dict) -> AttentionUNet:
    """The `AttentionUNet` that `hparams` (a `SegmentationModule`'s hyper-parameters) describe."""
    h = {**NETWORK_DEFAULTS, **{k: v for k, v in hparams.items() if k in NETWORK_DEFAULTS}}
    return AttentionUNet(h["spatial_dims"], h["in_channels"], h["out_channels"], list(h["channels"]),
                         list(h["strides"]), cbam=h["cbam"], gates=h["gates"], deep_supervision=h["deep_supervision"],
                         downsample=h["downsample"], decoder_convs=h["decoder_convs"])


@dataclass
class TrainedModel:
    """A trained network with what inference needs from its checkpoint.

    Attributes:
        network: the `AttentionUNet`, in eval mode (or an `OnnxNetwork`: `seg.inference.onnx_model`).
        preprocessing: the preprocessing dict it was trained with (`seg.data.transforms`).
        hparams: the checkpoint's hyper-parameters (spatial_dims, out_channels, roi_size, sw_overlap, ...).
    """

    network: AttentionUNet
    preprocessing: Preprocessing
    hparams: dict

    @property
    def spatial_dims(self) -> int:
        return int(self.hparams.get("spatial_dims", NETWORK_DEFAULTS["spatial_dims"]))

    @property
    def num_classes(self) -> int:
        return int(self.hparams.get("out_channels", NETWORK_DEFAULTS["out_channels"]))

    @property
    def in_channels(self) -> int:
        return int(self.hparams.get("in_channels", NETWORK_DEFAULTS["in_channels"]))

    @property
    def class_names(self) -> list[str]:
        names = self.hparams.get("class_names") or self.preprocessing.get("class_names")
        return list(names or [f"class_{i}" for i in range(1, self.num_classes)])

    @property
    def roi_size(self) -> tuple[int, ...]:
        """The sliding window: the training patch (`spatial_dims` values)."""
        return tuple(int(v) for v in (self.hparams.get("roi_size") or self.preprocessing["patch_size"]))

    @property
    def mirror_axes(self) -> tuple[int, ...]:
        """The spatial axes mirroring TTA flips: those the network was trained mirrored on (`data.flip_axes`, kept
        as the `mirror_axes` hyper-parameter); every axis for a model that does not say (built in memory, or
        written before seg recorded it). A network never shown a flipped scan mis-reads one: averaging such copies
        took a hippocampus model's held-out Dice from 0.88 to 0.35 (BENCHMARKS.md)."""
        axes = self.hparams.get("mirror_axes")
        return tuple(range(self.spatial_dims)) if axes is None else tuple(int(a) for a in axes)

    @property
    def gate_levels(self) -> int:
        """Gated skips of the network (0 without gates): the `gate_<level>` maps it gives."""
        channels = self.hparams.get("channels", NETWORK_DEFAULTS["channels"])
        return len(channels) - 1 if self.hparams.get("gates", NETWORK_DEFAULTS["gates"]) else 0

    def inference(self, sw_batch_size: int | None = None, overlap: float | None = None,
                  mirror: bool = False) -> WindowInference:
        """The window engine for this network, refusing non-finite logits; None keeps the model's own settings.
        `mirror` flips the `mirror_axes` only."""
        return WindowInference(self.network, self.roi_size, self.num_classes, self.spatial_dims,
                               sw_batch_size=sw_batch_size or int(self.hparams.get("sw_batch_size", 4)),
                               overlap=float(self.hparams.get("sw_overlap", 0.5)) if overlap is None else overlap,
                               mirror=self.mirror_axes if mirror else False, finite=True)

    def to(self, device) -> TrainedModel:
        self.network.to(device)
        return self


def network_state(state_dict: dict) -> dict:
    """The network's weights from a LightningModule's state_dict: `model.` (and `torch.compile`'s `_orig_mod.`) off."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith("model."):
            key = key[len("model."):]
            out[key[len("_orig_mod."):] if key.startswith("_orig_mod.") else key] = value
    return out


def load_weights_only(path, map_location: Any = "cpu") -> Any:
    """`torch.load(path, weights_only=True)`, with `CheckpointError` for unsafe, corrupt or missing files.

    Weights-only whatever the environment says (`TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`): a crafted checkpoint that
    needs arbitrary unpickling is refused before it can run code.
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message is a paragraph that suggests weights_only=False; keep only the line naming the object
        lines = [line.strip() for line in str(err).splitlines() if "GLOBAL" in line or "nsupported" in line]
        what = one_line(lines[0]) if lines else "it holds objects other than tensors and plain data"
        raise CheckpointError(f"refused: not a weights-only checkpoint, loading it could run code ({what})",
                              path) from None
    except FileNotFoundError:
        raise CheckpointError("checkpoint not found", path) from None
    except Exception as err:  # arbitrary bytes trip torch's zip reader and unpickler in many ways (IndexError...)
        raise CheckpointError(f"cannot read checkpoint (corrupt or truncated?): {type(err).__name__}: "
                              f"{first_line(err)}", path) from None


def load_trained_model(path: str | Path, map_location: str | torch.device = "cpu") -> TrainedModel:
    """The network of a `seg fit` checkpoint, in eval mode, with its preprocessing and settings.

    Raises `CheckpointError` for a missing, truncated, unsafe (arbitrary pickle) or foreign checkpoint, one whose
    settings are malformed, or one with NaN or infinite weights.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError("checkpoint not found", path)
    checkpoint = load_weights_only(path, map_location)
    info = checkpoint.get(CHECKPOINT_KEY) if isinstance(checkpoint, dict) else None
    if not isinstance(info, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError("not a seg checkpoint (no model settings inside); use a .ckpt written by `seg fit`",
                              path)
    if not isinstance(info.get("preprocessing"), dict) or not info["preprocessing"]:
        raise CheckpointError("checkpoint has no preprocessing settings; it was not trained with a dataset", path)
    hparams = checkpoint.get("hyper_parameters", {})
    if not isinstance(hparams, dict):
        raise CheckpointError("checkpoint's hyper_parameters are not a mapping; use a .ckpt written by `seg fit`", path)
    check_hyper_parameters(hparams, path)
    check_preprocessing(info["preprocessing"], hparams, path)
    for name, tensor in checkpoint["state_dict"].items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"weight '{name}' holds NaN or infinite values: the model would predict garbage "
                                  "(a diverged run?); use an earlier checkpoint", path)
    try:
        network = build_network(hparams)
        network.load_state_dict(network_state(checkpoint["state_dict"]))
    except (TypeError, RuntimeError, ValueError, KeyError) as err:
        raise CheckpointError(f"checkpoint does not match this version of seg: {first_line(err)}", path) from None
    hparams = {k: v for k, v in hparams.items() if not str(k).startswith("_")}
    if "mirror_axes" not in hparams:  # the axes the loader flipped in training (Lightning keeps its hparams)
        flips = (checkpoint.get("datamodule_hyper_parameters") or {}).get("flip_axes")
        if is_axes(flips, hparams.get("spatial_dims", NETWORK_DEFAULTS["spatial_dims"])):
            hparams["mirror_axes"] = sorted({int(a) for a in flips})
    return TrainedModel(network.eval().to(map_location), info["preprocessing"], hparams)


def check_hyper_parameters(hparams: dict, path: Path) -> None:
    """The hyper-parameters the Predictor reads, with their types and ranges; `CheckpointError` otherwise."""
    checks = {
        "spatial_dims": (lambda v: v in (2, 3), "2 or 3"),
        "in_channels": (is_int, "a positive integer"),
        "out_channels": (lambda v: is_int(v, 2), "an integer >= 2"),
        "channels": (lambda v: isinstance(v, (list, tuple)) and len(v) >= 2 and all(is_int(c) for c in v),
                     "a list of at least 2 positive integers"),
        "sw_overlap": (lambda v: is_number(v, 0.0, MAX_OVERLAP), f"a number in [0, {MAX_OVERLAP}]"),
        "sw_batch_size": (is_int, "a positive integer"),
        "gates": (lambda v: isinstance(v, bool), "true or false"),
        "roi_size": (lambda v: v is None or (isinstance(v, (list, tuple)) and all(is_int(c) for c in v)),
                     "a list of positive integers"),
        "class_names": (lambda v: v is None or (isinstance(v, (list, tuple)) and all(isinstance(c, str) for c in v)),
                        "a list of names"),
    }
    for field, (ok, expected) in checks.items():
        if field in hparams and not ok(hparams[field]):
            refuse(path, f"hyper-parameter '{field}'", hparams[field], expected)
    dims = hparams.get("spatial_dims", NETWORK_DEFAULTS["spatial_dims"])
    if "mirror_axes" in hparams and not is_axes(hparams["mirror_axes"], dims):
        refuse(path, "hyper-parameter 'mirror_axes'", hparams["mirror_axes"], f"a list of spatial axes below {dims}")


def is_axes(value, dims: int) -> bool:
    """A list of spatial axes of a `dims`-D network: integers in [0, dims)."""
    return isinstance(value, (list, tuple)) and all(is_int(a, 0) and a < dims for a in value)
