import json

import pytest

from seg.data.split import Split, load_split, save_split, split_cases
from seg.errors import DataError

IDS = [f"case_{i:03d}" for i in range(23)]


def test_holdout_is_deterministic_disjoint_and_complete():
    a = split_cases(IDS, val_fraction=0.2, seed=3)
    b = split_cases(list(reversed(IDS)), val_fraction=0.2, seed=3)
    assert a == b
    assert len(a.val) == 5  # round(23 * 0.2)
    assert not set(a.train) & set(a.val)
    assert sorted(a.train + a.val) == IDS
    assert a.train == sorted(a.train) and a.val == sorted(a.val)
    assert split_cases(IDS, val_fraction=0.2, seed=4).val != a.val


def test_folds_partition_the_cases():
    folds = [split_cases(IDS, fold=k, num_folds=5, seed=0) for k in range(5)]
    vals = [f.val for f in folds]
    assert sorted(v for val in vals for v in val) == IDS  # every case validates exactly once
    assert sorted(len(v) for v in vals) == [4, 4, 5, 5, 5]
    for f in folds:
        assert sorted(f.train + f.val) == IDS and not set(f.train) & set(f.val)
        assert f.fold is not None
    assert folds[2] == split_cases(IDS, fold=2, num_folds=5, seed=0)
    assert [f.val for f in (split_cases(IDS, fold=k, num_folds=5, seed=1) for k in range(5))] != vals


def test_val_cases_win_and_unknown_ones_are_refused():
    s = split_cases(IDS, val_cases=["case_007", "case_001"], fold=1)
    assert s.val == ["case_001", "case_007"] and len(s.train) == 21 and s.fold is None
    with pytest.raises(DataError, match="case_999"):
        split_cases(IDS, val_cases=["case_999"])


@pytest.mark.parametrize("kwargs", [{"fold": 5, "num_folds": 5}, {"fold": 0, "num_folds": 1},
                                    {"fold": 0, "num_folds": 30}, {"val_fraction": 1.0}])
def test_bad_settings_are_data_errors(kwargs):
    with pytest.raises(DataError):
        split_cases(IDS, **kwargs)


def test_zero_fraction_trains_on_everything():
    s = split_cases(IDS, val_fraction=0.0)
    assert s.val == [] and s.train == IDS


def test_save_and_load_round_trip(tmp_path):
    s = split_cases(IDS, fold=1, seed=7)
    path = save_split(s, tmp_path / "run" / "split.json")
    assert json.loads(path.read_text()) == {"train": s.train, "val": s.val, "seed": 7, "fold": 1}
    assert load_split(path) == s
    assert [p.name for p in path.parent.iterdir()] == ["split.json"]  # no temporary file left behind
    assert isinstance(load_split(path), Split)
