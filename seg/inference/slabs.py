"""Label maps by sliding-window inference in slabs, for volumes whose full-size logits would not fit.

MONAI's `sliding_window_inference` stitches every window into full-volume buffers: the weighted sum of the
logits and the sum of the weights, (classes + 1) float32 values a voxel. For a 512 x 512 x 400 CT with three
classes that is 1.6 GiB beside a 0.4 GiB input, and `argmax` then needs only one byte a voxel of it.
`sliding_window_labels` runs the same MONAI call on overlapping slabs along one axis instead, and keeps the
uint8 argmax of each slab's share: the buffers shrink to one slab's worth.

The slabs are cut on the whole volume's own window grid: a slab starts where one of the volume's windows starts
and ends where one ends, so MONAI places the slab's windows exactly where it places them in the whole volume,
and a slab keeps only the voxels whose every covering window lies inside it. The labels therefore equal the
argmax of the whole-volume stitching (up to float rounding). The price: at each seam the windows that cover
both sides are run twice, `ceil(roi / interval) - 1` rows of them (one row at the default overlap of 0.5).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from monai.data.utils import dense_patch_slices
from monai.inferers import sliding_window_inference


def label_dtype(num_classes: int) -> torch.dtype:
    """uint8 class indices, int16 past 256 classes."""
    return torch.uint8 if num_classes <= 256 else torch.int16


def class_indices(logits: torch.Tensor, out: torch.Tensor | None = None, dim: int = -1) -> torch.Tensor:
    """`logits.argmax(1, keepdim=True)` as uint8 `(N, 1, *S)` (int16 past 256 classes), into `out` when given.

    Ties go to the lower class, as with `argmax`. A few indices of axis `dim` at a time, and by a running
    comparison of the classes instead of `argmax`: torch's argmax over the strided class axis gives int64 (8 bytes
    a voxel, 0.8 GiB for a 512 x 512 x 400 CT, where 1 will do) and is slow on a CPU: 67 ms for a
    (4, 3, 40, 56, 40) batch of hippocampus windows on two cores, a fifth of the bf16 forward pass; the
    comparison takes 7 ms.
    """
    if out is None:
        out = torch.empty((logits.shape[0], 1, *logits.shape[2:]), dtype=label_dtype(logits.shape[1]),
                          device=logits.device)
    size = logits.shape[dim]
    step = max(1, size // 8)
    for start in range(0, size, step):
        length = min(step, size - start)
        chunk, target = logits.narrow(dim, start, length), out.narrow(dim, start, length)
        best = chunk[:, :1].clone()
        target.zero_()
        for k in range(1, chunk.shape[1]):
            higher = chunk[:, k:k + 1] > best
            target.masked_fill_(higher, k)
            torch.maximum(best, chunk[:, k:k + 1], out=best)
    return out


def window_starts(size: int, roi: int, overlap: float) -> list[int]:
    """Where `sliding_window_inference` puts its windows along one axis of length `size` (MONAI's own rule)."""
    if size <= roi:
        return [0]  # MONAI pads up to the window
    interval = max(int(roi * (1 - overlap)), 1)
    return [int(window[0].start) for window in dense_patch_slices([size], [roi], [interval])]


@dataclass(frozen=True)
class Slab:
    """A range of one axis: the network sees `[start, stop)`, and the labels of `[keep_start, keep_stop)` are final."""

    start: int
    stop: int
    keep_start: int
    keep_stop: int


def plan_slabs(size: int, roi: int, overlap: float, max_length: int) -> list[Slab]:
    """Slabs along an axis of length `size`, each at most `max_length` long where the window grid allows.

    A slab holds consecutive windows `i0..i1`; voxel `z` is final in it when every window covering `z` is among
    them: from the end of window `i0 - 1` to the start of window `i1 + 1`. The keep ranges tile `[0, size)`. A
    slab holds at least the windows that let the next one start further on (the start of window `i1 + 1` at or
    past the end of window `i0`), so a `max_length` below about `roi + interval` is exceeded, not stuck on.
    """
    starts = window_starts(size, roi, overlap)
    ends = [min(s + roi, size) for s in starts]
    n = len(starts)
    slabs: list[Slab] = []
    first, keep_start = 0, 0
    while True:
        last = first
        while last + 1 < n:
            advances = ends[first] <= starts[last + 1]
            fits = ends[last + 1] - starts[first] <= max_length
            if advances and not fits:
                break
            last += 1
        keep_stop = size if last == n - 1 else starts[last + 1]
        slabs.append(Slab(starts[first], size if last == n - 1 else ends[last], keep_start, keep_stop))
        if last == n - 1:
            return slabs
        # the next slab starts at the latest window whose predecessor ends inside what is final already
        first = max(i for i in range(first + 1, n) if ends[i - 1] <= keep_stop)
        keep_start = keep_stop


def stitch_budget(image: torch.Tensor) -> int:
    """What the stitching buffers for `image` should take: twice its size, never below 256 MiB.

    Whole-volume buffers hold (classes + 1) float32 values a voxel, 4x a one-channel input for three classes;
    so capped, a big CT is done in a few slabs and a small scan in one pass.
    """
    return max(256 * 2**20, 2 * image.numel() * image.element_size())


def sliding_window_labels(
    image: torch.Tensor,
    roi_size: Sequence[int],
    sw_batch_size: int,
    predictor: Callable[[torch.Tensor], torch.Tensor],
    num_classes: int,
    overlap: float = 0.5,
    max_buffer_bytes: int | None = None,
    **kwargs,
) -> torch.Tensor:
    """Class indices `(N, 1, *S)` (uint8; int16 past 256 classes) of `sliding_window_inference` with Gaussian blending.

    Args:
        image: `(N, C, *S)`.
        roi_size, sw_batch_size, predictor, overlap: as for `sliding_window_inference`; `predictor` returns logits
            `(n, num_classes, *roi)`.
        num_classes: the logits' channels (sizes the buffers).
        max_buffer_bytes: what the stitching buffers of one pass should take at most; above it the volume is
            done in slabs along the axis with the most windows (long enough that at most a third of the
            windows are run twice). None: the whole volume at once.
        kwargs: passed on to `sliding_window_inference` (e.g. `sw_device`, `device`).
    """
    spatial = tuple(image.shape[2:])
    out = torch.empty((image.shape[0], 1, *spatial), dtype=label_dtype(num_classes),
                      device=kwargs.get("device") or image.device)
    counts = [len(window_starts(s, r, overlap)) for s, r in zip(spatial, roi_size)]
    axis = max(range(len(spatial)), key=lambda a: (counts[a], a))  # ties: the last axis
    buffer_per_index = image.shape[0] * (num_classes + 1) * 4 * math.prod(spatial) // spatial[axis]
    if max_buffer_bytes is None or counts[axis] == 1 or buffer_per_index * spatial[axis] <= max_buffer_bytes:
        slabs = [Slab(0, spatial[axis], 0, spatial[axis])]
    else:
        # A seam reruns the q - 1 windows that straddle it (q: windows covering a voxel); a slab of at least
        # 4 (q - 1) windows keeps the reruns to a third at most. Without overlap, no minimum.
        roi = roi_size[axis]
        interval = max(int(roi * (1 - overlap)), 1)
        reruns = math.ceil(roi / interval) - 1
        length = max(max_buffer_bytes // buffer_per_index, roi + (4 * reruns - 1) * interval if reruns else 1)
        slabs = plan_slabs(spatial[axis], roi, overlap, length)
    dim = 2 + axis
    for slab in slabs:
        logits = sliding_window_inference(image.narrow(dim, slab.start, slab.stop - slab.start), roi_size,
                                          sw_batch_size, predictor, overlap=overlap, mode="gaussian", **kwargs)
        keep = logits.narrow(dim, slab.keep_start - slab.start, slab.keep_stop - slab.keep_start)
        class_indices(keep, out=out.narrow(dim, slab.keep_start, slab.keep_stop - slab.keep_start), dim=dim)
        del logits, keep
    return out
