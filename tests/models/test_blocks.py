"""The attention blocks compute the papers' equations, for 2D and 3D tensors."""

import pytest
import torch
import torch.nn.functional as F

from seg.models.blocks import CBAM, AttentionGate, ChannelAttention, ConvBlock, SpatialAttention


@pytest.mark.parametrize("spatial", [(6, 10), (4, 6, 10)])
def test_channel_attention_matches_equation(spatial):
    torch.manual_seed(0)
    block = ChannelAttention(channels=32, reduction=16)
    x = torch.randn(2, 32, *spatial)
    flat = x.flatten(2)
    expected_scale = torch.sigmoid(block.mlp(flat.mean(-1)) + block.mlp(flat.amax(-1)))
    expected = x * expected_scale.reshape(2, 32, *([1] * len(spatial)))
    torch.testing.assert_close(block(x), expected)


def test_channel_attention_hidden_width_has_a_floor():
    assert ChannelAttention(16, reduction=16).mlp[0].out_features == 8   # 16 // 16 = 1, floored at 8
    assert ChannelAttention(256, reduction=16).mlp[0].out_features == 16
    assert ChannelAttention(4, reduction=16).mlp[0].out_features == 4    # never wider than the input


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_spatial_attention_matches_equation(spatial_dims):
    torch.manual_seed(0)
    block = SpatialAttention(spatial_dims, kernel_size=7)
    x = torch.randn(2, 5, *([9] * spatial_dims))
    pooled = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)
    conv = F.conv2d if spatial_dims == 2 else F.conv3d
    expected = torch.sigmoid(conv(pooled, block.conv.weight, block.conv.bias, padding=3))
    out = block(x)
    assert out.shape == (2, 1, *([9] * spatial_dims))
    torch.testing.assert_close(out, expected)


def test_cbam_applies_channel_then_spatial():
    torch.manual_seed(0)
    block = CBAM(3, channels=16)
    x = torch.randn(1, 16, 5, 6, 7)
    refined = block.channel(x)
    expected = refined * block.spatial(refined)
    out, spatial_map = block.forward_with_map(x)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(block(x), expected)
    assert spatial_map.shape == (1, 1, 5, 6, 7)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_attention_gate_matches_equation(spatial_dims):
    torch.manual_seed(0)
    gate = AttentionGate(spatial_dims, skip_channels=8, gating_channels=16, stride=2)
    x = torch.randn(2, 8, *([12] * spatial_dims))
    g = torch.randn(2, 16, *([6] * spatial_dims))
    conv = F.conv2d if spatial_dims == 2 else F.conv3d
    theta = conv(x, gate.theta.weight, stride=2)
    phi = conv(g, gate.phi.weight, gate.phi.bias)
    coarse_alpha = torch.sigmoid(conv(F.relu(theta + phi), gate.psi.weight, gate.psi.bias))
    mode = "bilinear" if spatial_dims == 2 else "trilinear"
    alpha_expected = F.interpolate(coarse_alpha, size=x.shape[2:], mode=mode, align_corners=False)
    gated, alpha = gate(x, g)
    assert alpha.shape == (2, 1, *([12] * spatial_dims))
    torch.testing.assert_close(alpha, alpha_expected)
    torch.testing.assert_close(gated, x * alpha_expected)
    assert 0.0 <= alpha.min() and alpha.max() <= 1.0


def test_conv_block_downsamples_by_stride():
    block = ConvBlock(3, 4, 8, stride=(2, 2, 1))
    assert block(torch.randn(1, 4, 8, 8, 6)).shape == (1, 8, 4, 4, 6)
