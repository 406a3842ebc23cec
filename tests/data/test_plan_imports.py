"""`seg plan` decides from a fingerprint: it must not pay MONAI's import time."""

import subprocess
import sys


def test_importing_the_planner_does_not_import_monai():
    code = "import sys, seg.data.plan; print('monai' in sys.modules, 'seg.data.transforms' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
