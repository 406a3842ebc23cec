"""The size guard: what a NIfTI file's header claims, checked against the file and the memory before any voxel is read.

A NIfTI header states the shape and voxel type, and every reader (nibabel, MONAI's `LoadImaged`) allocates
what it states before reading a byte of voxel data. A 4 KiB file can claim 1024^3 float32 voxels (4 GiB), a
2 MiB gzip stream can inflate to 2 GiB of zeros, and 8^3 voxels of 1000 mm resample to 8000^3 voxels at 1 mm.
`guard_file` refuses all three from the header alone, in one line naming the file, the claim and the limit;
`seg check-data`, the training loader (`seg.data.transforms.LoadScand`), `seg predict` and `seg overlays`
call it before reading.

The memory available is `SEG_MEMORY_LIMIT` when set (bytes, or with a K/M/G/T suffix), else what the
kernel reports as available (`MemAvailable`, and the cgroup's limit when lower).
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np

from seg.errors import DataError, escape, one_line

# Deflate cannot compress better than 1032:1, and comes near it only for constant data; real scans and label
# maps compress far less (nibabel's own gzip of an all-zero label: 229:1). A claim above this ratio is a
# gzip bomb or a forged header.
GZIP_MAX_RATIO = 1000
# 2^31 voxels per channel (8 GiB in float32, 40x a 512 x 512 x 400 CT): beyond anything seg is built or tested
# for, and beyond the 32-bit indexing of some torch kernels, whatever the memory.
MAX_VOXELS = 2**31
# A scan costs about 4x its float32 size in `seg predict` (BENCHMARKS.md) and in the training loader
# (loaded copy, resampled copy, normalised copy, crop).
WORKING_COPIES = 4
MEMORY_ENV = "SEG_MEMORY_LIMIT"


def memory_limit() -> int:
    """Bytes that one scan and its working copies may take: `SEG_MEMORY_LIMIT`, else the memory available now."""
    value = os.environ.get(MEMORY_ENV)
    if value:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", value.lower())
        if match is None:
            raise DataError(f"{MEMORY_ENV}={value!r} is not a size; give bytes or e.g. 8G")
        return int(float(match[1]) * 1024 ** " kmgt".index(match[2] or " "))
    return _available_memory()


def _available_memory() -> int:
    available = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError):
        pass
    try:  # a container's own limit (cgroup v2), when it is below the machine's
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            available.append(int(limit) - used)
    except (OSError, ValueError):
        pass
    if not available:  # not Linux: the physical memory
        try:
            available.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        except (OSError, ValueError, AttributeError):
            return 1 << 62
    return max(0, min(available))


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


@contextmanager
def named_warnings(*paths: str | os.PathLike) -> Iterator[None]:
    """Prefix nibabel's header messages ("vox offset (=360) not divisible by 16 ...") with the file name(s).

    nibabel logs what it finds (and fixes) in a header on its `nibabel.global` logger, without saying which
    file, and raises some Python warnings ("Extension size is not a multiple of 16 bytes"), which Python prints
    on two lines with nibabel's source line; within this context (in this thread) each of them is one line
    naming the files being read.
    """
    logger = logging.getLogger("nibabel.global")
    name = ", ".join(shown(p) for p in paths)
    thread = threading.get_ident()

    class Prefix(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            message = one_line(" ".join(record.getMessage().split()))
            if record.thread == thread and not message.startswith(name):  # another thread reads another file
                message = f"{name}: {message}"
            record.msg, record.args = message, ()
            return True

    global _show_warning_elsewhere
    if warnings.showwarning is not _show_warning:  # installed once; outside these contexts it changes nothing
        _show_warning_elsewhere, warnings.showwarning = warnings.showwarning, _show_warning
    prefix = Prefix()
    logger.addFilter(prefix)
    _reading.names = [*getattr(_reading, "names", []), name]
    try:
        yield
    finally:
        _reading.names = _reading.names[:-1]
        logger.removeFilter(prefix)


_reading = threading.local()  # names: the files this thread is reading inside `named_warnings`, innermost last
_show_warning_elsewhere = warnings.showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """`warnings.showwarning` that puts a warning raised while a file is read on nibabel's logger, as one line."""
    names = getattr(_reading, "names", [])
    if not names:
        _show_warning_elsewhere(message, category, filename, lineno, file, line)
        return
    text = one_line(" ".join(str(message).split()))
    logging.getLogger("nibabel.global").warning("%s: %s: %s", names[-1], category.__name__, text)


def shown(path: str | os.PathLike) -> str:
    """A file name as printed in messages: as it is, or escaped (`repr`) when it holds a newline or other control."""
    return escape(os.fspath(path))


def load_header(path: str | os.PathLike) -> nib.Nifti1Image:
    """The lazy nibabel image of a NIfTI file (header read, no voxels), or a `DataError` naming the file."""
    try:
        with named_warnings(path):
            image = nib.load(os.fspath(path))
    except Exception as err:  # noqa: BLE001 - nibabel raises many types for files that are not NIfTI
        text = " ".join(str(err).split()) or type(err).__name__
        raise DataError(f"not a readable NIfTI file ({text})", path) from None
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise DataError(f"not a NIfTI image ({type(image).__name__})", path)
    return image


