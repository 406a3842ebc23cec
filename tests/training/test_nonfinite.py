"""`SkipNonFiniteSteps`: a NaN step leaves the weights as they were, training goes on, and a run of them stops it."""

import math

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from seg.training.callbacks import SkipNonFiniteSteps


class Regression(pl.LightningModule):
    """y = 2x by gradient descent; the loss is NaN at the steps in `nan_at` (as a bf16 overflow would make it)."""

    def __init__(self, nan_at=()):
        super().__init__()
        self.linear = torch.nn.Linear(1, 1)
        self.nan_at = set(nan_at)
        self.weights_before = {}

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.linear(x), y)
        self.weights_before[self.global_step] = self.linear.weight.detach().clone()
        return loss * float("nan") if self.global_step in self.nan_at else loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.05)


def _fit(model, steps, guard):
    x = torch.linspace(-1, 1, 8).unsqueeze(1)
    loader = DataLoader(TensorDataset(x, 2 * x), batch_size=8)
    trainer = pl.Trainer(max_steps=steps, callbacks=[guard], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    with pytest.warns(UserWarning, match="not finite"):
        trainer.fit(model, loader)
    return trainer


def test_a_nan_step_is_skipped_and_training_goes_on():
    model, guard = Regression(nan_at={3, 4}), SkipNonFiniteSteps()
    trainer = _fit(model, 40, guard)
    assert guard.skipped == 2 and trainer.global_step == 40
    # the skipped steps left the weight as it was; the others moved it
    assert torch.equal(model.weights_before[4], model.weights_before[3])
    assert torch.equal(model.weights_before[5], model.weights_before[3])
    assert not torch.equal(model.weights_before[6], model.weights_before[5])
    weight = model.linear.weight.item()
    assert math.isfinite(weight) and abs(weight - 2.0) < abs(model.weights_before[0].item() - 2.0)


def test_a_run_of_nan_steps_stops_training_and_keeps_the_weights_finite():
    model, guard = Regression(nan_at=set(range(5, 1000))), SkipNonFiniteSteps(max_consecutive=10)
    trainer = _fit(model, 100, guard)
    assert guard.consecutive == 10 and trainer.global_step < 20  # stopped soon after the 10th NaN step
    assert torch.isfinite(model.linear.weight).all() and torch.isfinite(model.linear.bias).all()


def test_negative_limits_are_refused():
    with pytest.raises(ValueError, match="max_consecutive"):
        SkipNonFiniteSteps(max_consecutive=-1)
