"""Errors a user can cause: caught once at the command line and printed as one line."""

from __future__ import annotations

import os


def escape(text: str) -> str:
    """`text` as it is when printable, else `repr`-escaped, so a newline in a file name cannot forge a log line."""
    return text if text.isprintable() else repr(text)


def one_line(text: str) -> str:
    """`text` with every control character (newline, tab, escape sequences) written as its `repr` escape."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def first_line(err: BaseException) -> str:
    """The first line of an exception's message, control characters escaped; its type's name when it has none.

    Library errors (nibabel, pydicom, ONNX Runtime, torch's unpickler) often carry a multi-line report; a
    refusal or a log line quotes only its first line.
    """
    text = str(err).strip()
    return one_line(text.splitlines()[0]) if text else type(err).__name__


class SegError(Exception):
    """A problem with the user's input (file, folder, config), not a bug in seg.

    The message names the file and the problem, and where possible the fix. It is always one line: a file
    name with a newline in it is shown escaped (`repr`).
    """

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        self.path = None if path is None else os.fspath(path)
        super().__init__(one_line(f"{escape(self.path)}: {message}" if self.path else message))


class DataError(SegError):
    """A scan, label or dataset folder that cannot be used as it is."""


class CheckpointError(SegError):
    """A checkpoint that is missing, corrupt, unsafe, or not a seg checkpoint."""
