"""The 3D convolution that trains in float32 where CPU bf16 gives wrong weight gradients (kernel > input)."""

import pytest
import torch

from seg.models.attention_unet import AttentionUNet
from seg.models.conv import Conv3dSafeBF16, conv_type, kernel_exceeds_input


def _fill_freed_memory_with_nan():
    """What the faulty kernel reads is freed memory: make it NaN, so a read of it shows in the gradient."""
    for size in (2**12, 2**14, 2**16, 2**18):
        torch.full((size,), float("nan"))
        torch.full((size,), float("nan"), dtype=torch.bfloat16)


def test_kernel_exceeds_input():
    assert kernel_exceeds_input((7, 7, 7), (5, 7, 5))
    assert kernel_exceeds_input((3, 3, 3), (1, 8, 8))
    assert not kernel_exceeds_input((7, 7, 7), (7, 7, 7))
    assert not kernel_exceeds_input((3, 3, 3), (4, 40, 40))


def test_conv_type_is_the_safe_conv_in_3d_only():
    assert conv_type(3) is Conv3dSafeBF16
    assert conv_type(2) is torch.nn.Conv2d
    net = AttentionUNet(3, 1, 2, channels=(4, 8), strides=(2,))
    assert all(type(m) is Conv3dSafeBF16 for m in net.modules() if isinstance(m, torch.nn.Conv3d))
    assert sum(isinstance(m, Conv3dSafeBF16) for m in net.modules()) >= 5


@pytest.mark.parametrize("shape, float32", [((5, 7, 5), True), ((2, 8, 8), True), ((8, 8, 8), False)])
def test_bf16_training_runs_float32_exactly_where_the_kernel_exceeds_the_input(shape, float32):
    torch.manual_seed(0)
    conv = Conv3dSafeBF16(2, 1, 7, padding=3)
    x = torch.randn(2, 2, *shape)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        trained = conv(x)
        with torch.no_grad():  # inference keeps bf16's speed: the fault is in the weight gradient only
            inferred = conv(x)
    assert trained.dtype == (torch.float32 if float32 else torch.bfloat16)
    assert inferred.dtype == torch.bfloat16
    assert trained.shape == (2, 1, *shape)
    # the float32 path is the plain convolution's value, to float32 rounding
    reference = torch.nn.functional.conv3d(x, conv.weight, conv.bias, padding=3)
    tolerance = 1e-5 if float32 else 5e-2
    torch.testing.assert_close(trained.float(), reference, atol=tolerance, rtol=tolerance)


def test_float32_training_and_state_dict_are_those_of_conv3d():
    torch.manual_seed(0)
    safe, plain = Conv3dSafeBF16(3, 4, 3, padding=1), torch.nn.Conv3d(3, 4, 3, padding=1)
    plain.load_state_dict(safe.state_dict())  # the same keys and shapes: old checkpoints load
    x = torch.randn(1, 3, 2, 6, 6)
    torch.testing.assert_close(safe(x), plain(x))


def test_bf16_weight_gradient_is_finite_on_a_grid_smaller_than_the_kernel():
    """CBAM's 7^3 convolution on a hippocampus bottleneck (5 x 7 x 5), channels-last, bf16 autocast.

    Plain `nn.Conv3d` gave a non-finite weight gradient in 37 of 40 such tries on an AVX-512 BF16 CPU (AMD EPYC,
    torch 2.13); where the CPU's kernel has no such fault, this test passes either way.
    """
    torch.manual_seed(0)
    conv = Conv3dSafeBF16(2, 1, 7, padding=3)
    for _ in range(20):
        _fill_freed_memory_with_nan()
        x = torch.randn(4, 2, 5, 7, 5).contiguous(memory_format=torch.channels_last_3d).requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = torch.sigmoid(conv(x))
        conv.zero_grad()
        (out.float() ** 2).sum().backward()
        assert torch.isfinite(conv.weight.grad).all() and torch.isfinite(conv.bias.grad).all()
        assert torch.isfinite(x.grad).all()
