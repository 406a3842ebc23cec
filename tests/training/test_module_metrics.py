"""Validation scores of hand-made masks: a class missing from the prediction or the label never flatters."""

from __future__ import annotations

import math

import pytest
import torch

from seg.training.module import SegmentationModule, hausdorff95


def cube(shape=(12, 12, 12), lo=2, hi=6, value=1) -> torch.Tensor:
    volume = torch.zeros((1, 1, *shape), dtype=torch.uint8)
    volume[0, 0, lo:hi, lo:hi, lo:hi] = value
    return volume


def scored(cases: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """Score (prediction, label) volumes through `SegmentationModule`'s validation path; returns what it logs."""
    module = SegmentationModule(out_channels=3, channels=[4, 8], strides=[2], class_names=["liver", "lesion"])
    logged = {}
    module.log = lambda key, value, **kwargs: logged.__setitem__(key, float(value))
    for i, (prediction, label) in enumerate(cases):
        module.predict_labels = lambda image, **kwargs: prediction
        module._score({"image": torch.zeros(1, 1, *label.shape[2:]), "label": label.long(), "case_id": [f"c{i}"]})
    module._log_scores("val")
    return logged


def test_hd95_of_an_empty_mask_is_nan_not_zero():
    empty, full = cube(value=0).bool(), cube().bool()
    assert math.isnan(hausdorff95(empty, full)[0, 0]) and math.isnan(hausdorff95(full, empty)[0, 0])
    assert math.isnan(hausdorff95(empty, empty)[0, 0])
    assert hausdorff95(full, full)[0, 0] == 0.0
    shifted = torch.roll(full, 2, dims=2)
    assert hausdorff95(shifted, full, spacing=(1.5, 1, 1))[0, 0] == pytest.approx(3.0)  # 2 voxels of 1.5 mm


def test_a_class_missing_from_the_prediction_is_dice_0_and_counted_not_hd95_0():
    label = cube() + cube(lo=3, hi=4)  # liver 2..6 with a lesion voxel at 3
    liver_only = cube()  # the lesion is not predicted
    logged = scored([(liver_only, label), (label.clone(), label)])
    assert logged["val/dice_lesion"] == pytest.approx(0.5)  # 0 and 1
    assert logged["val/missing_lesion"] == 1 and logged["val/missing_liver"] == 0
    assert logged["val/hd95_lesion"] == 0.0  # the one volume where it is defined: perfect
    # when no volume has the lesion predicted, its HD95 is undefined (NaN), never 0 mm
    logged = scored([(liver_only, label), (liver_only, label)])
    assert logged["val/dice_lesion"] == 0.0 and logged["val/missing_lesion"] == 2
    assert math.isnan(logged["val/hd95_lesion"])
    assert logged["val/hd95_mean"] == logged["val/hd95_liver"]  # the mean leaves the undefined class out
    assert logged["val/dice_mean"] == pytest.approx((logged["val/dice_liver"] + 0.0) / 2)


def test_a_class_missing_from_the_label_is_nan_when_not_predicted_and_0_when_it_is():
    label = cube()  # no lesion in this scan
    logged = scored([(cube(), label)])
    assert math.isnan(logged["val/dice_lesion"]) and logged["val/missing_lesion"] == 1
    assert logged["val/dice_mean"] == 1.0  # nothing to score for the lesion: left out
    false_positive = cube() + cube(lo=3, hi=4)
    logged = scored([(false_positive, label)])
    assert logged["val/dice_lesion"] == 0.0 and logged["val/missing_lesion"] == 1
    assert math.isnan(logged["val/hd95_lesion"])


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_a_deep_supervision_step_trains_on_integer_labels(spatial_dims):
    """The data give int64 class indices; MONAI's DeepSupervisionLoss resizes them, which integers cannot be."""
    torch.manual_seed(0)
    module = SegmentationModule(spatial_dims=spatial_dims, out_channels=3, channels=[4, 8, 16], strides=[2, 2],
                                deep_supervision=True, roi_size=[16] * spatial_dims)
    shape = (2, 1, *[16] * spatial_dims)
    batch = {"image": torch.randn(shape), "label": torch.randint(0, 3, shape)}
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    losses = []
    for _ in range(3):
        loss = module.training_step(batch, 0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]


def test_training_patch_dice_is_pooled_over_the_batch_and_nan_for_an_absent_class():
    from seg.training.module import patch_dice

    label = torch.zeros(2, 1, 4, 4, dtype=torch.long)
    label[0, 0, :2] = 1  # 8 voxels of class 1, no class 2 anywhere
    logits = torch.zeros(2, 3, 4, 4)
    logits[0, 1, :1] = 5.0  # predicts 4 of them
    logits[1, 1, :1] = 5.0  # and 4 false positives in the other patch
    dice = patch_dice(logits, label)
    assert dice[0].item() == pytest.approx(2 * 4 / (8 + 8))
    assert math.isnan(dice[1].item())
