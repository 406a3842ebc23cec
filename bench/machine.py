"""The machine a benchmark row was measured on: lscpu's model name (the guide asks for it in every row)."""

from __future__ import annotations

import platform
import subprocess


def cpu_name() -> str:
    """lscpu's "Model name", or the platform's processor where lscpu is missing."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"
