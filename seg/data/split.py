"""Which cases train and which validate: a seeded hold-out fraction, an explicit list, or fold k of n.

The k-fold split follows nnU-Net: sorted case ids, shuffled with the seed, cut into `num_folds` near-equal
parts; fold k validates on part k. With a group pattern, the same is done with groups of cases (the volumes of
one patient), so no patient is on both sides. The same ids and seed always give the same split, on any machine.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from seg.errors import DataError
from seg.io import write_text


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
    group_pattern: str | None = None,
) -> Split:
    """Split case ids into train and validation; `val_cases` wins over `fold`, which wins over `val_fraction`.

    With `group_pattern`, cases of one group (one patient: `patient001_frame01` and `patient001_frame12`) are never
    split apart: groups are shuffled and cut instead of cases, and `val_fraction` counts the cases of whole groups.

    Args:
        case_ids: every labelled case of the dataset.
        val_fraction: share of cases held out for validation (rounded, at least one when > 0).
        val_cases: explicit validation case ids; every other case trains.
        fold: validate on fold `fold` (0-based) of `num_folds`.
        num_folds: number of folds for `fold`.
        seed: shuffles the cases before the hold-out or the folds are cut.
        source: the dataset folder, named in error messages.
        group_pattern: a regular expression whose first group names a case's group (`^(patient\d+)_`); a case it
            does not match is a group of its own.

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
        groups = case_groups(ids, group_pattern, source)
        names = sorted(groups)
        shuffled = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
        if fold is not None:
            if num_folds < 2 or num_folds > len(names):
                raise DataError(f"num_folds={num_folds} needs 2..{len(names)} (the number of "
                                f"{'groups' if group_pattern else 'cases'})", source)
            if not 0 <= fold < num_folds:
                raise DataError(f"fold={fold} must be in 0..{num_folds - 1}", source)
            part = np.array_split(np.array(shuffled, dtype=object), num_folds)[fold].tolist()
            val = sorted(c for g in part for c in groups[g])
        else:
            if not 0.0 <= val_fraction < 1.0:
                raise DataError(f"val_fraction={val_fraction} must be in [0, 1)", source)
            n_val = 0 if val_fraction == 0 else max(1, round(len(ids) * val_fraction))
            val = []
            for g in shuffled:  # whole groups until the held-out cases reach the fraction
                if len(val) >= n_val:
                    break
                val += groups[g]
            val = sorted(val)
    held_out = set(val)
    train = [i for i in ids if i not in held_out]
    if not train:
        raise DataError(f"no training cases left after holding out {len(val)} for validation", source)
    return Split(train=train, val=val, seed=seed, fold=fold if val_cases is None else None)


def case_groups(case_ids: Sequence[str], pattern: str | None, source=None) -> dict[str, list[str]]:
    """Case ids by group: the first group of `pattern` matched at the start of the id, else the id itself."""
    if pattern is None:
        return {i: [i] for i in case_ids}
    try:
        regex = re.compile(pattern)
    except re.error as err:
        raise DataError(f"group_pattern '{pattern}' is not a regular expression ({err})", source) from None
    if regex.groups < 1:
        raise DataError(f"group_pattern '{pattern}' needs a group in parentheses naming the patient", source)
    groups: dict[str, list[str]] = {}
    for case_id in case_ids:
        match = regex.match(case_id)
        groups.setdefault(match.group(1) if match and match.group(1) else case_id, []).append(case_id)
    return groups


def save_split(split: Split, path: str | os.PathLike) -> Path:
    """Write `split` as JSON ({"train", "val", "seed", "fold"}) atomically, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text(path, json.dumps(asdict(split), indent=1))


def load_split(path: str | os.PathLike) -> Split:
    """Read a `split.json` written by `save_split`."""
    try:
        return Split(**json.loads(Path(path).read_text()))
    except (OSError, ValueError, TypeError) as err:
        raise DataError(f"cannot read split: {err}", path) from None
