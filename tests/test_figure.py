"""The overlay figure on every shape: each view indexes its own axis, degenerate views are left out."""

from __future__ import annotations

import matplotlib.image
import numpy as np
import pytest

from seg.figure import PLANE_AXIS, drawable_planes, render_overlay, slice_indices, to_ras, view
from seg.explain.export import channel_title, display_background


def _volume(shape, centre):
    grid = np.indices(shape).astype(np.float32)
    distance = sum(((g - c) / max(s / 6, 1)) ** 2 for g, c, s in zip(grid, centre, shape))
    return (distance < 1).astype(np.int16)


@pytest.mark.parametrize("shape", [(96, 96, 16), (16, 96, 96), (40, 30, 20)])
def test_each_view_takes_its_index_along_its_own_axis(shape):
    label = _volume(shape, [s * 0.7 for s in shape])
    indices = slice_indices(label)
    for plane, axis in PLANE_AXIS.items():
        assert 0 <= indices[axis] < shape[axis]
        cut = view(label, plane, indices[axis])
        others = [shape[a] for a in range(3) if a != axis]
        assert cut.shape == (others[1], others[0])  # rows: the later axis, top to bottom
        assert cut.any()  # through the target
    # an index beyond an axis is clipped to it, never borrowed from another axis
    assert view(label, "axial", 46).shape == (shape[1], shape[0])


def test_drawable_planes_of_a_single_slice_and_a_line():
    assert drawable_planes((96, 96, 16)) == ("axial", "coronal", "sagittal")
    assert drawable_planes((64, 64, 1)) == ("axial",)
    assert drawable_planes((1, 64, 64)) == ("sagittal",)
    assert drawable_planes((64, 1, 1)) == ("axial", "coronal", "sagittal")  # nothing is 2 x 2: draw as it is


@pytest.mark.parametrize("shape, spacing, rows", [
    ((96, 96, 16), (0.8, 0.8, 4.0), 3),  # thin MR
    ((16, 96, 96), (4.0, 0.8, 0.8), 3),  # thick axis first (affine below makes it S)
    ((512, 512, 30), (0.7, 0.7, 5.0), 3),  # a CT-sized slab
    ((64, 48, 1), (1.0, 1.0, 1.0), 1),  # a single slice
])
def test_render_overlay_on_every_shape(tmp_path, shape, spacing, rows):
    affine = np.diag([*spacing, 1.0])
    if shape[0] < shape[2]:  # thick axis first: voxel axis 0 is S, axis 2 is R
        affine = np.array([[0, 0, spacing[2], 0], [0, spacing[1], 0, 0], [spacing[0], 0, 0, 0], [0, 0, 0, 1.0]])
    rng = np.random.default_rng(0)
    image = rng.normal(100, 10, shape).astype(np.float32)
    label = _volume(shape, [s * 0.4 for s in shape])
    gate = rng.uniform(0, 1, shape).astype(np.float32)
    path = tmp_path / "overlay.png"
    render_overlay(path, image, {"gate_0": gate}, affine, label=label, prediction=label, class_names=["organ"],
                   title="t", image_title="scan: channel 0 (T1) of 2", dpi=40)
    height, width = matplotlib.image.imread(path).shape[:2]
    assert width > 100
    # the figure is 3.1 in per row plus 1.5 in of title and legend, at 40 dpi
    assert height == pytest.approx(40 * (3.1 * rows + 1.5), abs=2)
    ras, mm = to_ras(image, affine)
    assert ras.shape[2] == min(shape) or rows == 1  # the thin axis ends up along S
    assert sorted(mm) == sorted(spacing)


def test_channel_title_and_ct_display_background():
    assert channel_title(1, ["CT"]) == "scan"
    assert channel_title(2, ["T1", "T2"]) == "scan: channel 0 (T1) of 2"
    assert display_background({"normalization": [{"scheme": "zscore", "nonzero": True}]}) == 0.0
    ct = {"normalization": [{"scheme": "ct", "clip": [-100.0, 200.0], "mean": 50.0, "std": 25.0}]}
    assert display_background(ct) == pytest.approx(-6.0)


def test_figure_masks_cover_only_the_drawn_views_of_a_single_slice(tmp_path):
    from seg.figure import figure_masks

    shape = (40, 30, 1)
    label = _volume(shape, [s * 0.5 for s in shape])
    rng = np.random.default_rng(1)
    layout = render_overlay(tmp_path / "one.png", rng.normal(size=shape).astype(np.float32),
                            {"gate_0": rng.uniform(size=shape).astype(np.float32)}, np.eye(4), label=label,
                            prediction=label, dpi=40)
    assert {plane for plane, _, _ in layout.panels} == {"axial"}  # one row: the slice's own plane
    masks = figure_masks(layout, {"ground_truth": label}, np.eye(4))
    assert masks["ground_truth"].shape == layout.size and masks["ground_truth"].max() == 1
