"""One way to write a file: under a temporary name beside the target, flushed to disk, then renamed into place.

A reader (or a run that resumes) sees the old file or the new one, never a torn one, whatever kills the writer.
Temporary names are `.tmp-<pid>-<final name>`: hidden, they end like the final name (nibabel and matplotlib pick
the format from the suffix), and the pid tells a later run whether their writer is still alive
(`remove_stale_temporaries`).

And one way to read a small JSON file that came from elsewhere (`read_json`): a regular file of bounded size, nested
to a bounded depth, with finite numbers only, or one line naming the file.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from seg.errors import DataError, SegError, one_line

_TEMPORARY = re.compile(r"^\.tmp-(?P<pid>\d+)-")
# The JSON seg reads (postprocessing plans, cv.json, ONNX metadata, dataset.json) is a few KiB nested 3-5 deep;
# the bounds stop a file that would take the memory, or the stack (`RecursionError`), before it does.
MAX_JSON_BYTES = 16 * 2**20
MAX_JSON_DEPTH = 32


def temporary_path(path: str | os.PathLike) -> Path:
    """The temporary name this process writes `path` under: `.tmp-<pid>-<name>` in the same folder."""
    path = Path(path)
    return path.with_name(f".tmp-{os.getpid()}-{path.name}")


def pid_alive(pid: int) -> bool:
    """True when a process with this id exists (ours counts as alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files (and folders) in `folder` whose writer is gone (a killed run); returns them."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for path in entries:
        match = _TEMPORARY.match(path.name)
        if match and not pid_alive(int(match["pid"])):
            with contextlib.suppress(OSError):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
                removed.append(path)
    return removed


def _fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable (its entry on disk); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, durable: bool = True) -> Iterator[Path]:
    """Yield the temporary path to write `path` under; on success it is fsynced and renamed into place.

    On any exception the temporary file is removed and the target is left as it was.

    Args:
        path: the final file.
        durable: fsync the file and its folder (a crash right after still finds the new file).
    """
    path = Path(path)
    tmp = temporary_path(path)
    try:
        yield tmp
        if durable:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if durable:
            _fsync_folder(path.parent)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def write_bytes(path: str | os.PathLike, data: bytes | memoryview, durable: bool = True) -> Path:
    """Write `data` to `path` atomically."""
    with atomic_path(path, durable) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str, durable: bool = True) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    return write_bytes(path, text.encode("utf-8"), durable)


def _json_depth(value) -> int:
    """How deep lists and dicts nest in a parsed JSON value (a scalar: 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        value, depth = stack.pop()
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
        if children is not None:
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in children)
    return deepest


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:20]} is beyond a float")
    return value


def parse_json(text: str | bytes, path: str | os.PathLike, what: str, max_depth: int = MAX_JSON_DEPTH,
               error: type[SegError] = DataError):
    """`text` as JSON, refused in one line (`error` naming `path` and `what`) when it is not JSON, holds NaN,
    Infinity or a number beyond a float, or nests deeper than `max_depth`."""
    try:
        value = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except RecursionError:
        value, depth = None, math.inf
    except (UnicodeDecodeError, ValueError) as err:  # JSONDecodeError is a ValueError; so is int()'s digit limit
        raise error(f"cannot read {what}: not valid JSON ({one_line(str(err))[:200]})", path) from None
    else:
        depth = _json_depth(value)
    if depth > max_depth:
        raise error(f"cannot read {what}: nested deeper than {max_depth} levels", path)
    return value


def read_json(path: str | os.PathLike, what: str, max_depth: int = MAX_JSON_DEPTH, max_bytes: int = MAX_JSON_BYTES,
              error: type[SegError] = DataError):
    """The JSON in file `path` (see `parse_json`); a FIFO, device or folder is refused without being opened, and
    a file above `max_bytes` without being read."""
    try:
        info = os.stat(path)
    except OSError as err:
        raise error(f"cannot read {what} ({err.strerror or err})", path) from None
    if not stat.S_ISREG(info.st_mode):
        raise error(f"cannot read {what}: not a regular file (a folder, FIFO or device)", path)
    if info.st_size > max_bytes:
        raise error(f"cannot read {what}: {info.st_size:,} bytes, more than the {max_bytes:,} such a file can "
                    "take", path)
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)  # the file may have grown since the stat
    except OSError as err:
        raise error(f"cannot read {what} ({err.strerror or err})", path) from None
    if len(data) > max_bytes:
        raise error(f"cannot read {what}: more than the {max_bytes:,} bytes such a file can take", path)
    return parse_json(data, path, what, max_depth, error)


def write_atomic(data: str | bytes, path: Path, what: str = "") -> None:
    """`data` into `path` under a temporary name beside it, then renamed: readers never see half a file.

    A failure is the `SegError` naming the file and `what` it is ("the summary")."""
    try:
        write_bytes(path, data.encode() if isinstance(data, str) else data)
    except OSError as err:
        raise SegError(f"cannot write {what + ' ' if what else ''}({err.strerror or err})", path) from None


def save_nifti(array: np.ndarray, affine: np.ndarray, path: str | os.PathLike, reference=None) -> Path:
    """Write a NIfTI atomically: on `reference`'s header when given, else a new one with the affine in both forms.

    With a reference (the input scan), its header is kept byte for byte where the output allows: sform and qform
    matrices and codes, units, orientation; MONAI's `SaveImage` rebuilds them from a float affine instead. The
    data type is `array`'s, with no scaling (an int16 input may carry a slope that a label map must not).

    Args:
        array: `(X, Y, Z)` or `(X, Y, Z, K)`; stored as its dtype.
        affine: voxel -> world (mm); ignored with a reference (its own affine is the output's).
        path: the final file (`.nii` or `.nii.gz`).
        reference: a nibabel image whose grid `array` lies on (lazy is fine: only its header is read).
    """
    import nibabel as nib

    if reference is not None:
        header = reference.header.copy()
        header.set_data_dtype(array.dtype)
        header.set_slope_inter(1.0, 0.0)
        header["cal_min"], header["cal_max"] = 0, 0
        header.set_intent("none")
        image = type(reference)(array, reference.affine, header)
    else:
        image = nib.Nifti1Image(array, affine)
        image.header.set_xyzt_units("mm")
        image.set_qform(affine, code=1)  # scanner coordinates, in both forms so every reader agrees
        image.set_sform(affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(image, tmp)
    return Path(path)


__all__ = ["atomic_path", "parse_json", "pid_alive", "read_json", "remove_stale_temporaries", "save_nifti",
           "temporary_path", "write_bytes", "write_text"]
