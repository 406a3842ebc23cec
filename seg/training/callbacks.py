"""Lightning callbacks of `seg fit` beyond Lightning's own: progress lines for logs, a one-line model summary,
when to validate (the last epoch always; within a share of a time-bounded run), skipping optimiser steps
whose gradients are not finite, and the review page at the end."""

from __future__ import annotations

import datetime
import logging
import math
import sys
import time
from pathlib import Path

from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelSummary, Timer
from lightning.pytorch.callbacks.progress import ProgressBar
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_summary import get_human_readable_count

from seg.errors import first_line


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
        timer = _timer(trainer)
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


def is_final_validation(trainer) -> bool:
    """True for the run's last validation in `fit` (its last epoch, or a stop by `max_time`), and for every
    validation outside `fit` (`seg validate`, `seg test`): where the costly extras (HD95, overlays) always run."""
    from lightning.pytorch.trainer.states import TrainerFn

    if getattr(getattr(trainer, "state", None), "fn", TrainerFn.FITTING) != TrainerFn.FITTING:
        return True
    max_epochs = getattr(trainer, "max_epochs", None)
    return bool(getattr(trainer, "should_stop", False)) or bool(
        max_epochs and max_epochs > 0 and trainer.current_epoch + 1 >= max_epochs)


class ValidationSchedule(Callback):
    """When `seg fit` validates: the last epoch always, and in a time-bounded run at most `max_share` of the time.

    Lightning validates every `check_val_every_n_epoch` epochs, and a `max_time` stop skips the rest: a run of 7
    epochs validated every 5, or one stopped by time before its first validation, ended without `best.ckpt`, final
    metrics or overlays. On the last epoch (`max_epochs`) or once `max_time` has (almost) run out, this makes that
    epoch due; Lightning then validates it as any other (checkpoints, overlays and logs included).

    Under `max_time`, a validation that the epoch schedule makes due is also skipped when it would take validation
    over `max_share` of the wall time so far, a reserve for the final validation included:

        skip when  V + 2 c  >  max_share * (T + 2 c)

    with V the seconds validated so far, T the run's seconds on the `max_time` Timer's clock and c the cost of the
    last validation (before the first one: the sanity check's seconds per volume times the validation volumes).
    On hippocampus, validating every epoch took a fifth of a 10-minute run (issue 18); with small epochs and an
    expensive validation (ACDC: 10 whole cine volumes) it took most of it. The validations that remain are spread
    evenly over the run. Lightning's own time-based `val_check_interval` validates every fixed interval; this
    instead measures what a validation costs on this machine and this dataset, which no interval fixed in advance
    knows.

    Each validation logs its seconds (`time/validation_seconds`) and the share of the run validated so far
    (`time/validation_share`) to every logger.

    Args:
        max_share: the most of a time-bounded run's wall time that validation may take, in (0, 1]; None or 1: the
            epoch schedule alone. Runs bounded by epochs only follow the schedule.
    """

    def __init__(self, max_share: float | None = 0.1):
        if max_share is not None and not 0 < max_share <= 1:
            raise ValueError(f"max_share must be in (0, 1], got {max_share}")
        self.max_share = max_share
        self._schedule: int | None = None
        self._step_seconds = 0.0
        self._last_batch_end: float | None = None
        self._captured = False  # `_schedule` holds the user's check_val_every_n_epoch
        self._train_start: float | None = None
        self._validation_start: float | None = None
        self.validation_seconds = 0.0  # validated so far in this fit (sanity check not counted)
        self.validation_cost: float | None = None  # seconds of the last validation, or the sanity check's estimate
        self.skipped: list[int] = []  # epochs whose due validation was skipped to keep the share
        self.forced = False

    # ---- bookkeeping -------------------------------------------------------------------------------------------
    def on_sanity_check_start(self, trainer, pl_module) -> None:
        self._validation_start = time.monotonic()

    def on_sanity_check_end(self, trainer, pl_module) -> None:
        checked = sum(trainer.num_sanity_val_batches) if isinstance(trainer.num_sanity_val_batches, list) else \
            trainer.num_sanity_val_batches
        total = sum(trainer.num_val_batches) if isinstance(trainer.num_val_batches, list) else trainer.num_val_batches
        if self._validation_start is not None and checked and math.isfinite(total):
            self.validation_cost = (time.monotonic() - self._validation_start) / checked * total
        self._validation_start = None

    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._validation_start = time.monotonic()

    def on_train_start(self, trainer, pl_module) -> None:
        self._train_start = time.monotonic()

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or self._validation_start is None:
            return
        now = time.monotonic()
        self.validation_cost = now - self._validation_start
        self.validation_seconds += self.validation_cost
        self._validation_start = None
        # where the time goes, as charts: this validation's seconds and the share of the run validated so far
        timer = _timer(trainer)
        elapsed = timer.time_elapsed("train") if timer is not None else now - (self._train_start or now)
        if trainer.is_global_zero and elapsed > 0:
            for logger in trainer.loggers:
                logger.log_metrics({"time/validation_seconds": self.validation_cost,
                                    "time/validation_share": self.validation_seconds / elapsed},
                                   step=trainer.global_step)

    # ---- the decisions -----------------------------------------------------------------------------------------
    def _set(self, trainer, every: int | None) -> None:
        trainer.check_val_every_n_epoch = every  # the epoch loop reads it at each batch (`_should_check_val_epoch`)

    def _force(self, trainer) -> None:
        if trainer.check_val_every_n_epoch not in (None, 1):
            self._set(trainer, 1)
        self.forced = True

    def _over_budget(self, trainer, now: float) -> bool:
        timer = _timer(trainer)
        if self.max_share is None or self.max_share >= 1 or timer is None or not timer._duration \
                or self.validation_cost is None:
            return False
        reserve = 2 * self.validation_cost  # this validation and the final one
        # the Timer's clock: it counts the whole run, validations included, and goes on after a resume
        over = self.validation_seconds + reserve > self.max_share * (timer.time_elapsed("train") + reserve)
        return bool(trainer.strategy.broadcast(over))  # rank zero's clock decides: every rank validates, or none

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.forced = False
        if not self._captured:
            self._schedule, self._captured = trainer.check_val_every_n_epoch, True
        self._set(trainer, self._schedule)  # what the last epoch forced or skipped is undone
        if trainer.max_epochs is not None and trainer.max_epochs > 0 and trainer.current_epoch + 1 >= trainer.max_epochs:
            self._force(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.monotonic()
        if self._last_batch_end is not None:
            self._step_seconds = now - self._last_batch_end
        self._last_batch_end = now
        if self.forced:
            return
        # The Timer checks on the same hook, later in the callback list: make the epoch due once less than two
        # steps are left, so that its stop finds it due (a validation at the epoch's end if the epoch ends first).
        timer = _timer(trainer)
        late = False
        if timer is not None and timer.time_remaining() is not None:
            # rank zero's clock decides for all, as the Timer's own does: every rank must validate, or none
            late = bool(trainer.strategy.broadcast(timer.time_remaining() <= 2 * self._step_seconds))
        if trainer.should_stop or late:
            self._force(trainer)
            return
        every = trainer.check_val_every_n_epoch
        last_batch = batch_idx + 1 >= trainer.num_training_batches
        due = every is not None and (trainer.current_epoch + 1) % every == 0
        if last_batch and due and self._over_budget(trainer, now):
            self.skipped.append(trainer.current_epoch)
            self._set(trainer, trainer.current_epoch + 2)  # not a divisor of current_epoch + 1: not due

    def on_train_end(self, trainer, pl_module) -> None:
        if self._captured:
            self._set(trainer, self._schedule)
        self.forced = False

    def state_dict(self) -> dict:
        return {"validation_seconds": self.validation_seconds, "validation_cost": self.validation_cost}

    def load_state_dict(self, state_dict: dict) -> None:
        # The Timer resumes its clock from the checkpoint; the validation seconds in it resume with it.
        self.validation_seconds = float(state_dict.get("validation_seconds", 0.0))
        self.validation_cost = state_dict.get("validation_cost")


class SkipNonFiniteSteps(Callback):
    """Skips an optimiser step whose gradients hold a NaN or an inf, and stops training after `max_consecutive`
    such steps in a row, keeping every checkpoint so far.

    Without it one bad step makes every weight NaN and the rest of the run is lost. Seen with `seg plan`'s
    60-minute hippocampus run in bf16 mixed precision (AVX-512 BF16 CPU): the loss turned NaN near step 700, at
    epoch 9 of 60 minutes, and every later validation scored Dice 0. Lightning's `detect_anomaly` names the
    operation at several times the cost of a step, and its GradScaler skips such steps only in float16.

    The check is the total gradient norm (`torch.nn.utils.get_total_norm`), after Lightning's unscaling. A
    skipped step leaves the weights and the optimiser's moments as they were (the gradients are set to None).
    Logs `train/skipped_steps`, the count so far.

    Args:
        max_consecutive: non-finite steps in a row after which training stops (0: never stop).
    """

    def __init__(self, max_consecutive: int = 50):
        if max_consecutive < 0:
            raise ValueError(f"max_consecutive must be >= 0, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.skipped = 0
        self.consecutive = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            return
        if torch.isfinite(torch.nn.utils.get_total_norm([p.grad for p in params])):
            self.consecutive = 0
            return
        for p in params:
            p.grad = None
        self.skipped += 1
        self.consecutive += 1
        pl_module.log("train/skipped_steps", float(self.skipped), on_step=True, on_epoch=False)
        if self.skipped == 1:
            rank_zero_warn(f"step {trainer.global_step}: the gradients are not finite (NaN or inf); the step is "
                           "skipped, and so is every such step (train/skipped_steps counts them)")
        if self.max_consecutive and self.consecutive >= self.max_consecutive:
            trainer.should_stop = True
            rank_zero_warn(f"training stopped at step {trainer.global_step}: {self.consecutive} steps in a row had "
                           "non-finite gradients; the checkpoints so far are kept. Try --trainer.precision 32-true "
                           "or a lower --model.lr")

    def state_dict(self) -> dict:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped = int(state_dict.get("skipped", 0))


class ReviewPage(Callback):
    """Writes `<default_root_dir>/review.html` (`seg review`) when `fit` ends: the run's settings, learning curves
    and every validation volume's overlays in one page that needs no server.

    The page is a convenience: any failure to write it is one warning line, never a failed run. A run whose overlays
    are turned off (`--overlays.every_n_epochs 0`) has no page, and no warning.
    """

    def on_fit_end(self, trainer, pl_module) -> None:
        from seg.training.overlays import GateOverlays  # here: overlays.py imports this module

        overlays = [c for c in getattr(trainer, "callbacks", []) if isinstance(c, GateOverlays)]
        if not trainer.is_global_zero or any(c.every_n_epochs == 0 for c in overlays):
            return
        from seg.explain.review import write_review

        root = Path(trainer.default_root_dir)
        start = time.monotonic()
        try:
            page = write_review(root, root / "review.html")
        except Exception as err:  # noqa: BLE001 - the run's checkpoints and overlays are what matter
            logging.getLogger(__name__).warning("review page not written: %s", first_line(err))
            return
        rank_zero_info(f"review page: {page.html} ({page.cases} cases, {page.megabytes:.1f} MB, "
                       f"{time.monotonic() - start:.1f} s); open it in a browser")


def _timer(trainer) -> Timer | None:
    return next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
