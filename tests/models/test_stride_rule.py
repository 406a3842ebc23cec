"""One stride rule: the strides `seg fit` suggests when it refuses are the ones `seg plan` chooses."""

import re

import pytest

from seg.data.plan import plan_strides as planned
from seg.errors import SegError
from seg.models.topology import MIN_FEATURE_SIZE, PLANNED_FEATURE_SIZE, check_strides, plan_strides


def _suggestion(strides, patch, spacing=None):
    with pytest.raises(SegError) as err:
        check_strides(strides, patch, patch, spacing=spacing)
    found = re.search(r"use --model.strides '(\[.*\])'", str(err.value))
    return eval(found.group(1)), str(err.value)  # a literal list of lists of ints


@pytest.mark.parametrize("strides, patch, spacing", [
    ([2, 2, 2], [48, 64, 16], [1.0, 1.0, 1.0]),  # thin patch
    ([2, 2, 2], [64, 64, 16], [0.8, 0.8, 4.0]),  # thin slices: in-plane first
    ([2, 2, 2, 2], [16, 16, 16], [1.0, 1.0, 1.0]),  # the plan would use fewer levels
    ([2, 2, 2, 2], [32, 32], [0.7, 0.7]),  # 2D
])
def test_the_refusal_suggests_what_the_plan_chooses(strides, patch, spacing):
    suggestion, message = _suggestion(strides, patch, spacing)
    assert planned is plan_strides  # seg plan uses topology's rule itself
    assert suggestion == plan_strides(patch, spacing, len(strides))
    if len(suggestion) < len(strides):
        assert message.endswith(f"with {len(suggestion) + 1} --model.channels (fewer levels)")


def test_the_plan_prefers_a_wider_map_than_the_refusal_needs():
    assert (MIN_FEATURE_SIZE, PLANNED_FEATURE_SIZE) == (3, 4)
    # 24 voxels: three halvings leave 3, which a 3-wide kernel still sees (allowed), but the plan stops at 6
    check_strides([2, 2, 2], [24, 24, 24], [24, 24, 24])
    assert plan_strides([24, 24, 24], [1, 1, 1], 3) == [[2, 2, 2]] * 2
    suggestion, _ = _suggestion([2, 2, 2, 2], [32, 32, 32])  # 32 / 16 = 2 voxels: refused
    assert suggestion == [[2, 2, 2]] * 3  # down to 4, not 3
