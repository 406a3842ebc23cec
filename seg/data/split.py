"""Which cases train and which validate: a seeded hold-out fraction, an explicit list, or fold k of n.

The k-fold split follows nnU-Net: sorted case ids, shuffled with the seed, cut into `num_folds` near-equal
parts; fold k validates on part k. The same ids and seed always give the same split, on any machine.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from seg.errors import DataError


@dataclass(frozen=True)
class Split:
    """Case ids used for training and for validation (both sorted), and how they were chosen."""

    train: list[str]
    val: list[str]
    seed: int
    fold: int | None = None


def split_cases(
    case_ids: Sequence[str],
    val_fraction: float = 0.2,
    val_cases: Sequence[str] | None = None,
    fold: int | None = None,
    num_folds: int = 5,
    seed: int = 0,
    source: str | os.PathLike | None = None,
) -> Split:
    """Split case ids into train and validation; `val_cases` wins over `fold`, which wins over `val_fraction`.

    Args:
        case_ids: every labelled case of the dataset.
        val_fraction: share of cases held out for validation (rounded, at least one when > 0).
        val_cases: explicit validation case ids; every other case trains.
        fold: validate on fold `fold` (0-based) of `num_folds`.
        num_folds: number of folds for `fold`.
        seed: shuffles the cases before the hold-out or the folds are cut.
        source: the dataset folder, named in error messages.

    Raises:
        DataError: unknown `val_cases`, a fold outside 0..num_folds-1, or too few cases to split.
    """
    ids = sorted(set(case_ids))
    if val_cases is not None:
        unknown = sorted(set(val_cases) - set(ids))
        if unknown:
            raise DataError(f"val_cases {unknown[:5]} are not cases of this dataset", source)
        val = sorted(set(val_cases))
    else:
        shuffled = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
        if fold is not None:
            if num_folds < 2 or num_folds > len(ids):
                raise DataError(f"num_folds={num_folds} needs 2..{len(ids)} (the number of cases)", source)
            if not 0 <= fold < num_folds:
                raise DataError(f"fold={fold} must be in 0..{num_folds - 1}", source)
            val = sorted(np.array_split(np.array(shuffled, dtype=object), num_folds)[fold].tolist())
        else:
            if not 0.0 <= val_fraction < 1.0:
                raise DataError(f"val_fraction={val_fraction} must be in [0, 1)", source)
            n_val = 0 if val_fraction == 0 else max(1, round(len(ids) * val_fraction))
            val = sorted(shuffled[:n_val])
    held_out = set(val)
    train = [i for i in ids if i not in held_out]
    if not train:
        raise DataError(f"no training cases left after holding out {len(val)} for validation", source)
    return Split(train=train, val=val, seed=seed, fold=fold if val_cases is None else None)


def save_split(split: Split, path: str | os.PathLike) -> Path:
    """Write `split` as JSON ({"train", "val", "seed", "fold"}) atomically, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(asdict(split), f, indent=1)
    os.replace(tmp, path)
    return path


def load_split(path: str | os.PathLike) -> Split:
    """Read a `split.json` written by `save_split`."""
    try:
        return Split(**json.loads(Path(path).read_text()))
    except (OSError, ValueError, TypeError) as err:
        raise DataError(f"cannot read split: {err}", path) from None
