"""Lightning callbacks of `seg fit` beyond Lightning's own, one family per module: progress lines for logs and a
one-line model summary (`progress`), when to validate (`validation`: the last epoch always; within a share of a
time-bounded run), skipping optimiser steps whose gradients are not finite (`nonfinite`), and the review page at
the end (`review`). The gate overlays live in `seg.training.overlays`, checkpoints in `seg.training.checkpoint_io`.

The names are re-exported here: configs and code that name `seg.training.callbacks.X` keep working.
"""

from seg.training.callbacks.nonfinite import SkipNonFiniteSteps
from seg.training.callbacks.progress import LogProgress, ModelLine, progress_bar
from seg.training.callbacks.review import ReviewPage
from seg.training.callbacks.validation import ValidationSchedule, is_final_validation

__all__ = ["LogProgress", "ModelLine", "ReviewPage", "SkipNonFiniteSteps", "ValidationSchedule", "is_final_validation",
           "progress_bar"]
