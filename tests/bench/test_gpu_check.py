"""`bench/gpu_check.sh`: it parses, and without a GPU it refuses in one line with a non-zero exit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_check.sh"


def test_gpu_check_parses():
    done = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_gpu_check_refuses_without_a_gpu(tmp_path):
    # CUDA_VISIBLE_DEVICES="" hides any GPU, so this holds on a GPU machine too
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [f"bench/gpu_check.sh: no CUDA GPU visible to {sys.executable}'s "
                                                "torch: run it on a GPU node"]
    assert not (tmp_path / "out").exists()  # refused before anything was written
