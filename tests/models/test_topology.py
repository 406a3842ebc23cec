"""Strides per axis: refused when they shrink an axis of the data below a 3x3x3 convolution's reach."""

import pytest

from seg.errors import SegError
from seg.models.topology import check_strides, per_axis, suggest_strides


def test_suggested_strides_stop_halving_a_thin_axis():
    # 16 slices of 4 mm under 96 x 96 pixels: the slice axis is halved twice, the plane three times
    assert suggest_strides([96, 96, 16], 3) == [[2, 2, 2], [2, 2, 2], [2, 2, 1]]
    assert suggest_strides([64, 64, 64], 3) == [[2, 2, 2]] * 3  # isotropic data: isotropic strides
    assert suggest_strides([48, 48, 5], 2) == [[2, 2, 1], [2, 2, 1]]


def test_check_strides_refuses_in_one_line_with_a_working_list():
    with pytest.raises(SegError) as err:
        check_strides([2, 2, 2], [48, 48, 32], [96, 96, 16])  # the patch is 32 deep, the data 16
    message = str(err.value)
    assert "\n" not in message and "axis 2 (S-I) from 16 voxels of data to 2" in message
    assert message.endswith("use --model.strides '[[2,2,2],[2,2,2],[2,2,1]]'")
    check_strides([[2, 2, 2], [2, 2, 2], [2, 2, 1]], [48, 48, 32], [96, 96, 16])  # the suggestion works
    check_strides([2, 2, 2], [40, 56, 40], [36, 50, 35])  # hippocampus as configured


def test_check_strides_refuses_a_patch_the_strides_do_not_divide():
    with pytest.raises(SegError, match=r"axis 1 \(A-P\) is not a multiple of 8"):
        check_strides([2, 2, 2], [48, 44, 32], [100, 100, 100])


def test_per_axis_expands_scalars():
    assert per_axis([2, [2, 2, 1]], 3) == [(2, 2, 2), (2, 2, 1)]
