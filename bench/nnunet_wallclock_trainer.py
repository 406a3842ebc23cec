"""nnU-Net v2's own trainer, its recipe unchanged, stopped at a wall-clock budget (for bench/nnunet_budget.py).

This file runs inside nnU-Net's environment, never seg's: the bench copies it into the installed
`nnunetv2/training/nnUNetTrainer/` (not `variants/`: see the bench's `install_trainer`), where
`nnUNetv2_train -tr nnUNetTrainer_WallClock` (and the predictor, which looks the trainer class up by the name
stored in the checkpoint) find it.

`SEG_NNUNET_BUDGET_MINUTES` lists the budgets, e.g. "15,60". The clock starts when `run_training` starts (after
nnU-Net's planning and preprocessing; nnU-Net's unpacking and loader start-up count). Before every training and
validation step the trainer looks at the clock; at each budget it saves the weights as `checkpoint_<M>min.pth` (the
weights after the last step that started inside the budget) and, at the last budget, stops the way nnU-Net ends a
training (`on_train_end`: `checkpoint_final.pth`, loaders shut down). nnU-Net's poly learning-rate schedule is over
its 1000 epochs whatever the budget, so the weights at 15 minutes of a 60-minute run are those of a 15-minute run.
Per budget, the epochs and iterations done go to `wallclock.json` in the fold's output folder.

The only other change: `perform_actual_validation`, which after training predicts the fold's validation cases
(for fold "all", every training case again), is skipped: the bench scores the held-out cases itself.
"""

import json
import os
import time

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

BUDGETS_VARIABLE = "SEG_NNUNET_BUDGET_MINUTES"
REPORT = "wallclock.json"


class BudgetSpent(Exception):
    """Raised at the last budget to leave nnU-Net's training loop."""


class nnUNetTrainer_WallClock(nnUNetTrainer):  # noqa: N801 (nnU-Net's naming: -tr finds classes by this name)
    def run_training(self):
        self._budgets = sorted(float(m) for m in os.environ[BUDGETS_VARIABLE].split(","))
        self._reached, self._iterations, self._first_step_s = [], 0, None
        self._clock = time.perf_counter()
        try:
            super().run_training()
        except BudgetSpent:
            self.on_train_end()
        for minutes in self._budgets:  # budgets nnU-Net's 1000 epochs ended before (not on a CPU)
            self._save(minutes)
        self._write_report()

    def _save(self, minutes: float) -> None:
        name = f"checkpoint_{minutes:g}min.pth"
        self.save_checkpoint(os.path.join(self.output_folder, name))
        self._reached.append({"minutes": minutes, "seconds": round(time.perf_counter() - self._clock, 1),
                              "checkpoint": name, "epochs_completed": self.current_epoch,
                              "iterations": self._iterations,
                              "iterations_per_epoch": self.num_iterations_per_epoch})
        self.print_to_log_file(f"wall-clock budget of {minutes:g} min reached: {self._reached[-1]}")
        self._write_report()

    def _write_report(self) -> None:
        report = {"budgets": self._reached, "first_step_s": self._first_step_s}
        with open(os.path.join(self.output_folder, REPORT), "w") as f:
            json.dump(report, f, indent=1)

    def _check_clock(self) -> None:
        elapsed = time.perf_counter() - self._clock
        while self._budgets and elapsed >= self._budgets[0] * 60:
            self._save(self._budgets.pop(0))
            if not self._budgets:
                raise BudgetSpent

    def train_step(self, batch: dict) -> dict:
        self._check_clock()
        if self._first_step_s is None:
            self._first_step_s = round(time.perf_counter() - self._clock, 1)
        result = super().train_step(batch)
        self._iterations += 1
        return result

    def validation_step(self, batch: dict) -> dict:
        self._check_clock()
        return super().validation_step(batch)

    def perform_actual_validation(self, save_probabilities: bool = False):
        self.print_to_log_file("fold 'all' validation (a prediction of every training case) skipped by "
                               "nnUNetTrainer_WallClock: the bench scores held-out cases")
