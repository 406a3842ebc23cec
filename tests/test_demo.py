"""`make demo`: its held-out table, and the demo config learning both classes of the phantoms."""

from __future__ import annotations

import math

from seg.demo import held_out_table


def test_held_out_table_gives_dice_missing_classes_and_means_over_defined_cases():
    scores = {"a": {"liver": 0.9, "lesion": 0.0}, "b": {"liver": 0.8, "lesion": math.nan},
              "c": {"liver": 0.7, "lesion": 0.6}}
    missing = {"a": {"lesion": "not predicted"}, "b": {"lesion": "in neither"}, "c": {}}
    lines = held_out_table(scores, missing, ["liver", "lesion"])
    assert lines[0].split() == ["case", "liver", "lesion", "missing"]
    assert lines[1].split() == ["a", "0.900", "0.000", "lesion:", "not", "predicted"]
    assert lines[2].split()[:3] == ["b", "0.800", "n/a"] and lines[3].split() == ["c", "0.700", "0.600", "-"]
    # the lesion's mean over the two cases where it is defined (0 and 0.6), and how often it was missing
    assert lines[4].split() == ["mean", "0.800", "0.300", "lesion", "missing", "in", "2", "of", "3"]