def ras_spacing_shape(affine: np.ndarray, shape: Sequence[int]) -> tuple[list[float], list[int]]:
    """Voxel spacing (mm, the norm of each affine column as MONAI's `Spacingd` measures it) and shape along R, A, S."""
    zooms = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    shape = (list(shape) + [1, 1, 1])[:3]
    spacing, size = [0.0] * 3, [0] * 3
    for voxel_axis, (ras_axis, _) in enumerate(nib.orientations.io_orientation(affine)):
        if not math.isnan(ras_axis):
            spacing[int(ras_axis)] = float(zooms[voxel_axis])
            size[int(ras_axis)] = int(shape[voxel_axis])
    return spacing, size


def resampled_shape(affine: np.ndarray, shape: Sequence[int], target: Sequence[float]) -> list[int]:
    """The R, A, S shape after resampling to `target` mm (0 keeps an axis), as `Spacingd` sizes its output."""
    spacing, size = ras_spacing_shape(affine, shape)
    return [n if t <= 0 else max(1, math.ceil(n * s / t)) for n, s, t in zip(size, spacing, target)]


def guard_file(path: str | os.PathLike, target_spacing: Sequence[float] | None = None,
               copies: int = WORKING_COPIES, image: nib.Nifti1Image | None = None) -> nib.Nifti1Image:
    """Refuse a NIfTI file whose header claims more than the file holds or the memory can take; read no voxels.

    Checks, from the header alone: voxel type (RGB and complex are refused), no zero-length axis, the claimed
    bytes against the file size (uncompressed: at most what follows the header; gzip: at most `GZIP_MAX_RATIO`
    times the file) and, as float32 with `copies` working copies, against `memory_limit()`; with
    `target_spacing`, the voxel count after resampling against `MAX_VOXELS` and the memory.

    Args:
        path: the file.
        target_spacing: mm along R, A, S the scan will be resampled to (0: the axis is kept); None: not resampled.
        copies: float32 copies of the volume the caller holds at its peak.
        image: the file's lazy nibabel image when the caller has loaded it already.

    Returns:
        the lazy nibabel image. Raises `DataError` naming the file, the claimed shape and the limit.
    """
    path = Path(path)
    image = load_header(path) if image is None else image
    header = image.header
    shape = tuple(int(n) for n in header.get_data_shape())
    dtype = header.get_data_dtype()
    if dtype.fields is not None:
        raise DataError(f"voxels are {'RGBA' if len(dtype.fields) == 4 else 'RGB'} colour ({dtype}); "
                        "expected one scalar value per voxel", path)
    if dtype.kind == "c":
        raise DataError(f"voxels are complex numbers ({dtype}); seg does not drop the imaginary part for you: "
                        "store the magnitude (or the real part) as a real-valued image", path)
    if not shape or min(shape) < 1:
        raise DataError(f"header shape {shape} has a zero-length axis: the file holds no volume", path)
    voxels = math.prod(shape)
    claimed = voxels * dtype.itemsize
    what = f"header claims shape {shape} of {dtype} ({format_bytes(claimed)})"
    try:
        size = path.stat().st_size
    except OSError as err:
        raise DataError(f"cannot read the file ({err.strerror or err})", path) from None
    offset = int(getattr(image.dataobj, "offset", 0) or 0)
    if path.name.lower().endswith(".gz"):
        if claimed > size * GZIP_MAX_RATIO:
            raise DataError(f"{what}, but a {format_bytes(size)} gzip file inflates to at most "
                            f"{format_bytes(size * GZIP_MAX_RATIO)} ({GZIP_MAX_RATIO}:1): a gzip bomb or a "
                            "forged header", path)
    elif offset + claimed > size:
        raise DataError(f"{what}, but the file holds {format_bytes(max(0, size - offset))} of voxel data "
                        "after its header: truncated, or a forged header", path)
    limit = memory_limit()
    need = voxels * 4 * copies
    if need > limit:
        raise DataError(f"{what}; reading it as float32 takes about {format_bytes(need)}, more than the "
                        f"{format_bytes(limit)} of memory available (set {MEMORY_ENV} to change the limit)", path)
    if target_spacing is not None:
        if not np.all(np.isfinite(image.affine)):
            raise DataError("affine has NaN or infinite entries; fix its sform/qform", path)
        channels = voxels // max(1, math.prod(shape[:3]))
        target = [float(t) for t in target_spacing]
        out = resampled_shape(image.affine, shape, target)
        spacing, _ = ras_spacing_shape(image.affine, shape)
        count = math.prod(out)
        grid = (f"{' x '.join(f'{s:.4g}' for s in spacing)} mm voxels resampled to "
                f"{' x '.join(f'{t:.4g}' if t > 0 else 'kept' for t in target)} mm give shape {tuple(out)} "
                f"({count:,} voxels)")
        if count > MAX_VOXELS:
            raise DataError(f"{grid}, more than the limit of {MAX_VOXELS:,}; check the voxel size in the header",
                            path)
        need = count * channels * 4 * copies
        if need > limit:
            raise DataError(f"{grid}, about {format_bytes(need)} to process, more than the {format_bytes(limit)} "
                            f"of memory available (set {MEMORY_ENV} to change the limit)", path)
    return image
