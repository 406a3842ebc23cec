"""The convolution the network's blocks build: MONAI's, except a 3D one that trains safely in CPU bf16.

On a CPU with AVX-512 BF16 (AMD EPYC, torch 2.13's oneDNN), the bf16 backward of a 3D convolution whose kernel
is larger than its input along some axis reads memory it never wrote, and its weight gradient comes out NaN or
inf now and then. With freed memory filled with NaN first (`bench/bf16_small_grid.py`): 36 of 40 tries for
CBAM's 7^3 convolution on a 5 x 7 x 5 grid in channels-last, 15 of 40 for a 3^3 one on an axis 2 voxels thin,
none in float32. In a sweep of 48 random 3D shapes it faulted in 6 of the 20 whose kernel exceeded the input
(once by heap corruption that ended the process, once by a hang) and in none of the 28 whose kernel fit. In the
Attention U-Net this is CBAM's spatial convolution on the hippocampus bottleneck: 13 of 600 bf16 training steps
had a non-finite gradient in that one weight and no other, none when the same step was replayed, and none in
float32.

A kernel larger than its grid means a small grid, so computing such a convolution in float32 costs nothing
measurable (bf16 training steps of the hippocampus and ACDC 3D plans: 0.95-1.02x of plain ones) and removes
the fault. Every convolution whose kernel fits stays in bf16.
"""

from __future__ import annotations

import torch
from monai.networks.layers.factories import Conv
from torch import nn


def kernel_exceeds_input(kernel_size: tuple[int, ...], spatial_shape: tuple[int, ...]) -> bool:
    """Whether the kernel is larger than the input along some spatial axis."""
    return any(k > s for k, s in zip(kernel_size, spatial_shape))


class Conv3dSafeBF16(nn.Conv3d):
    """`nn.Conv3d` that trains in float32, not bf16, under CPU autocast when its kernel exceeds its input.

    Same parameters and state dict as `nn.Conv3d`; only the training-time (grad-enabled) forward under CPU
    autocast with `kernel_exceeds_input` changes: the input is cast to float32 and autocast is off for this
    convolution, so its output is float32. Inference, float32 training and GPU autocast are untouched.

    Shapes: `(N, C_in, D, H, W) -> (N, C_out, D', H', W')`, as `nn.Conv3d`.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type == "cpu" and torch.is_grad_enabled() and torch.is_autocast_enabled("cpu")
                and kernel_exceeds_input(self.kernel_size, tuple(x.shape[2:]))):
            with torch.autocast("cpu", enabled=False):
                return super().forward(x.float())
        return super().forward(x)


def conv_type(spatial_dims: int) -> type[nn.Module]:
    """The convolution class for `spatial_dims` (1, 2 or 3): MONAI's `Conv` factory, `Conv3dSafeBF16` for 3D."""
    return Conv3dSafeBF16 if spatial_dims == 3 else Conv[Conv.CONV, spatial_dims]
