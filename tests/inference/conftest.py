"""A real `seg fit` checkpoint, trained for seconds on a tiny synthetic dataset, shared by the inference tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from seg.data.synthetic import write_dataset


def quiet_env() -> dict[str, str]:
    """One thread per process: the tests run beside other work, and oversubscribed BLAS threads crawl."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "disabled"}


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory) -> Path:
    """`last.ckpt` of a 3D AttentionUNet (channels 8-16-32) fitted for 2 short epochs on 6 synthetic 32x32x24 cases.

    Preprocessing: RAS, spacing 1.5 x 1.5 x 2 mm, z-score on nonzero voxels, crop to foreground; classes
    background / liver / lesion; patch 32 x 32 x 16. Too short to segment well: for plumbing and geometry.
    """
    root = tmp_path_factory.mktemp("trained")
    data = write_dataset(root / "data", cases=6, test_cases=2, size=(32, 32, 24))
    config = root / "config.yaml"
    config.write_text(
        f"trainer: {{max_epochs: 2, accelerator: cpu, default_root_dir: {root / 'run'}, limit_train_batches: 3}}\n"
        "model: {channels: [8, 16, 32], strides: [2, 2]}\n"
        f"data: {{root: {data}, patch_size: [32, 32, 16], batch_size: 2, num_workers: 0}}\n"
        "overlays: {every_n_epochs: 0}\n")  # a checkpoint is all these tests need
    done = subprocess.run([sys.executable, "-m", "seg", "fit", "--config", str(config), "--logging", "csv"],
                          capture_output=True, text=True, env=quiet_env(), timeout=600)
    checkpoint = root / "run" / "checkpoints" / "last.ckpt"
    assert done.returncode == 0 and checkpoint.is_file(), done.stderr[-3000:]
    return checkpoint
