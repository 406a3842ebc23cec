"""Small hostile NIfTI files made on the spot (header bombs, gzip bombs, odd voxel types), and an RSS probe."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

MIB = 1 << 20


def header_bomb(path: Path, shape=(1024, 1024, 1024), dtype=np.float32, affine=None, size: int = 4096) -> Path:
    """An uncompressed .nii of `size` bytes whose header claims `shape` of `dtype` (1024^3 float32: 4 GiB)."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_sform(np.eye(4) if affine is None else affine, code=1)
    header.set_qform(np.eye(4) if affine is None else affine, code=1)
    header["vox_offset"] = 352
    raw = header.binaryblock + b"\0" * 4  # the 4-byte extension flag, then voxel data at 352
    path.write_bytes(raw + b"\0" * (size - len(raw)))
    return path


def gzip_bomb(path: Path, inflated: int = 2 << 30, shape=(1024, 1024, 512), dtype=np.float32) -> Path:
    """A .nii.gz of about `inflated` / 1000 bytes that inflates to `inflated` bytes of zeros after a NIfTI header.

    Built as concatenated gzip members (valid gzip, read by nibabel and `gzip`), the zeros compressed once, so
    making a 2 GiB bomb takes a fraction of a second and no memory.
    """
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_sform(np.eye(4), code=1)
    header["vox_offset"] = 352

    def member(data: bytes) -> bytes:
        z = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: gzip framing
        return z.compress(data) + z.flush()

    chunk = 64 * MIB
    zeros = member(bytes(chunk))
    with open(path, "wb") as f:
        f.write(member(header.binaryblock + b"\0" * 4))
        for _ in range(inflated // chunk):
            f.write(zeros)
    return path


def rss_growth_mb(code: str, setup: str = "", env: dict | None = None) -> tuple[float, str]:
    """Peak RSS growth (MB) of running `code` in a fresh Python after `setup` (imports), and what it printed.

    The peak is `resource.getrusage(RUSAGE_SELF).ru_maxrss` after `setup` and after `code`, so the imports do
    not count.
    """
    script = (f"import resource, sys\n{setup}\nbefore = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
              f"try:\n" + "".join(f"    {line}\n" for line in code.splitlines()) +
              "finally:\n    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
              "    print('RSS_GROWTH_KB', after - before)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    lines = [line for line in done.stdout.splitlines() if line.startswith("RSS_GROWTH_KB")]
    assert lines, done.stdout[-2000:] + done.stderr[-3000:]
    return int(lines[-1].split()[1]) / 1024, done.stdout + done.stderr


def dataset_json(root: Path, meta: dict | str) -> Path:
    path = root / "dataset.json"
    path.write_text(meta if isinstance(meta, str) else json.dumps(meta))
    return path
