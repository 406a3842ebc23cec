"""Checkpoints written atomically and read weights-only: a crash mid-save never leaves a half-written `.ckpt`,
and a crafted checkpoint cannot run code when it is loaded."""

from __future__ import annotations

import errno
import io
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from seg.errors import CheckpointError
from seg.inference.checkpoint import load_weights_only
from seg.io import remove_stale_temporaries, write_bytes

_FREE = "free some space or choose another --trainer.default_root_dir"
_WRITABLE = "choose a writable --trainer.default_root_dir"
_HINTS = {errno.ENOSPC: _FREE, errno.EDQUOT: _FREE, errno.EFBIG: _FREE, errno.EROFS: _WRITABLE,
          errno.EACCES: _WRITABLE, errno.EPERM: _WRITABLE, errno.ENOTDIR: "a parent of this path is a file",
          errno.ELOOP: "a symbolic link loops back on itself"}


def describe_os_error(err: OSError) -> str:
    """The reason for a failed file operation and, where we know one, the fix: for one-line messages."""
    reason = err.strerror or str(err)
    return f"{reason} ({_HINTS[err.errno]})" if err.errno in _HINTS else reason


class AtomicCheckpointIO(TorchCheckpointIO):
    """Save to a temporary file beside the target, fsync, then `os.replace` it into place; load weights only.

    A reader sees the old checkpoint or the new one, never a torn file (`kill -9` during a save, full disk).
    Temporary files of killed saves are removed at the next save into the same folder (they are dot-files, so
    Lightning's `ckpt_path="last"` never picks them up meanwhile). Loading always uses `torch.load(...,
    weights_only=True)`, whatever the caller asks for: Lightning passes `weights_only=None` by default (then
    torch's default, which the `TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD` environment variable turns off), and a
    checkpoint that needs arbitrary unpickling is refused with a `CheckpointError`.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(path.parent)
            # Serialise in memory first, as Lightning's own _atomic_save does: torch's zip writer may report a
            # full disk as "unexpected pos" with no OSError attached, while our write() raises ENOSPC plainly.
            buffer = io.BytesIO()
            torch.save(checkpoint, buffer)
            write_bytes(path, buffer.getbuffer())
        except (OSError, RuntimeError) as err:
            # torch's zip writer reports a failed write (full disk) as a RuntimeError with the OSError as context
            cause = err
            while cause is not None and not isinstance(cause, OSError):
                cause = cause.__cause__ or cause.__context__
            if cause is None:
                raise
            raise CheckpointError(f"cannot write checkpoint: {describe_os_error(cause)}; the previous checkpoint "
                                  "there, if any, is unchanged", path) from err

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        return load_weights_only(path, map_location=map_location or (lambda storage, loc: storage))


class _RunFolderCheckpoint(ModelCheckpoint):
    """A `ModelCheckpoint` that writes to `<default_root_dir>/checkpoints` unless given a `dirpath`.

    Declared in the CLI's trainer defaults (so `--print_config` and the saved config show it and a YAML can change
    it), where the run folder is not known yet: it is read from the trainer at setup.
    """

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = os.fspath(Path(trainer.default_root_dir) / "checkpoints")
        super().setup(trainer, pl_module, stage)


class BestCheckpoint(_RunFolderCheckpoint):
    """`best.ckpt`: the checkpoint of the best mean validation Dice (`val/dice_mean`), one file, overwritten.

    Args:
        dirpath: the checkpoint folder; None: `<default_root_dir>/checkpoints`.
        monitor, mode: what "best" means.
    """

    def __init__(self, dirpath: str | None = None, monitor: str = "val/dice_mean", mode: str = "max"):
        super().__init__(dirpath=dirpath, filename="best", monitor=monitor, mode=mode, save_top_k=1,
                         enable_version_counter=False, auto_insert_metric_name=False)


class LastCheckpoint(_RunFolderCheckpoint):
    """`last.ckpt`: written when a training epoch's batches are done, before its validation runs, and again at the
    epoch's end.

    Lightning validates inside the training epoch, before `on_train_epoch_end`, so a checkpoint saved only at epoch
    end is lost with the epoch when validation fails or the process is killed during it. The copy saved at
    validation start holds the finished steps; resuming from it (`--ckpt_path last`) goes on from there. The
    epoch-end save replaces it with the epoch's final loop state (Lightning skips a second save at the same
    global step, so the step it last saved is forgotten first).

    Args:
        dirpath: the checkpoint folder; None: `<default_root_dir>/checkpoints`.
    """

    def __init__(self, dirpath: str | None = None):
        super().__init__(dirpath=dirpath, filename=ModelCheckpoint.CHECKPOINT_NAME_LAST, enable_version_counter=False,
                         save_on_train_epoch_end=True)

    def on_validation_start(self, trainer, pl_module) -> None:
        if not self._should_skip_saving_checkpoint(trainer):  # fitting, not the sanity check, a new step
            self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._last_global_step_saved == trainer.global_step and not trainer.sanity_checking:
            self._last_global_step_saved = -1
        super().on_train_epoch_end(trainer, pl_module)
