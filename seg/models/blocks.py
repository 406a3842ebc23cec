"""Building blocks of the Attention U-Net: the conv block, CBAM, and the additive attention gate.

Every block serves 1D/2D/3D through `spatial_dims`; tensors are `(N, C, *spatial)`.

References:
    Woo et al., "CBAM: Convolutional Block Attention Module", ECCV 2018.
    Oktay et al., "Attention U-Net: Learning Where to Look for the Pancreas", MIDL 2018.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.layers.utils import get_act_layer, get_norm_layer
from torch import nn

from seg.models.conv import conv_type

_INTERP = {1: "linear", 2: "bilinear", 3: "trilinear"}


class ConvBlock(nn.Sequential):
    """`num_convs` (default two) `conv(k=3) -> norm -> act` layers; the first may downsample by `stride`.

    Args:
        spatial_dims: 1, 2 or 3.
        in_channels: channels of the input.
        out_channels: channels of every convolution's output.
        stride: stride of the first convolution (an int or one per spatial axis).
        norm: MONAI norm name or `(name, kwargs)`, e.g. `("instance", {"affine": True})`.
        act: MONAI activation name or `(name, kwargs)`.
        num_convs: number of conv-norm-act layers.

    Shapes: `(N, in_channels, *S) -> (N, out_channels, *S / stride)`.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, stride: int | Sequence[int] = 1,
                 norm: str | tuple = ("instance", {"affine": True}),
                 act: str | tuple = ("leakyrelu", {"negative_slope": 0.01, "inplace": True}), num_convs: int = 2):
        conv = conv_type(spatial_dims)
        layers = []
        for i in range(num_convs):
            layers += [conv(in_channels if i == 0 else out_channels, out_channels, kernel_size=3,
                            stride=stride if i == 0 else 1, padding=1, bias=False),
                       get_norm_layer(norm, spatial_dims, out_channels), get_act_layer(act)]
        super().__init__(*layers)


