"""The overlay figure: a scan with its gate heatmaps and the ground-truth and predicted contours, in three views.

A drawing utility below every package, as `seg.io` is: where the network looks (`seg.explain`) draws its gate
overlays with it, and `seg predict --preview` (`seg.inference`) its previews, without importing upwards.

Volumes come in the scan's own voxel grid with its affine; they are turned to the closest RAS orientation and
shown the way a radiologist reads them: patient's right on the viewer's left, anterior (axial) or superior
(coronal, sagittal) at the top, pixels in mm so the aspect ratio is true.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import nibabel as nib
import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from seg.io import atomic_path

GATE_CMAP = "inferno"  # dark for "not looked at", so the scan stays readable under low gates
GATE_ALPHA = 0.45
TRUTH_COLOUR = "#00e5ff"  # cyan and lime: both stand out on grey and on inferno's purples and oranges
PREDICTION_COLOUR = "#7CFC00"
CLASS_STYLES = ("solid", (0, (2.5, 1.5)), (0, (1, 1)), (0, (3, 1, 1, 1)))  # short dashes: small lesions show them
VIEWS = ("axial", "coronal", "sagittal")
PANEL_INCHES = 3.1  # the largest view's size across; the others in proportion (mm for mm)
MIN_PANEL_INCHES = 0.4  # a view thinner than this (a few slices) is stretched box-wise, its aspect kept
# Edge letters of each view: left, right, top, bottom.
_EDGES = {"axial": "RLAP", "coronal": "RLSI", "sagittal": "APSI"}


def to_ras(volume: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`volume` (X, Y, Z) reoriented to the closest RAS axes (no resampling) and its voxel size in mm."""
    ornt = nib.orientations.io_orientation(affine)
    spacing = np.empty(3)
    spacing[ornt[:, 0].astype(int)] = nib.affines.voxel_sizes(affine)
    return nib.orientations.apply_orientation(volume, ornt), spacing


# The RAS axis each view cuts across: sagittal slices are taken along R (x), coronal along A (y), axial along S (z).
PLANE_AXIS = {"sagittal": 0, "coronal": 1, "axial": 2}


def view(volume: np.ndarray, plane: str, index: int) -> np.ndarray:
    """A 2D slice of a RAS volume as displayed: rows top to bottom, columns left to right (radiological).

    `index` counts along the plane's own axis (`PLANE_AXIS`) and is clipped to it: only that axis is indexed, so
    a 16-slice volume with 96 x 96 voxels in-plane never sees an in-plane index along its slice axis.
    """
    axis = PLANE_AXIS[plane]
    cut = np.take(volume, int(np.clip(index, 0, volume.shape[axis] - 1)), axis=axis)
    return cut.T[::-1, ::-1]


def drawable_planes(shape: Sequence[int]) -> tuple[str, ...]:
    """The views of a RAS volume of `shape` that are images (at least 2 x 2 pixels), in `VIEWS` order.

    A single slice has one (its own plane); a volume two voxels thick or more has all three. When no view is
    2 x 2 (a line of voxels), every view is drawn as it is.
    """
    planes = tuple(p for p in VIEWS if min(s for a, s in enumerate(shape) if a != PLANE_AXIS[p]) >= 2)
    return planes or VIEWS


def _view_mm(shape: Sequence[int], spacing: Sequence[float], plane: str) -> tuple[float, float]:
    """(height, width) in mm of `view` of a RAS volume of `shape`."""
    rows_mm, cols_mm = view_spacing(spacing, plane)
    others = [shape[a] for a in range(3) if a != PLANE_AXIS[plane]]  # `view` transposes: rows are the later axis
    return others[1] * rows_mm, others[0] * cols_mm


def view_spacing(spacing: Sequence[float], plane: str) -> tuple[float, float]:
    """(row, column) pixel size in mm of `view`."""
    sx, sy, sz = spacing
    return {"axial": (sy, sx), "coronal": (sz, sx), "sagittal": (sz, sy)}[plane]


