"""Errors a user can cause: caught once at the command line and printed as one line."""

from __future__ import annotations

import os


class SegError(Exception):
    """A problem with the user's input (file, folder, config), not a bug in seg.

    The message names the file and the problem, and where possible the fix.
    """

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        self.path = None if path is None else os.fspath(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)


class DataError(SegError):
    """A scan, label or dataset folder that cannot be used as it is."""


class CheckpointError(SegError):
    """A checkpoint that is missing, corrupt, unsafe, or not a seg checkpoint."""
