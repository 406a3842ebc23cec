"""Sliding-window inference of a segmentation network over whole volumes: the one engine under validation,
`seg predict` and `seg overlays`.

MONAI's `sliding_window_inference` does the windows and the Gaussian blending; this module decides what each
window returns: the logits; or, with mirroring (test-time augmentation), the softmax averaged over every
combination of flips of the window, done window by window as nnU-Net does, so mirrored prediction streams
through the same slabs as plain prediction (`seg.inference.slabs`) and never holds a full-size map per flip; and
optionally the attention-gate (and CBAM) maps of the same forward passes, upsampled to the window so that MONAI
blends them exactly like the logits.

A 2D network (`spatial_dims=2`) slides over `(H, W, 1)` slabs of a 3D volume: each window's last axis is dropped
for the network and restored for the stitching.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from monai.inferers import sliding_window_inference
from torch import nn

from seg.errors import SegError
from seg.inference.slabs import class_indices, sliding_window_labels


def mirror_combinations(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every subset of `axes` (the empty one first): the flips that mirroring TTA averages over."""
    return [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]


class WindowInference:
    """Whole-volume prediction `(N, C, *S)` of `network` by sliding windows.

    Args:
        network: `(n, C, *roi) -> (n, num_classes, *roi)` logits; for gate maps it needs
            `forward_with_gates(x, return_cbam=...)` returning `(logits, gates, [cbam])` (`AttentionUNet`).
        roi_size: the window: `spatial_dims` values (the training patch).
        num_classes: the network's output channels.
        spatial_dims: 3, or 2 for a network that sees `(H, W)` slices.
        sw_batch_size: windows per forward pass.
        overlap: overlap of neighbouring windows.
        mirror: average the softmax over every flip of the window's spatial axes (8 in 3D, 4 in 2D); or a list
            of spatial axes (0 the first), every flip of those alone.
        memory_format: e.g. `torch.channels_last_3d` for the windows (faster convolutions on recent GPUs).
        finite: refuse (`SegError`) logits with NaN or infinite values, which would otherwise become class 0
            everywhere without a word; off for validation, where a diverged network is training's business.
    """

    def __init__(self, network: nn.Module, roi_size: Sequence[int], num_classes: int, spatial_dims: int = 3,
                 sw_batch_size: int = 4, overlap: float = 0.5, mirror: bool | Sequence[int] = False,
                 memory_format: torch.memory_format | None = None, finite: bool = False):
        self.network = network
        self.finite = finite
        self.spatial_dims = int(spatial_dims)
        self.roi_size = tuple(int(r) for r in roi_size)[: self.spatial_dims]
        self.num_classes = int(num_classes)
        self.sw_batch_size = int(sw_batch_size)
        self.overlap = float(overlap)
        axes = range(self.spatial_dims) if mirror is True else mirror or ()
        self.flips = mirror_combinations([2 + int(a) for a in axes])  # [()] without mirroring
        self.memory_format = memory_format

    @property
    def window(self) -> tuple[int, ...]:
        """The window on a volume: the roi, with a unit last axis for a 2D network."""
        return self.roi_size + (1,) if self.spatial_dims == 2 else self.roi_size

    # ---- one batch of windows ---------------------------------------------------------------------------------
    def _forward(self, x: torch.Tensor, gates: bool, cbam: bool) -> tuple[torch.Tensor, list[tuple[str, torch.Tensor]]]:
        if self.memory_format is not None:
            x = x.contiguous(memory_format=self.memory_format)
        # .float(): under autocast (bf16 on a CPU, fp16 on a GPU) the stitching buffers stay float32
        if not gates:
            return self._checked(self.network(x).float()), []
        logits, gate_maps, *cbam_maps = self.network.forward_with_gates(x, return_cbam=cbam)
        logits = self._checked(logits.float())
        maps = [(f"gate_{level}", m) for level, m in enumerate(gate_maps)]
        maps += [(f"cbam_{level}", m) for level, m in enumerate(cbam_maps[0] if cbam_maps else [])]
        mode = "bilinear" if self.spatial_dims == 2 else "trilinear"
        return logits, [(k, nn.functional.interpolate(m, size=x.shape[2:], mode=mode, align_corners=False))
                        for k, m in maps]

    def _checked(self, logits: torch.Tensor) -> torch.Tensor:
        if self.finite and not bool(torch.isfinite(logits).all()):
            raise SegError("the network produced non-finite outputs (NaN or infinite logits): a broken model, or "
                           "one that overflows in reduced precision (try --precision fp32)")
        return logits

    def window_function(self, gates: bool = False, cbam: bool = False, softmax: bool = False):
        """The function MONAI calls on each batch of windows `(n, C, *window)`.

        Returns logits, or the softmax (averaged over the flips when mirroring, which implies `softmax`), or with
        `gates` a dict {"scores": ..., "gate_0": ..., ...} of the same forward passes.
        """
        squeeze = self.spatial_dims == 2
        mirrored = len(self.flips) > 1

        def predict(window: torch.Tensor):
            x = window[..., 0] if squeeze else window
            score_sum, map_sums = None, {}
            for axes in self.flips:
                logits, maps = self._forward(torch.flip(x, axes) if axes else x, gates, cbam)
                score = torch.softmax(logits.float(), 1) if softmax or mirrored else logits
                score = torch.flip(score, axes) if axes else score
                score_sum = score if score_sum is None else score_sum.add_(score)
                for key, m in maps:
                    m = torch.flip(m.float(), axes) if axes else m.float()
                    map_sums[key] = m if key not in map_sums else map_sums[key].add_(m)
            n = len(self.flips)
            outputs = {"scores": score_sum / n if n > 1 else score_sum,
                       **{k: v / n if n > 1 else v for k, v in map_sums.items()}}
            outputs = {k: v[..., None] if squeeze else v for k, v in outputs.items()}
            return outputs if gates else outputs["scores"]

        return predict

    # ---- whole volumes ----------------------------------------------------------------------------------------
    def predict(self, image: torch.Tensor, gates: bool = False, cbam: bool = False, softmax: bool = False,
                **kwargs) -> dict[str, torch.Tensor]:
        """Full-size maps of `image` `(N, C, *S)`.

        Returns:
            "scores": logits `(N, num_classes, *S)`, or the softmax with `softmax` or mirroring; with `gates`
            also "gate_<level>" `(N, 1, *S)` (coarsest first) and with `cbam` "cbam_<level>" (finest first).
        kwargs go to `sliding_window_inference` (`sw_device`, `device`).
        """
        out = sliding_window_inference(image, self.window, self.sw_batch_size,
                                       self.window_function(gates, cbam, softmax), overlap=self.overlap,
                                       mode="gaussian", **kwargs)
        return out if isinstance(out, dict) else {"scores": out}

    def labels(self, image: torch.Tensor, max_buffer_bytes: int | None = None, **kwargs) -> torch.Tensor:
        """Class indices `(N, 1, *S)` (uint8) without full-size maps: in slabs above `max_buffer_bytes` (see
        `seg.inference.slabs`); mirrored the same way, window by window."""
        return sliding_window_labels(image, self.window, self.sw_batch_size, self.window_function(),
                                     self.num_classes, overlap=self.overlap, max_buffer_bytes=max_buffer_bytes,
                                     **kwargs)


__all__ = ["WindowInference", "class_indices", "mirror_combinations"]
