"""`seg fit` on bad paths: one clear line naming the path, a non-zero exit, and nothing already written lost."""

from __future__ import annotations

import hashlib
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiny_run import tiny_config


TINY = {
    "trainer": {"max_epochs": 1, "accelerator": "cpu", "limit_train_batches": 1, "limit_val_batches": 1},
    "model": {"channels": [8, 16, 32], "strides": [2, 2], "sw_batch_size": 2, "hd95": False},
    "data": {"patch_size": [32, 32, 16], "batch_size": 2, "num_workers": 0},
}


def seg(*args, preexec_fn=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    return subprocess.run([sys.executable, "-m", "seg", *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=600, preexec_fn=preexec_fn)


def assert_one_line_error(result, path):
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("seg fit: error: ") and str(path) in last, last
    return last


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    return tiny_config(tmp_path_factory.mktemp("errors"), TINY, cases=4)


def test_dataset_folder_that_is_a_symlink_loop(config, tmp_path):
    loop = tmp_path / "data"
    loop.symlink_to(tmp_path / "other")
    (tmp_path / "other").symlink_to(loop)
    result = seg("fit", "--config", config, "--data.root", loop, "--trainer.default_root_dir", tmp_path / "run",
                 "--logging", "csv")
    assert_one_line_error(result, loop)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_default_root_dir_under_a_regular_file(config, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    run = tmp_path / "file" / "run"
    result = seg("fit", "--config", config, "--trainer.default_root_dir", run)  # W&B logger (disabled mode)
    assert "a parent of this path is a file" in assert_one_line_error(result, run)


def _fill_up(root: Path):
    """A full disk: a 2 MiB tmpfs at `root` when we may mount one (root in a sandbox), else a file size limit.

    Returns a `preexec_fn` for the fit (None with the tmpfs).
    """
    root.mkdir()
    if os.geteuid() == 0:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2M", "tmpfs", str(root)], capture_output=True)
        if mounted.returncode == 0:
            return None
    # No mount: cap file size at 256 KiB (Python ignores SIGXFSZ, so the write fails with EFBIG instead).
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))


def test_full_disk_keeps_the_previous_last_checkpoint(config, tmp_path):
    root = tmp_path / "disk"
    preexec_fn = _fill_up(root)
    try:
        checkpoints = root / "run" / "checkpoints"
        checkpoints.mkdir(parents=True)
        previous = checkpoints / "last.ckpt"
        torch.save({"global_step": 7, "weights": torch.randn(300_000)}, previous)  # 1.2 MB: a second copy won't fit
        digest = hashlib.sha256(previous.read_bytes()).hexdigest()
        result = seg("fit", "--config", config, "--trainer.default_root_dir", root / "run", "--logging", "csv",
                     "--overlays.every_n_epochs", "0", preexec_fn=preexec_fn)
        last = assert_one_line_error(result, checkpoints)
        assert "cannot write checkpoint" in last and "unchanged" in last
        assert hashlib.sha256(previous.read_bytes()).hexdigest() == digest
        assert torch.load(previous, weights_only=True)["global_step"] == 7
        assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt"]  # no temp file, no torn best.ckpt
    finally:
        if preexec_fn is None:
            subprocess.run(["umount", str(root)], check=True)
