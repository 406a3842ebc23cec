"""The help a newcomer reads first: commands in the order of a first session, where to start, what plan-less
`seg fit` does, `seg plan`'s rules with their values."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from seg.cli import main


def test_seg_help_lists_commands_in_first_session_order(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    listed = re.findall(r"^    (\S+)", out, flags=re.MULTILINE)
    assert listed[:6] == ["check-data", "plan", "fit", "predict", "overlays", "evaluate"]
    assert "Start here: `seg check-data DATASET`" in " ".join(out.split())


def test_fit_help_opens_with_what_planless_fit_does():
    result = subprocess.run([sys.executable, "-m", "seg", "fit", "--help"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("usage: seg fit [--config plan.yaml] [--data.root DATASET]")
    opening = " ".join(" ".join(lines[1:12]).split())
    assert "`seg fit --data.root DATASET` without --config plans first" in opening
    assert "for 60 minutes on a CPU" in opening


def test_plan_help_shows_values_not_names_or_markdown(capsys):
    with pytest.raises(SystemExit) as done:
        main(["plan", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "fewer than 12 voxels after resampling" in " ".join(out.split())
    assert "MIN_3D_SLICES" not in out and "MIN_FEATURE" not in out and "**" not in out and "`" not in out
    assert "{auto,cpu,gpu}" in out and "auto (default): a GPU when PyTorch sees one" in " ".join(out.split())
