"""The review page `seg fit` writes when it ends."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_info

from seg.errors import first_line


class ReviewPage(Callback):
    """Writes `<default_root_dir>/review.html` (`seg review`) when `fit` ends: the run's settings, learning curves
    and every validation volume's overlays in one page that needs no server.

    The page is a convenience: any failure to write it is one warning line, never a failed run. A run whose overlays
    are turned off (`--overlays.every_n_epochs 0`) has no page, and no warning.
    """

    def on_fit_end(self, trainer, pl_module) -> None:
        # here, not at the top: overlays.py imports the callbacks package (its validation module)
        from seg.training.overlays import GateOverlays

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
