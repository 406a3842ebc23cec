"""What `seg fit` prints as it trains: progress lines for logs (or Lightning's bar on a terminal) and a one-line
model summary."""

from __future__ import annotations

import datetime
import math
import sys
import time

from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.callbacks.progress import ProgressBar
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_summary import get_human_readable_count

from seg.training.callbacks.validation import timer_of


class LogProgress(ProgressBar):
    """Plain progress lines for output that is not a terminal (Docker logs, SLURM, `seg fit > log`).

    A bar redraws one line in place, which a log file shows only at the end; this prints a new line every
    `every_n_seconds` of training, and one after each validation:

        epoch 3/24 | step 40/325 | 2.1 steps/s | loss 0.4321 | ETA 0:02:15 | val dice_mean 0.712 (epoch 2)
        validation epoch 4 | dice_mean 0.750 | dice_liver 0.93 | dice_lesion 0.57 | missing_lesion 1

    The ETA is the remaining steps at the rate so far, or the remaining `max_time`, whichever comes first.

    Args:
        every_n_seconds: seconds between two training lines (0: a line at every step).
    """

    def __init__(self, every_n_seconds: float = 30.0):
        super().__init__()
        if every_n_seconds < 0:
            raise ValueError(f"every_n_seconds must not be negative, got {every_n_seconds}")
        self.every_n_seconds = every_n_seconds
        self._enabled = True
        self._start = self._last = 0.0
        self._start_step = 0
        self._validated: tuple[int, float] | None = None  # (epoch, dice_mean) of the last validation

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def print(self, *args, **kwargs) -> None:
        print(*args, **kwargs, flush=True)

    def on_train_start(self, trainer, pl_module) -> None:
        self._start = self._last = time.monotonic()
        self._start_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.monotonic()
        if self._enabled and trainer.is_global_zero and now - self._last >= self.every_n_seconds:
            self._last = now
            self.print(self.train_line(trainer, now))

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or not self._enabled:
            return
        scores = {k.split("/", 1)[1]: float(v) for k, v in trainer.callback_metrics.items()
                  if k.startswith("val/") and (k.startswith("val/dice_") or k.startswith("val/missing_"))}
        if "dice_mean" in scores:
            self._validated = (trainer.current_epoch, scores["dice_mean"])
        shown = sorted(scores, key=lambda k: (k != "dice_mean", not k.startswith("dice_")))  # classes in order
        self.print(f"validation epoch {trainer.current_epoch}" + "".join(
            f" | {k} {scores[k]:.0f}" if k.startswith("missing_") else f" | {k} {_number(scores[k], 3)}"
            for k in shown))

    def train_line(self, trainer, now: float) -> str:
        """The training line: epoch, step, steps/s, loss, ETA and the last validation's mean Dice."""
        steps = trainer.global_step - self._start_step
        rate = steps / (now - self._start) if now > self._start else 0.0
        total = trainer.estimated_stepping_batches
        # epochs counted from 0 as everywhere in a run (checkpoints, overlays/epoch=E), "E/last" as Lightning's bar
        epochs = f"/{trainer.max_epochs - 1}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        parts = [f"epoch {trainer.current_epoch}{epochs}",
                 f"step {trainer.global_step}" + (f"/{int(total)}" if math.isfinite(total) else ""),
                 f"{rate:.2f} steps/s"]
        loss = trainer.progress_bar_metrics.get("train/loss_step")
        if loss is not None:
            parts.append(f"loss {float(loss):.4f}")
        eta = [(total - trainer.global_step) / rate] if rate > 0 and math.isfinite(total) else []
        timer = timer_of(trainer)
        if timer is not None and timer.time_remaining() is not None:
            eta.append(max(timer.time_remaining(), 0.0))
        if eta:
            parts.append(f"ETA {datetime.timedelta(seconds=round(min(eta)))}")
        if self._validated is not None:
            parts.append(f"val dice_mean {_number(self._validated[1], 3)} (epoch {self._validated[0]})")
        return " | ".join(parts)


def _number(value: float, digits: int) -> str:
    return "nan" if math.isnan(value) else f"{value:.{digits}f}"


def progress_bar(every_n_seconds: float = 30.0) -> ProgressBar:
    """Lightning's Rich bar on a terminal, `LogProgress` lines otherwise (where the bar would write: stdout)."""
    from lightning.pytorch.callbacks import RichProgressBar

    return RichProgressBar() if sys.stdout.isatty() else LogProgress(every_n_seconds)


class ModelLine(ModelSummary):
    """Lightning's model summary in one line: the top-level modules, the parameters and their size.

    Lightning's table ends with "Total FLOPs: 0" (FLOPs are counted only for a module with an `example_input_array`,
    and ours takes any patch size), which reads as a broken model; the table adds nothing else at depth 1.
    """

    @staticmethod
    def summarize(summary_data, total_parameters: int, trainable_parameters: int, model_size: float,
                  total_training_modes, total_flops: int = 0, **kwargs) -> None:
        columns = dict(summary_data)
        modules = ", ".join(f"{kind} ({params.strip()})" for kind, params in
                            zip(columns.get("Type", []), columns.get("Params", [])) if params.strip() != "0")
        rank_zero_info(f"Model: {modules or type(summary_data).__name__}; "
                       f"{get_human_readable_count(trainable_parameters).strip()} trainable parameters of "
                       f"{get_human_readable_count(total_parameters).strip()}, {model_size:.1f} MB")

