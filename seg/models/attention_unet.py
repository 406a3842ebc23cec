"""Attention U-Net with CBAM in the encoder and additive attention gates on the skips, for 2D and 3D."""

from __future__ import annotations

from collections.abc import Sequence
from types import MappingProxyType

import numpy as np
import torch
from monai.networks.layers.factories import Conv, Pool
from torch import nn

from seg.models.blocks import CBAM, AttentionGate, ConvBlock
from seg.models.conv import conv_type


# The network's settings and their defaults, written once: `AttentionUNet`'s signature, `SegmentationModule`'s (so
# `seg fit --print_config` shows them) and a checkpoint's reader (a setting absent from an older checkpoint's
# hyper-parameters is this default) all read them from here.
NETWORK_DEFAULTS = MappingProxyType({
    "spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": (16, 32, 64, 128), "strides": (2, 2, 2),
    "cbam": True, "gates": True, "deep_supervision": False, "downsample": "conv", "decoder_convs": 1,
})
_D = NETWORK_DEFAULTS


def _as_tuple(stride: int | Sequence[int], spatial_dims: int) -> tuple[int, ...]:
    return (int(stride),) * spatial_dims if isinstance(stride, (int, np.integer)) else tuple(int(s) for s in stride)


class EncoderLevel(nn.Module):
    """One encoder level: optional downsampling, a `ConvBlock`, then optional CBAM.

    Shapes: `(N, C_in, *S) -> (N, C_out, *S / stride)`; with CBAM also its spatial map `(N, 1, *S / stride)`.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, stride: tuple[int, ...],
                 downsample: str, cbam: bool, cbam_reduction: int, cbam_kernel_size: int, norm, act):
        super().__init__()
        strided = any(s > 1 for s in stride)
        self.pool = Pool[Pool.MAX, spatial_dims](kernel_size=stride, stride=stride) if strided and downsample == "pool" else None
        conv_stride = stride if strided and downsample == "conv" else 1
        self.conv = ConvBlock(spatial_dims, in_channels, out_channels, conv_stride, norm, act)
        self.cbam = CBAM(spatial_dims, out_channels, cbam_reduction, cbam_kernel_size) if cbam else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.pool is not None:
            x = self.pool(x)
        x = self.conv(x)
        if self.cbam is None:
            return x, None
        return self.cbam.forward_with_map(x)


class DecoderLevel(nn.Module):
    """One decoder level: upsample the coarser features, gate the skip with them, concatenate, `ConvBlock`.

    The gating signal is the coarser decoder output *before* upsampling (Oktay et al. 2018, fig. 1).

    Shapes: `coarse (N, C_coarse, *S / stride)`, `skip (N, C, *S)` -> `(N, C, *S)`, gate `(N, 1, *S)` or None.
    """

    def __init__(self, spatial_dims: int, coarse_channels: int, skip_channels: int, stride: tuple[int, ...],
                 gate: bool, norm, act, num_convs: int):
        super().__init__()
        self.up = Conv[Conv.CONVTRANS, spatial_dims](coarse_channels, skip_channels, kernel_size=stride, stride=stride,
                                                    bias=False)
        self.gate = AttentionGate(spatial_dims, skip_channels, coarse_channels, stride=stride) if gate else None
        self.conv = ConvBlock(spatial_dims, 2 * skip_channels, skip_channels, 1, norm, act, num_convs)

    def forward(self, coarse: torch.Tensor, skip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        alpha = None
        if self.gate is not None:
            skip, alpha = self.gate(skip, coarse)
        return self.conv(torch.cat([skip, self.up(coarse)], dim=1)), alpha


class AttentionUNet(nn.Module):
    """U-Net with CBAM after every encoder block and an additive attention gate on every skip connection.

    Encoder level i: `ConvBlock` (two conv-norm-act) with downsampling by `strides[i-1]` (a strided first
    convolution, or max-pooling), then CBAM (Woo et al. 2018). Decoder level i: transposed-convolution upsampling
    of level i+1, the skip of level i multiplied by an attention gate driven by level i+1 (Oktay et al. 2018),
    concatenation, `decoder_convs` conv-norm-act layers. A 1x1 convolution gives the logits.

    Args:
        spatial_dims: 2 or 3 (1 works too).
        in_channels: image channels (modalities).
        out_channels: classes, background included.
        channels: width of each level, finest first, e.g. `(16, 32, 64, 128)`.
        strides: downsampling between consecutive levels, `len(channels) - 1` entries; each an int or one int
            per spatial axis (anisotropic data, e.g. `(2, 2, 1)`).
        cbam: CBAM after every encoder block.
        gates: attention gates on the skips. `cbam=False, gates=False` is a plain U-Net of the same widths.
        deep_supervision: in training mode `forward` returns a list of logits, full resolution first, then one
            1x1 head per coarser decoder level (nnU-Net convention); in eval mode only the full-resolution logits.
        downsample: "conv" (strided convolution) or "pool" (max-pooling).
        decoder_convs: conv-norm-act layers after each concatenation. 1 (as MONAI's AttentionUnet) keeps a
            training step as fast as MONAI's although CBAM is added (bench/model_speed.py); 2 is nnU-Net's
            decoder, ~25% more compute for more decoder capacity.
        cbam_reduction: CBAM channel-MLP reduction ratio r.
        cbam_kernel_size: CBAM spatial-attention kernel size k.
        norm: MONAI norm name or `(name, kwargs)`.
        act: MONAI activation name or `(name, kwargs)`.

    Shapes: `x (N, in_channels, *S)` with every `S_d` divisible by `prod(strides)[d]` (see `size_multiple`) ->
    logits `(N, out_channels, *S)`.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int,
                 channels: Sequence[int] = _D["channels"], strides: Sequence[int | Sequence[int]] = _D["strides"],
                 cbam: bool = _D["cbam"], gates: bool = _D["gates"], deep_supervision: bool = _D["deep_supervision"],
                 downsample: str = _D["downsample"], decoder_convs: int = _D["decoder_convs"], cbam_reduction: int = 16, cbam_kernel_size: int = 7,
                 norm: str | tuple = ("instance", {"affine": True}),
                 act: str | tuple = ("leakyrelu", {"negative_slope": 0.01, "inplace": True})):
        super().__init__()
        if len(strides) != len(channels) - 1:
            raise ValueError(f"strides needs len(channels) - 1 = {len(channels) - 1} entries, got {len(strides)}")
        if downsample not in ("conv", "pool"):
            raise ValueError(f"downsample must be 'conv' or 'pool', got {downsample!r}")
        self.spatial_dims = spatial_dims
        self.strides = [_as_tuple(s, spatial_dims) for s in strides]
        self.deep_supervision = deep_supervision
        ones = (1,) * spatial_dims
        level_strides = [ones] + self.strides
        widths = [in_channels] + list(channels)
        self.encoder = nn.ModuleList(
            EncoderLevel(spatial_dims, widths[i], widths[i + 1], level_strides[i], downsample, cbam,
                         cbam_reduction, cbam_kernel_size, norm, act)
            for i in range(len(channels)))
        # decoder[i] produces level i from level i + 1; stored finest first, run coarsest first.
        self.decoder = nn.ModuleList(
            DecoderLevel(spatial_dims, channels[i + 1], channels[i], self.strides[i], gates, norm, act, decoder_convs)
            for i in range(len(channels) - 1))
        conv = conv_type(spatial_dims)
        self.head = conv(channels[0], out_channels, kernel_size=1)
        # Deep-supervision heads on decoder levels 1 .. L-2 (the bottleneck has none, as in nnU-Net).
        self.aux_heads = nn.ModuleList(
            conv(channels[i], out_channels, kernel_size=1) for i in range(1, len(channels) - 1)
        ) if deep_supervision else nn.ModuleList()

    @property
    def size_multiple(self) -> tuple[int, ...]:
        """Every spatial size of the input must be a multiple of this, per axis."""
        return tuple(int(m) for m in np.prod(np.array(self.strides), axis=0)) if self.strides else (1,) * self.spatial_dims

    def _check_size(self, x: torch.Tensor) -> None:
        spatial = tuple(x.shape[2:])
        multiple = self.size_multiple
        if len(spatial) != self.spatial_dims:
            raise ValueError(f"expected input (N, C, {self.spatial_dims} spatial axes), got shape {tuple(x.shape)}")
        if any(s % m for s, m in zip(spatial, multiple)):
            raise ValueError(f"input spatial size {spatial} must be a multiple of {multiple} per axis "
                             f"(the product of the strides); pad or crop the input")

    def _forward(self, x: torch.Tensor, want_gates: bool, want_cbam: bool):
        self._check_size(x)
        skips, cbam_maps = [], []
        for level in self.encoder:
            x, spatial_map = level(x)
            skips.append(x)
            if want_cbam and spatial_map is not None:
                cbam_maps.append(spatial_map)
        gates, decoded = [], []
        x = skips[-1]
        for i in reversed(range(len(self.decoder))):
            x, alpha = self.decoder[i](x, skips[i])
            decoded.append(x)  # coarsest first
            if want_gates and alpha is not None:
                gates.append(alpha)
        logits = self.head(x)
        if self.deep_supervision and self.training:
            # decoded[-1] is level 0 (already the main head); aux heads cover levels 1 .. L-2, finest first.
            coarser = decoded[-2::-1][: len(self.aux_heads)]
            logits = [logits] + [head(f) for head, f in zip(self.aux_heads, coarser)]
        return logits, gates, cbam_maps

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """Logits `(N, out_channels, *S)`; a list (full resolution first) with deep supervision in training."""
        return self._forward(x, False, False)[0]

    def forward_with_gates(self, x: torch.Tensor, return_cbam: bool = False):
        """Logits and the attention-gate maps, one per gated skip, coarsest first.

        Returns:
            `(logits, gates)`, or `(logits, gates, cbam_maps)` with `return_cbam`: `gates[j]` is
            `(N, 1, *S_level)` in [0, 1] on the grid of the skip it gates; `cbam_maps[j]` is CBAM's spatial
            attention map of encoder level j, finest first. `logits` equal `forward(x)`.
        """
        logits, gates, cbam_maps = self._forward(x, True, return_cbam)
        return (logits, gates, cbam_maps) if return_cbam else (logits, gates)
