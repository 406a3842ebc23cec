"""bench/nnunet_predict_speed.py: its help runs without nnU-Net, and the snippet it runs in nnU-Net's python compiles."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "nnunet_predict_speed.py"


def test_help_and_the_checkpoint_snippet():
    done = subprocess.run([sys.executable, str(BENCH), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--nnunet-python" in done.stdout and "nnUNetv2_predict" in done.stdout
    sys.path.insert(0, str(BENCH.parent))
    try:
        import nnunet_predict_speed
    finally:
        sys.path.remove(str(BENCH.parent))
    compile(nnunet_predict_speed.MAKE_CHECKPOINT, "make_checkpoint", "exec")
