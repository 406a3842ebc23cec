"""Gate sanity checks (issue 18): the gate maps depend on what the network learned, not only on the image."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.losses import DiceCELoss

from seg.data.synthetic import make_case
from seg.explain.sanity import gate_concentrations, randomize_gates
from seg.models import AttentionUNet

SPACING = (1.5, 1.5, 2.0)
WINDOW = dict(spacing=SPACING, roi_size=(32, 32, 32), num_classes=3)


@pytest.fixture(scope="module")
def phantoms():
    """Six z-scored phantoms 48 x 48 x 32 (liver + lesion): four to train on, two to measure on."""
    rng = np.random.default_rng(0)
    cases = []
    for _ in range(6):
        image, label = make_case(size=(48, 48, 32), spacing=SPACING, rng=rng)
        image = (image - image.mean()) / image.std()
        cases.append((torch.from_numpy(image[None].astype(np.float32)), label.astype(np.int64)))
    return cases[:4], cases[4:]


@pytest.fixture(scope="module")
def networks(phantoms):
    """The same small network untrained and after 150 AdamW steps on 32^3 patches (about 30 s on two cores)."""
    train, _ = phantoms
    torch.manual_seed(0)
    untrained = AttentionUNet(spatial_dims=3, in_channels=1, out_channels=3, channels=(8, 16, 32), strides=(2, 2))
    trained = AttentionUNet(spatial_dims=3, in_channels=1, out_channels=3, channels=(8, 16, 32), strides=(2, 2))
    trained.load_state_dict(untrained.state_dict())
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
    optimizer = torch.optim.AdamW(trained.parameters(), lr=3e-3)
    rng = np.random.default_rng(1)
    for _ in range(150):
        images, labels = [], []
        for _ in range(2):
            image, label = train[rng.integers(len(train))]
            box = tuple(slice(o, o + 32) for o in (rng.integers(0, s - 31) for s in image.shape[1:]))
            images.append(image[(slice(None), *box)])
            labels.append(torch.from_numpy(label[box])[None])
        loss = loss_fn(trained(torch.stack(images)), torch.stack(labels))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return untrained, trained


def test_an_untrained_network_looks_nowhere_in_particular(networks, phantoms):
    untrained, _ = networks
    concentration = gate_concentrations(untrained, phantoms[1], **WINDOW)
    assert list(concentration) == ["gate_0", "gate_1"]
    assert all(abs(c - 1.0) < 0.1 for c in concentration.values()), concentration


def test_training_concentrates_a_gate_and_randomising_the_gates_undoes_it(networks, phantoms):
    untrained, trained = networks
    before = gate_concentrations(untrained, phantoms[1], **WINDOW)
    after = gate_concentrations(trained, phantoms[1], **WINDOW)
    control = gate_concentrations(randomize_gates(trained), phantoms[1], **WINDOW)
    # trained: at least one level looks clearly more at the target than chance (measured: ~7.8 and ~1.7 at 300 steps)
    assert max(after.values()) > 1.5 and max(after[k] - before[k] for k in after) > 0.4, (before, after)
    # model randomisation: same encoder and decoder, fresh gates: the concentration is gone on every level
    assert all(abs(c - 1.0) < 0.15 for c in control.values()), (after, control)


def test_randomize_gates_changes_only_the_gates_and_leaves_the_original(networks):
    _, trained = networks
    before = {k: v.clone() for k, v in trained.state_dict().items()}
    control = randomize_gates(trained, seed=3)
    for key, value in control.state_dict().items():
        assert torch.equal(trained.state_dict()[key], before[key])  # the original untouched
        changed = not torch.equal(value, before[key])
        if ".gate." in key and value.is_floating_point():
            assert changed, key
        else:
            assert not changed, key
    assert all(torch.equal(a, b) for a, b in zip(randomize_gates(trained, seed=3).state_dict().values(),
                                                 control.state_dict().values()))  # seeded: reproducible
    plain = AttentionUNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(8, 16), strides=(2,), gates=False)
    with pytest.raises(ValueError, match="no attention gates"):
        randomize_gates(plain)


def test_a_volume_without_target_is_left_out_not_scored(networks):
    untrained, _ = networks
    empty = [(torch.zeros(1, 32, 32, 32), np.zeros((32, 32, 32), dtype=np.int64))]
    concentration = gate_concentrations(untrained, empty, **WINDOW)
    assert all(math.isnan(c) for c in concentration.values())
