"""The `seg` command line: one entry point, one subcommand per job.

`fit`, `validate` and `test` are Lightning's CLI (YAML configs, `--section.key value` overrides);
the others are plain argparse commands. User errors (`SegError`) are printed as one line and give a
non-zero exit; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

# name -> (module, one-line help). Modules are imported only when their command runs, so `seg --help`
# stays fast. A module provides `add_arguments(parser)` and `run(args) -> int`. `seg --help` lists them in this
# order, a first session's on one's own data: check, plan, train, predict, look, score; then the rest.
COMMANDS: dict[str, tuple[str, str]] = {
    "check-data": ("seg.data.checks", "check every case of a dataset before training on it"),
    "plan": ("seg.data.plan", "write a training config derived from a dataset, with the reason for each value"),
    "fit": ("seg.training.cli", "train a model from a plan or a YAML config (Lightning CLI)"),
    "predict": ("seg.inference.predict", "segment every scan in a folder, in each scan's own geometry"),
    "overlays": ("seg.explain.command", "write attention-gate overlays for scans, without training"),
    "evaluate": ("seg.evaluate", "score predicted label maps against labels: Dice, HD95, surface Dice per case"),
    "review": ("seg.explain.review", "write one HTML page to review a run's overlays or a predict folder's flags"),
    "validate": ("seg.training.cli", "score a checkpoint on the validation split"),
    "test": ("seg.training.cli", "score a checkpoint on the test split"),
    "cv": ("seg.training.cv", "k-fold cross-validation: train the folds, score them out of fold, pick postprocessing"),
    "export": ("seg.inference.export",
               "write a checkpoint's network as an ONNX model (seg's settings in its metadata)"),
    "synth": ("seg.data.synthetic", "write a synthetic MRI-like dataset in MSD layout (demo and tests)"),
    "download": ("seg.data.download", "download a Medical Segmentation Decathlon task (with checksum)"),
}
LIGHTNING_COMMANDS = ("fit", "validate", "test")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seg",
        description="Attention U-Net segmentation of NIfTI scans: train, predict, and see where the network looks.",
        epilog="Start here: `seg check-data DATASET`, then `seg fit --data.root DATASET` (plans, then trains for an "
               "hour on a CPU), then `seg predict --checkpoint runs/latest/checkpoints/best.ckpt --input SCANS "
               "--output OUT`. No data yet: `seg synth --output data/synth`. Run `seg <command> --help` for the "
               "options of one command.",
    )
    from seg import __version__

    parser.add_argument("--version", action="version", version=f"seg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name, (_, help_text) in COMMANDS.items():
        if _available(name):
            sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _available(name: str) -> bool:
    """True when the command's module is part of this installation."""
    return importlib.util.find_spec(COMMANDS[name][0]) is not None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help", "--version") or argv[0] not in COMMANDS:
        parser.parse_args(argv or ["--help"])
        return 0
    name, rest = argv[0], argv[1:]
    if not _available(name):
        parser.error(f"the command '{name}' is not available in this version of seg")
    from seg.errors import SegError

    module = importlib.import_module(COMMANDS[name][0])
    try:
        if name in LIGHTNING_COMMANDS:
            return module.run_lightning(name, rest)
        sub = argparse.ArgumentParser(prog=f"seg {name}", description=COMMANDS[name][1])
        module.add_arguments(sub)
        return module.run(sub.parse_args(rest))
    except SegError as err:
        print(f"seg {name}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"seg {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
