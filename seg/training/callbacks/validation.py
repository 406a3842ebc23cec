"""When `seg fit` validates: the last epoch always, and within a share of a time-bounded run."""

from __future__ import annotations

import math
import time

from lightning.pytorch import Callback
from lightning.pytorch.callbacks import Timer


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
        timer = timer_of(trainer)
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
        timer = timer_of(trainer)
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
        timer = timer_of(trainer)
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


def timer_of(trainer) -> Timer | None:
    """The run's `max_time` Timer, if it has one: its clock counts the whole run and resumes with it."""
    return next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
