"""The overlay figure on every shape: each view indexes its own axis, degenerate views are left out."""

from __future__ import annotations

import matplotlib.image
import numpy as np
import pytest

from seg.figure import CT_WINDOW, PLANE_AXIS, drawable_planes, grey_window, render_overlay, slice_indices, to_ras, view
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
    # at most 3.1 in per row (the views in proportion, mm for mm) plus title and legend, at 40 dpi
    assert 40 * 1.0 < height <= 40 * (3.1 * rows + 1.3) + 2
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


def _rows(layout, columns: int) -> list[tuple[int, int, int, int]]:
    """The first column's panel of every row: (top, left, bottom, right) in pixels."""
    return [box for _, _, box in layout.panels[::columns]]


def test_views_are_drawn_in_proportion_to_their_mm_without_wide_gaps(tmp_path):
    shape, spacing, dpi = (512, 512, 30), (0.7, 0.7, 5.0), 40  # 358 x 358 x 150 mm: a CT slab
    rng = np.random.default_rng(0)
    image = rng.normal(40, 20, shape).astype(np.float32)
    label = _volume(shape, [s * 0.5 for s in shape])
    layout = render_overlay(tmp_path / "o.png", image, {"gate_0": rng.uniform(size=shape).astype(np.float32)},
                            np.diag([*spacing, 1.0]), prediction=label, dpi=dpi)
    axial, coronal, sagittal = _rows(layout, 2)
    height = [b[2] - b[0] for b in (axial, coronal, sagittal)]
    assert height[1] / height[0] == pytest.approx(150 / 358, rel=0.05)  # the coronal row is as thin as the CT
    assert height[2] == pytest.approx(height[1], abs=1)
    # rows follow each other closely: no square cells around thin strips
    assert coronal[0] - axial[2] <= 0.15 * dpi + 2 and sagittal[0] - coronal[2] <= 0.15 * dpi + 2
    panels = sum(height) + 0.25 * dpi * 2
    assert panels / layout.size[0] > 0.6


def test_preview_without_maps_has_its_views_in_one_row_and_no_colour_bar(tmp_path):
    shape = (122, 101, 30)
    image = np.random.default_rng(0).normal(40, 20, shape).astype(np.float32)
    label = _volume(shape, [s * 0.5 for s in shape])
    layout = render_overlay(tmp_path / "p.png", image, {}, np.diag([1.5, 1.5, 3.0, 1.0]), prediction=label,
                            class_names=["liver"], dpi=60)
    boxes = [box for _, _, box in layout.panels]
    assert [plane for plane, _, _ in layout.panels] == ["axial", "coronal", "sagittal"]
    assert max(box[0] for box in boxes) < min(box[2] for box in boxes)  # one row
    assert [box[1] for box in boxes] == sorted(box[1] for box in boxes)
    assert layout.size[1] - max(box[3] for box in boxes) <= 0.2 * 60  # nothing right of the views: no colour bar
    assert layout.size == matplotlib.image.imread(tmp_path / "p.png").shape[:2]


def test_grey_window_ct_soft_tissue_and_mr_percentiles_inside_the_body():
    rng = np.random.default_rng(0)
    ct = np.full((40, 40, 10), -1000.0, np.float32)
    ct[10:30, 10:30] = rng.normal(50, 30, (20, 20, 10))
    ct[18:22, 18:22] = 1200  # bone
    assert grey_window(ct) == CT_WINDOW == (-160.0, 240.0)  # HU from the values alone (a CT through an MR model)
    assert grey_window(ct[10:30, 10:30], modality="CT") == CT_WINDOW  # no air in view: the checkpoint says CT
    mr = rng.uniform(0, 15, (40, 40, 10)).astype(np.float32)  # background noise, not zero
    mr[10:30, 10:30] = rng.normal(600, 50, (20, 20, 10))
    low, high = grey_window(mr)
    assert 400 < low < 600 < high < 800  # the tissue's range, not the noise's
    normalised = rng.normal(0, 1, (20, 20, 5)).astype(np.float32)  # a training callback's z-scored scan
    assert grey_window(normalised, modality="CT")[0] == pytest.approx(np.percentile(normalised, 1), rel=0.1)