class ChannelAttention(nn.Module):
    """CBAM channel attention: `M_c(F) = sigmoid(MLP(AvgPool(F)) + MLP(MaxPool(F)))`, output `F * M_c(F)`.

    The two-layer MLP (`C -> C/r -> C`) is shared between the two pooled descriptors.

    Args:
        channels: C.
        reduction: r, the MLP's reduction ratio.
        min_hidden: floor on the hidden width `C/r`, so that narrow layers (C = 16, r = 16) keep capacity.

    Shapes: `(N, C, *S) -> (N, C, *S)`.
    """

    def __init__(self, channels: int, reduction: int = 16, min_hidden: int = 8):
        super().__init__()
        hidden = max(channels // reduction, min(min_hidden, channels))
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        flat = x.reshape(n, c, -1)
        # Both descriptors go through the MLP as one batch of 2N rows: one matmul instead of two.
        descriptors = torch.cat([flat.mean(-1), flat.max(-1).values], dim=0)
        # chunk(2), not split(n): the same halves, but an ONNX export keeps the batch axis dynamic (split(n)
        # records n as a constant)
        avg, mx = self.mlp(descriptors).chunk(2, dim=0)
        scale = torch.sigmoid(avg + mx).reshape(n, c, *([1] * (x.ndim - 2)))
        return x * scale


class SpatialAttention(nn.Module):
    """CBAM spatial attention map: `M_s(F) = sigmoid(conv_k([mean_c(F); max_c(F)]))`.

    Args:
        spatial_dims: 1, 2 or 3.
        kernel_size: k of the `k^d` convolution (7 in the paper).

    Shapes: `(N, C, *S) -> (N, 1, *S)`, values in (0, 1). The caller multiplies `F` by it.
    """

    def __init__(self, spatial_dims: int, kernel_size: int = 7):
        super().__init__()
        self.conv = conv_type(spatial_dims)(2, 1, kernel_size=kernel_size, padding=kernel_size // 2)
        self.memory_format = {2: torch.channels_last, 3: torch.channels_last_3d}.get(spatial_dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # max().values, not amax(): its backward is an index scatter, amax's a mask-count-divide that took
        # 30% of CBAM's time at full resolution (torch.profiler, 16x64^3).
        pooled = torch.cat([x.mean(1, keepdim=True), x.max(1, keepdim=True).values], dim=1)
        if self.memory_format is not None and not torch.onnx.is_in_onnx_export():
            # (Skipped for ONNX export, which has no memory formats: a layout, not a value.)
            # A 2-in/1-out k^d convolution is ~3x faster forward+backward on oneDNN in channels-last
            # (bench/model_speed.py; 7^3 on 64^3: 0.24 s -> 0.08 s), which keeps CBAM cheap at full resolution.
            pooled = pooled.contiguous(memory_format=self.memory_format)
        return torch.sigmoid(self.conv(pooled))


class CBAM(nn.Module):
    """Convolutional Block Attention Module: channel attention, then spatial attention.

    `F' = M_c(F) * F`, `F'' = M_s(F') * F'` (Woo et al. 2018, eq. 1).

    Args:
        spatial_dims: 1, 2 or 3.
        channels: C.
        reduction: channel-attention MLP reduction ratio r.
        kernel_size: spatial-attention kernel size k.

    Shapes: `(N, C, *S) -> (N, C, *S)`; `forward_with_map` also returns `M_s` as `(N, 1, *S)`.
    """

    def __init__(self, spatial_dims: int, channels: int, reduction: int = 16, kernel_size: int = 7):
        super().__init__()
        self.channel = ChannelAttention(channels, reduction)
        self.spatial = SpatialAttention(spatial_dims, kernel_size)

    def forward_with_map(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.channel(x)
        attention = self.spatial(x)
        return x * attention, attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_map(x)[0]


class AttentionGate(nn.Module):
    """Additive attention gate on a skip connection (Oktay et al. 2018, eq. 1-2).

    `alpha = sigmoid(psi(ReLU(theta(x) + phi(g))))`, computed on the gating signal's (coarser) grid, where
    `theta` is a strided `s^d` convolution that brings the skip `x` onto that grid and `phi`, `psi` are 1x1
    convolutions. `alpha` is resampled (linear interpolation) onto the skip's grid and the gate returns `x * alpha`.

    Args:
        spatial_dims: 1, 2 or 3.
        skip_channels: channels of the skip features `x`.
        gating_channels: channels of the gating signal `g` from the coarser decoder level.
        inter_channels: width of the joint space; default `skip_channels // 2` (at least 1).
        stride: grid ratio between `x` and `g` (the encoder stride at this level).

    Shapes: `x (N, Cx, *S)`, `g (N, Cg, *S / stride)` -> gated `x (N, Cx, *S)`, `alpha (N, 1, *S)` in [0, 1].
    """

    def __init__(self, spatial_dims: int, skip_channels: int, gating_channels: int, inter_channels: int | None = None,
                 stride: int | Sequence[int] = 2):
        super().__init__()
        conv = conv_type(spatial_dims)
        inter = inter_channels or max(skip_channels // 2, 1)
        self.theta = conv(skip_channels, inter, kernel_size=stride, stride=stride, bias=False)
        self.phi = conv(gating_channels, inter, kernel_size=1, bias=True)
        self.psi = conv(inter, 1, kernel_size=1, bias=True)
        self.mode = _INTERP[spatial_dims]

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        theta_x = self.theta(x)
        phi_g = self.phi(g)
        if phi_g.shape[2:] != theta_x.shape[2:]:  # only when a stride does not divide the skip's size
            phi_g = F.interpolate(phi_g, size=theta_x.shape[2:], mode=self.mode, align_corners=False)
        alpha = torch.sigmoid(self.psi(F.relu(theta_x + phi_g)))
        # Linear interpolation of values in [0, 1] stays in [0, 1]: the upsampled map is still a gate.
        alpha = F.interpolate(alpha, size=x.shape[2:], mode=self.mode, align_corners=False)
        return x * alpha, alpha
