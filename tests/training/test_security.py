"""Security: crafted checkpoints are refused before they can run code; secrets never reach configs or logs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiny_run import tiny_config


SECRET = "sk-test-1234567890"
TINY = {
    "trainer": {"max_epochs": 1, "accelerator": "cpu", "limit_train_batches": 1, "limit_val_batches": 1,
                "log_every_n_steps": 1},
    "model": {"channels": [8, 16, 32], "strides": [2, 2], "sw_batch_size": 2, "hd95": False},
    "data": {"patch_size": [32, 32, 16], "batch_size": 2, "num_workers": 0},
}


class _Payload:
    """Unpickling this runs `touch <marker>`: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def seg(*args, env_extra=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "seg", *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=600)


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    return tiny_config(tmp_path_factory.mktemp("security"), TINY, cases=4)


@pytest.fixture
def crafted(tmp_path) -> tuple[Path, Path]:
    """A checkpoint-shaped pickle with a code-running object inside, and the marker file it would create."""
    marker = tmp_path / "PWNED"
    path = tmp_path / "crafted.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"lr": 0.1}, "epoch": 0, "global_step": 0,
                "payload": _Payload(marker)}, path)
    return path, marker


@pytest.mark.parametrize("command", ["fit", "validate"])
def test_crafted_checkpoint_is_refused(config, tmp_path, crafted, command):
    path, marker = crafted
    # Even with torch told to unpickle anything whenever the caller does not say otherwise.
    result = seg(command, "--config", config, "--trainer.default_root_dir", tmp_path / "run", "--logging", "csv",
                 "--ckpt_path", path, env_extra={"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"})
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"seg {command}: error: {path}: refused: not a weights-only checkpoint"), last
    assert not marker.exists()
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_trainer_checkpoint_loading_is_weights_only_whatever_it_is_asked(crafted, monkeypatch):
    """Lightning's own load path (strategy.checkpoint_io) refuses too, even asked for `weights_only=False`."""
    from seg.errors import CheckpointError
    from seg.training.checkpoint_io import AtomicCheckpointIO

    path, marker = crafted
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    for weights_only in (None, False):
        with pytest.raises(CheckpointError, match="refused"):
            AtomicCheckpointIO().load_checkpoint(path, weights_only=weights_only)
    assert not marker.exists()


def test_wandb_key_never_written_or_printed(config, tmp_path):
    run, home = tmp_path / "run", tmp_path / "home"  # a home of its own: W&B's cache and settings land there
    home.mkdir()
    result = seg("fit", "--config", config, "--trainer.default_root_dir", run, "--overlays.every_n_epochs", "0",
                 env_extra={"WANDB_API_KEY": SECRET, "WANDB_MODE": "offline", "HOME": str(home),
                            "MPLCONFIGDIR": os.environ.get("MPLCONFIGDIR", str(Path.home() / ".cache" / "matplotlib"))})
    assert result.returncode == 0, result.stderr[-3000:]
    assert SECRET not in result.stdout and SECRET not in result.stderr
    (offline,) = (run / "wandb").glob("offline-run-*")
    files = [p for folder in (run, home) for p in folder.rglob("*") if p.is_file()]
    names = {p.relative_to(offline).as_posix() for p in files if offline in p.parents}
    # where an offline run keeps its config and history (the .wandb log), console and debug output
    assert {f"run-{offline.name.rsplit('-', 1)[1]}.wandb", "files/output.log", "logs/debug.log",
            "logs/debug-internal.log"} <= names, names
    assert (run / "config.yaml").is_file()
    leaked = [str(p) for p in files if SECRET.encode() in p.read_bytes()]
    assert not leaked
