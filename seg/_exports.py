"""Lazy re-exports for the packages' `__init__` (PEP 562): a name is imported from its module when first used.

`seg synth` and `seg check-data` import `seg.data.*` modules that need only nibabel and numpy, and `seg predict`
must not import Lightning: a package's public names must not pull in every module behind them.
"""

from __future__ import annotations

from importlib import import_module


def lazy_exports(package: str, exports: dict[str, str]):
    """`(__all__, __getattr__)` for a package whose public names `exports` maps to the modules defining them."""

    def __getattr__(name: str):
        if name in exports:
            return getattr(import_module(exports[name]), name)
        raise AttributeError(f"module '{package}' has no attribute {name!r}")

    return sorted(exports), __getattr__