def slice_indices(target: np.ndarray | None, fallback: np.ndarray | None = None) -> tuple[int, int, int]:
    """(sagittal, coronal, axial) indices of a RAS volume through the target.

    The target's centre of mass, so the three views cross there; along an axis where that slice misses a
    concave target, the slice holding most of it. Without a target: the fallback's maximum, else the centre.
    """
    shape = (target if target is not None else fallback).shape
    if target is not None and target.any():
        mask = target != 0
        centre = [int(round(c)) for c in np.argwhere(mask).mean(0)]
        for axis in range(3):
            others = tuple(a for a in range(3) if a != axis)
            area = mask.sum(axis=others)
            if area[centre[axis]] == 0:
                centre[axis] = int(area.argmax())
        return tuple(centre)
    if fallback is not None and np.ptp(fallback) > 0:
        return tuple(int(i) for i in np.unravel_index(np.argmax(fallback), shape))
    return tuple(s // 2 for s in shape)


# CT's soft-tissue window (width 400 HU, level 40): fat dark grey, organs and muscle mid grey, bone and contrast white.
CT_WINDOW = (40.0 - 200.0, 40.0 + 200.0)


def looks_like_hu(image: np.ndarray) -> bool:
    """True for a CT in Hounsfield units: air (-1000) fills at least 1 % of it; nothing else goes that low."""
    return image.size > 0 and float(np.percentile(image, 1)) <= -800.0


def grey_window(image: np.ndarray, modality: str | None = None) -> tuple[float, float]:
    """Display window (low, high) of a scan in its own units.

    CT (`modality` "CT" with values spanning HU, or any scan whose values look like HU, e.g. a CT through an MR model):
    the soft-tissue window `CT_WINDOW`. Anything else (MR, or a normalised scan): the 1st to 99th percentile
    inside the body, so the air does not set the scale: the nonzero voxels, and of a magnitude image (no negative
    values) only those above 5 % of its bright end (an MR's background noise is not zero).
    """
    # a CT's values span hundreds of HU; a normalised one (a training callback's) a few units: percentiles then
    ct = (modality or "").upper() == "CT" and image.size and float(np.ptp(image)) > 100
    if image.size and (ct or looks_like_hu(image)):
        return CT_WINDOW
    values = image[image != 0] if np.any(image != 0) else image.ravel()
    if values.size and float(values.min()) >= 0:
        body = values[values > 0.05 * np.percentile(values, 99)]
        values = body if body.size else values
    low, high = np.percentile(values, [1, 99]) if values.size else (0.0, 1.0)
    return float(low), float(high if high > low else low + 1)


@dataclass
class FigureLayout:
    """Where each panel of an overlay PNG lies, so that label maps can be drawn to match it pixel for pixel.

    Attributes:
        size: the PNG's `(height, width)` in pixels.
        panels: one `(plane, slice index, (top, left, bottom, right))` per panel, in PNG pixels (bottom and right
            exclusive), for every view and column.
    """

    size: tuple[int, int]
    panels: list[tuple[str, int, tuple[int, int, int, int]]] = field(default_factory=list)


def figure_masks(layout: FigureLayout, masks: Mapping[str, np.ndarray | None],
                 affine: np.ndarray) -> dict[str, np.ndarray]:
    """Class-index images `(height, width)` uint8 of the overlay PNG's size: each mask's slice in every panel.

    For W&B, which draws toggleable masks over an image of the same size: the ground truth and prediction of the
    whole figure, every view and every gate level. Outside the panels: 0. Slices are scaled to the panels by
    nearest neighbour, as `render_overlay` shows the scan.
    """
    out = {}
    for name, mask in masks.items():
        if mask is None:
            continue
        ras = to_ras(mask, affine)[0]
        image = np.zeros(layout.size, np.uint8)
        for plane, index, (top, left, bottom, right) in layout.panels:
            cut = view(ras, plane, index)
            rows = ((np.arange(bottom - top) + 0.5) * cut.shape[0] / (bottom - top)).astype(int)
            cols = ((np.arange(right - left) + 0.5) * cut.shape[1] / (right - left)).astype(int)
            image[top:bottom, left:right] = cut[rows][:, cols]
        out[name] = image
    return out


def render_overlay(
    path: str | os.PathLike,
    image: np.ndarray,
    maps: Mapping[str, np.ndarray],
    affine: np.ndarray,
    label: np.ndarray | None = None,
    prediction: np.ndarray | None = None,
    class_names: Sequence[str] = (),
    title: str = "",
    map_titles: Mapping[str, str] | None = None,
    image_title: str = "scan",
    dpi: int = 110,
    modality: str | None = None,
) -> FigureLayout:
    """Write the overlay PNG atomically: rows axial / coronal / sagittal, one column per map.

    Args:
        path: the PNG to write.
        image: the scan `(X, Y, Z)` (one channel), any intensity scale.
        maps: attention maps `(X, Y, Z)` in [0, 1] by name, in column order.
        affine: voxel -> world (mm) of all volumes.
        label, prediction: class-index volumes `(X, Y, Z)` drawn as contours (either may be None).
        class_names: foreground class names, for the legend (class c is `class_names[c - 1]`).
        title: the figure title (case id, epoch, Dice).
        map_titles: column titles by map name; default the name.
        image_title: title of the first column (the scan alone), e.g. which channel of a multi-channel scan it is.
        dpi: pixels per inch of the PNG.
        modality: the scan's modality ("CT" gives the soft-tissue window, `grey_window`), or None.

    Rows are the views that are images at all (`drawable_planes`): three for a volume, one for a single slice;
    without maps (a preview) the views stand in one row. Every panel is drawn at the same scale in mm, so the
    views keep their true proportions to each other; the gate colour bar is drawn only with maps.

    Returns:
        where the panels lie in the PNG (`figure_masks` draws label maps to match).
    """
    image_ras, spacing = to_ras(image, affine)
    maps_ras = {name: to_ras(m, affine)[0] for name, m in maps.items()}
    label_ras = to_ras(label, affine)[0] if label is not None else None
    prediction_ras = to_ras(prediction, affine)[0] if prediction is not None else None
    target = label_ras if label_ras is not None and label_ras.any() else prediction_ras
    indices = slice_indices(target, next(reversed(maps_ras.values()), None))
    index_of = {plane: indices[axis] for plane, axis in PLANE_AXIS.items()}
    planes = drawable_planes(image_ras.shape)
    low, high = grey_window(image_ras, modality)
    top = max([int(v.max()) for v in (label_ras, prediction_ras) if v is not None and v.size] + [0])
    classes = range(1, top + 1)

    # A first column without heatmap: the anatomy and the contours as they are, to compare the maps against.
    # Without maps (a preview) the views stand side by side, each titled with its slice.
    columns = [("scan", None), *maps_ras.items()]
    if maps_ras:
        grid = [(row, col, plane, name, volume) for row, plane in enumerate(planes)
                for col, (name, volume) in enumerate(columns)]
    else:
        grid = [(0, col, plane, "scan", None) for col, plane in enumerate(planes)]
    sizes = {plane: _view_mm(image_ras.shape, spacing, plane) for plane in planes}  # (height, width) in mm
    n_rows, n_cols = max(g[0] for g in grid) + 1, max(g[1] for g in grid) + 1
    row_mm = [max(sizes[g[2]][0] for g in grid if g[0] == r) for r in range(n_rows)]
    col_mm = [max(sizes[g[2]][1] for g in grid if g[1] == c) for c in range(n_cols)]
    # Every panel at one scale (inches per mm): the largest view is PANEL_INCHES across, the others in proportion,
    # so a 30-slice CT's coronal row is as thin as the CT, not a strip in a square cell with wide gaps around it.
    scale = PANEL_INCHES / max(*row_mm, *col_mm)
    row_in = [max(h * scale, MIN_PANEL_INCHES) for h in row_mm]
    col_in = [max(w * scale, MIN_PANEL_INCHES) for w in col_mm]
    # Fixed margins in inches, not a layout engine: constrained layout drew every figure twice to place it, and
    # the overlays of one validation took most of its time (1.4 s of 1.5 s a hippocampus volume).
    legend_rows = math.ceil(len(classes) * ((label_ras is not None) + (prediction_ras is not None)) / 4)
    left = 0.35 if maps_ras else 0.1  # y-labels (the view names) | the titles say them
    right = 1.05 if maps_ras else 0.1  # the colour bar, only when a map is drawn
    top = 0.65  # title and column titles
    bottom = 0.25 + 0.3 * legend_rows if legend_rows else 0.15  # the legend, four entries a row
    gap_x, gap_y = 0.08, 0.12 if maps_ras else 0.0
    width_in = sum(col_in) + gap_x * (n_cols - 1) + left + right
    height_in = sum(row_in) + gap_y * (n_rows - 1) + top + bottom
    # A bare Figure (Agg canvas), not pyplot: no global backend switch, nothing left open, thread-safe.
    fig = Figure(figsize=(width_in, height_in), dpi=dpi)
    axes = {}
    for row, col, plane, name, volume in grid:
        x0 = left + sum(col_in[:col]) + gap_x * col
        y0 = height_in - top - sum(row_in[: row + 1]) - gap_y * row
        ax = axes[row, col] = fig.add_axes((x0 / width_in, y0 / height_in, col_in[col] / width_in,
                                            row_in[row] / height_in))
        mm_rows, mm_cols = view_spacing(spacing, plane)
        scan = view(image_ras, plane, index_of[plane])
        height, width = scan.shape
        extent = (0, width * mm_cols, height * mm_rows, 0)
        ax.imshow(scan, cmap="gray", vmin=low, vmax=high, extent=extent, interpolation="nearest")
        if volume is not None:
            ax.imshow(np.clip(view(volume, plane, index_of[plane]), 0, 1), cmap=GATE_CMAP, vmin=0, vmax=1,
                      alpha=GATE_ALPHA, extent=extent, interpolation="bilinear")
        for volume_ras, colour in ((label_ras, TRUTH_COLOUR), (prediction_ras, PREDICTION_COLOUR)):
            if volume_ras is None:
                continue
            cut = view(volume_ras, plane, index_of[plane])
            if min(cut.shape) < 2:  # a line of pixels has no contour (matplotlib needs 2 x 2)
                continue
            for c in classes:
                if (cut == c).any():
                    ax.contour(cut == c, levels=[0.5], colors=colour, linewidths=1.4, extent=extent,
                               origin="upper", linestyles=[CLASS_STYLES[(c - 1) % len(CLASS_STYLES)]])
        _orientation_letters(ax, plane)
        ax.set_xticks([])
        ax.set_yticks([])
        if not maps_ras:
            ax.set_title(f"{plane} ({index_of[plane]})", fontsize=10)
            continue
        if row == 0:
            ax.set_title((map_titles or {}).get(name, name) if volume is not None else image_title, fontsize=10)
        if col == 0:
            ax.set_ylabel(f"{plane} ({index_of[plane]})", fontsize=10)
    if maps_ras:
        what = "attention (gate or CBAM map)" if any(n.startswith("cbam") for n in maps_ras) else "gate activation"
        panels_in = height_in - top - bottom
        bar = fig.add_axes(((width_in - right + 0.2) / width_in, (bottom + 0.2 * panels_in) / height_in,
                            0.15 / width_in, 0.6 * panels_in / height_in))
        fig.colorbar(ScalarMappable(norm=Normalize(0, 1), cmap=GATE_CMAP), cax=bar, label=what)
    handles = []
    for c in classes:
        name = class_names[c - 1] if 0 < c <= len(class_names) else f"class {c}"
        style = CLASS_STYLES[(c - 1) % len(CLASS_STYLES)]
        if label_ras is not None:
            handles.append(Line2D([], [], color=TRUTH_COLOUR, linestyle=style, label=f"ground truth: {name}"))
        if prediction_ras is not None:
            handles.append(Line2D([], [], color=PREDICTION_COLOUR, linestyle=style, label=f"prediction: {name}"))
    if handles:
        fig.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 0.02 / height_in),
                   ncol=min(len(handles), 4), fontsize=9, facecolor="0.9")
    fig.suptitle(title, fontsize=11, y=1 - 0.08 / height_in, va="top")
    with atomic_path(path) as tmp:  # the temporary name keeps ".png": matplotlib picks the format by suffix
        fig.savefig(tmp, dpi=dpi)
    # The panels' places as laid out by that save (fixed boxes, equal aspect), in its pixels.
    width, height = fig.canvas.get_width_height()  # Agg's own pixel size (truncated, not rounded)
    layout = FigureLayout((height, width))
    for (row, col, plane, _, _), ax in zip(grid, axes.values()):
        box = ax.get_position()
        layout.panels.append((plane, index_of[plane], (int(round((1 - box.y1) * height)), int(round(box.x0 * width)),
                                                       int(round((1 - box.y0) * height)), int(round(box.x1 * width)))))
    return layout


def _orientation_letters(ax, plane: str) -> None:
    left, right, top, bottom = _EDGES[plane]
    style = {"color": "yellow", "fontsize": 8, "fontweight": "bold", "transform": ax.transAxes}
    ax.text(0.02, 0.5, left, ha="left", va="center", **style)
    ax.text(0.98, 0.5, right, ha="right", va="center", **style)
    ax.text(0.5, 0.98, top, ha="center", va="top", **style)
    ax.text(0.5, 0.02, bottom, ha="center", va="bottom", **style)
