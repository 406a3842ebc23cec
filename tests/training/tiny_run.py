"""Shared by the training tests that run `seg fit` in a subprocess on a tiny synthetic dataset."""

from __future__ import annotations

from pathlib import Path

import yaml


def tiny_config(root: Path, tiny: dict, cases: int) -> Path:
    """Write `cases` synthetic 32x32x24 cases under `root/synth` and a YAML config: `tiny` with that data root."""
    from seg.data.synthetic import write_dataset

    data = write_dataset(root / "synth", cases=cases, test_cases=0, size=(32, 32, 24))
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump({**tiny, "data": {**tiny["data"], "root": str(data)}}))
    return path
