"""Atomic output files: written under a hidden temporary name beside the target, then renamed into place.

The temporary name is `.tmp-<pid>-<final name>`: hidden, cleaned by `seg predict` at its next start once that
process is gone, and ending like the final name so writers that pick a format from the suffix still do.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def write_atomically(path: Path, write: Callable[[Path], object], fsync: bool = True) -> None:
    """Call `write(tmp)` and rename `tmp` to `path`; on any error the temporary file is removed."""
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
