"""AttentionUNet: shapes, gates, ablations, gradients, and that it learns."""

import pytest
import torch
from monai.losses import DiceCELoss

from seg.models import CBAM, AttentionGate, AttentionUNet

SMALL = dict(channels=(4, 8, 16), strides=(2, 2))


@pytest.mark.parametrize("spatial", [(24, 40), (8, 24, 40)])
@pytest.mark.parametrize("batch", [1, 3])
def test_output_and_gate_shapes(spatial, batch):
    torch.manual_seed(0)
    model = AttentionUNet(len(spatial), in_channels=2, out_channels=3, **SMALL).eval()
    x = torch.randn(batch, 2, *spatial)
    logits, gates = model.forward_with_gates(x)
    assert logits.shape == (batch, 3, *spatial)
    # one gate per skip, coarsest first, on the grid of the skip it gates
    assert [tuple(g.shape) for g in gates] == [
        (batch, 1, *[s // 2 for s in spatial]),
        (batch, 1, *spatial),
    ]
    for g in gates:
        assert g.min() >= 0.0 and g.max() <= 1.0
        assert g.std() > 0  # an actual map, not a constant


def test_anisotropic_strides():
    model = AttentionUNet(3, 1, 2, channels=(4, 8, 16), strides=((2, 2, 1), 2)).eval()
    assert model.size_multiple == (4, 4, 2)
    logits, gates = model.forward_with_gates(torch.randn(1, 1, 12, 20, 6))
    assert logits.shape == (1, 2, 12, 20, 6)
    assert [tuple(g.shape[2:]) for g in gates] == [(6, 10, 6), (12, 20, 6)]


def test_forward_and_forward_with_gates_agree():
    torch.manual_seed(0)
    model = AttentionUNet(3, 1, 3, **SMALL).eval()
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        plain = model(x)
        with_gates, _ = model.forward_with_gates(x)
        with_cbam, gates, cbam_maps = model.forward_with_gates(x, return_cbam=True)
    torch.testing.assert_close(plain, with_gates, rtol=0, atol=0)
    torch.testing.assert_close(plain, with_cbam, rtol=0, atol=0)
    assert len(gates) == 2 and [tuple(m.shape[2:]) for m in cbam_maps] == [(16, 16, 16), (8, 8, 8), (4, 4, 4)]


def test_indivisible_input_names_the_multiple():
    model = AttentionUNet(3, 1, 2, **SMALL)
    with pytest.raises(ValueError, match=r"multiple of \(4, 4, 4\)"):
        model(torch.randn(1, 1, 16, 18, 16))


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = AttentionUNet(3, 1, 3, deep_supervision=True, **SMALL).train()
    outputs = model(torch.randn(2, 1, 16, 16, 16))
    sum(o.square().mean() for o in outputs).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def _count(model, cls):
    return sum(isinstance(m, cls) for m in model.modules())


def _params(module):
    return sum(p.numel() for p in module.parameters())


def test_ablation_flags_remove_exactly_their_modules():
    full = AttentionUNet(3, 1, 3, channels=(8, 16, 32, 64), strides=(2, 2, 2))
    no_cbam = AttentionUNet(3, 1, 3, channels=(8, 16, 32, 64), strides=(2, 2, 2), cbam=False)
    no_gates = AttentionUNet(3, 1, 3, channels=(8, 16, 32, 64), strides=(2, 2, 2), gates=False)
    plain = AttentionUNet(3, 1, 3, channels=(8, 16, 32, 64), strides=(2, 2, 2), cbam=False, gates=False)
    assert (_count(full, CBAM), _count(full, AttentionGate)) == (4, 3)
    assert (_count(no_cbam, CBAM), _count(no_cbam, AttentionGate)) == (0, 3)
    assert (_count(no_gates, CBAM), _count(no_gates, AttentionGate)) == (4, 0)
    assert (_count(plain, CBAM), _count(plain, AttentionGate)) == (0, 0)
    cbam_params = sum(_params(m) for m in full.modules() if isinstance(m, CBAM))
    gate_params = sum(_params(m) for m in full.modules() if isinstance(m, AttentionGate))
    assert _params(full) - _params(no_cbam) == cbam_params > 0
    assert _params(full) - _params(no_gates) == gate_params > 0
    assert _params(full) - _params(plain) == cbam_params + gate_params
    _, gates = plain.forward_with_gates(torch.randn(1, 1, 16, 16, 16))
    assert gates == []


def test_deep_supervision_heads_only_in_training():
    model = AttentionUNet(3, 1, 3, channels=(4, 8, 16, 32), strides=(2, 2, 2), deep_supervision=True)
    x = torch.randn(1, 1, 16, 16, 16)
    outputs = model.train()(x)
    assert [tuple(o.shape) for o in outputs] == [(1, 3, 16, 16, 16), (1, 3, 8, 8, 8), (1, 3, 4, 4, 4)]
    assert model.eval()(x).shape == (1, 3, 16, 16, 16)


def test_pool_downsampling():
    model = AttentionUNet(2, 1, 2, downsample="pool", **SMALL)
    assert model(torch.randn(2, 1, 16, 12)).shape == (2, 2, 16, 12)


def _blob_volumes(n, size, generator):
    """Volumes with a bright ball of random centre and radius, and its label."""
    grid = torch.stack(torch.meshgrid(*[torch.arange(size, dtype=torch.float32)] * 3, indexing="ij"))
    images, labels = [], []
    for _ in range(n):
        centre = torch.rand(3, 1, 1, 1, generator=generator) * (size / 2) + size / 4
        radius = 3 + 2 * torch.rand(1, generator=generator)
        label = ((grid - centre).square().sum(0) < radius ** 2).float()
        image = label + 0.3 * torch.randn(label.shape, generator=generator)
        images.append(image[None])
        labels.append(label[None])
    return torch.stack(images), torch.stack(labels).long()


def test_network_overfits_small_volumes():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    images, labels = _blob_volumes(4, 16, generator)
    model = AttentionUNet(3, 1, 2, channels=(8, 16, 32), strides=(2, 2))
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        optimizer.zero_grad()
        loss_fn(model(images), labels).backward()
        optimizer.step()
    with torch.no_grad():
        prediction = model.eval()(images).argmax(1, keepdim=True)
    intersection = (prediction * labels).sum()
    dice = 2 * intersection / (prediction.sum() + labels.sum())
    assert dice > 0.9
