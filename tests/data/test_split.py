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


def test_group_pattern_keeps_a_patients_volumes_together():
    from seg.data.split import case_groups

    ids = [f"patient{p:03d}_frame{f:02d}" for p in range(1, 21) for f in (1, 12)] + ["loner"]
    pattern = r"^(patient\d+)_"
    assert case_groups(ids, pattern)["patient003"] == ["patient003_frame01", "patient003_frame12"]
    for split in [split_cases(ids, val_fraction=0.2, seed=s, group_pattern=pattern) for s in range(5)] + \
                 [split_cases(ids, fold=k, num_folds=5, group_pattern=pattern) for k in range(5)]:
        val_patients = {c.split("_")[0] for c in split.val}
        train_patients = {c.split("_")[0] for c in split.train}
        assert not val_patients & train_patients
        assert sorted(split.train + split.val) == sorted(ids)
    assert len(split_cases(ids, val_fraction=0.2, group_pattern=pattern).val) in (8, 9)  # 20 % of 41 in pairs
    folds = [set(split_cases(ids, fold=k, num_folds=5, group_pattern=pattern).val) for k in range(5)]
    assert set().union(*folds) == set(ids) and sum(map(len, folds)) == len(ids)


def test_group_pattern_without_a_group_is_refused():
    with pytest.raises(DataError, match="needs a group"):
        split_cases(["a", "b", "c"], group_pattern=r"^patient\d+")
