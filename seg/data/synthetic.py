"""Synthetic abdominal MRI phantoms in MSD layout: demo data and test data that look like a scan.

Each case is rendered in world coordinates (mm, RAS) and sampled through the case's affine, so an oblique or
flipped (LPS-like) affine gives a rotated voxel grid over the same upright anatomy, as a real oblique
acquisition does. A case has
- a body outline (rounded super-ellipse, wider than deep) with a subcutaneous fat rim and a muscle wall;
- unlabelled structures that give context: spleen, kidneys, vertebral body with cortical rim, paraspinal
  muscles, aorta (flow void), a gas-filled bowel loop, heterogeneous mesenteric tissue;
- label 1 `liver`: a large, clearly visible organ on the patient's right;
- label 2 `lesion`: a focal lesion embedded in the liver, of radius 7-10 mm at the default size (less where
  the liver is thin), 30-40 % darker than it: as dark as the mesentery and muscle around the liver, so that
  intensity alone does not find it and context (and attention) matters, but clear of the liver's texture and
  noise (about 7 % per voxel). Phantom version 1 had 10-15 % contrast (mostly darker, sometimes brighter) and
  3.5-5.5 mm, at the noise level: the demo's small network never learned it in its few CPU minutes
  (held-out lesion Dice 0.00), nor at 25-35 % and 5-8 mm (0.17).
Shapes are ellipsoids deformed by smooth random fields; tissues carry texture; the rendered intensities are
blurred (partial-volume edges), multiplied by a smooth bias field, and get Rician noise (magnitude MRI).

    seg synth --output data/synthetic --cases 12 --test-cases 4 --oblique
    seg synth --output data/thin --size 96 96 16 --spacing 0.8 0.8 4.0           # thin slices, as cardiac MR
    seg synth --output data/ct --modality CT --size 128 128 32 --spacing 0.8 0.8 3   # HU, air at -1000
    seg synth --output data/t1t2 --channels 2                                       # two MR contrasts, 4D files

CT cases are drawn in Hounsfield units with air at -1000 HU around the body, stored as int16 as scanners do; a
two-channel case renders the same anatomy in a T1- and a T2-like contrast.

(About 530 lines: one phantom, its geometry options and its atomic writer; the drawing functions share the
case's random state and coordinate grid.)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import fft, ndimage

from seg.errors import DataError

LABELS = {0: "background", 1: "liver", 2: "lesion"}
GENERATOR = "seg synth"  # dataset.json "generator.tool": marks a folder that `seg synth` may overwrite
PHANTOM_VERSION = 3  # dataset.json "generator.phantom"; 3: the fairer lesion. The demo remakes older datasets.
DEFAULT_SIZE = (64, 64, 48)
DEFAULT_SPACING = (1.5, 1.5, 2.0)

# Mean intensity of each tissue relative to liver (T1-weighted look: fat bright, flow void and gas dark) and
# its texture amplitude (relative std of the multiplicative texture).
_TISSUE = {
    "fat": (1.6, 0.03),
    "muscle": (0.55, 0.05),
    "mesentery": (0.62, 0.12),
    "spleen": (0.85, 0.04),
    "kidney": (0.75, 0.05),
    "renal_medulla": (0.45, 0.05),
    "marrow": (1.2, 0.06),
    "cortical_bone": (0.15, 0.10),
    "aorta": (0.15, 0.10),
    "gas": (0.05, 0.20),
    "liver": (1.0, 0.04),
    "air": (0.0, 0.0),
}
# A second MR contrast (T2-weighted look: fluid and spleen bright, liver dark, lesions bright) for 2-channel data.
_TISSUE_T2 = {**_TISSUE, "fat": (1.3, 0.03), "muscle": (0.5, 0.05), "spleen": (1.7, 0.04), "kidney": (1.6, 0.05),
              "renal_medulla": (2.0, 0.05), "marrow": (0.9, 0.06), "liver": (0.7, 0.04)}
# CT in Hounsfield units (portal-venous look), with air at -1000 HU around the body as a real CT has.
_TISSUE_CT = {
    "fat": (-100.0, 0.15), "muscle": (50.0, 0.10), "mesentery": (20.0, 0.5), "spleen": (110.0, 0.05),
    "kidney": (150.0, 0.05), "renal_medulla": (90.0, 0.05), "marrow": (250.0, 0.10), "cortical_bone": (800.0, 0.10),
    "aorta": (180.0, 0.05), "gas": (-950.0, 0.02), "liver": (100.0, 0.04), "air": (-1000.0, 0.0),
}
# Lesion contrast to the liver: a relative change drawn from (low, high), with a sign: darker than the liver on
# T1 and CT (as most liver lesions), brighter on T2 (phantom version 3; see PHANTOM_VERSION).
_LESION = {"mr": ((0.30, 0.40), -1.0), "t2": ((0.30, 0.40), 1.0), "ct": ((0.30, 0.40), -1.0)}
MODALITIES = ("MRI", "CT")


def make_affine(size, spacing, rng: np.random.Generator | None = None, oblique: bool = False,
                orientation: str = "RAS") -> np.ndarray:
    """Voxel -> world (mm) affine of a case, with the centre of the volume near the world origin.

    Args:
        size: voxels per axis `(X, Y, Z)`.
        spacing: voxel size in mm per axis.
        rng: draws the oblique rotation and the table offset; None gives an exact, centred RAS affine.
        oblique: store the volume LPS-like (first two axes flipped) and rotated 10-25 degrees about a random
            axis, so that readers must honour the affine rather than assume RAS.
        orientation: the world direction of each voxel axis as nibabel axis codes, e.g. "LPS", or "SAR" for a
            volume stored slice axis first (a `(16, 96, 96)` array of 4 mm slices).

    Returns:
        `(4, 4)` float64 affine.
    """
    try:
        ornt = nib.orientations.axcodes2ornt(tuple(orientation.upper()))
    except Exception:  # nibabel raises ValueError or KeyError for codes it does not know
        raise DataError(f"--orientation must be three axis codes such as RAS, LPS or SAR, got '{orientation}'") \
            from None
    if len(ornt) != 3 or np.isnan(ornt).any() or len(set(ornt[:, 0].tolist())) != 3:
        raise DataError(f"--orientation must name each of the three world axes once, got '{orientation}'")
    axes = np.zeros((3, 3))
    for voxel_axis, (world_axis, flip) in enumerate(ornt):
        axes[int(world_axis), voxel_axis] = flip
    linear = axes @ np.diag(np.asarray(spacing, dtype=np.float64))
    if oblique:
        if rng is None:
            rng = np.random.default_rng(0)
        axis = rng.normal(size=3)
        axis /= np.linalg.norm(axis)
        angle = np.deg2rad(rng.uniform(10.0, 25.0)) * rng.choice([-1.0, 1.0])
        linear = _rotation(axis, angle) @ np.diag([-1.0, -1.0, 1.0]) @ linear
    centre = (np.asarray(size, dtype=np.float64) - 1) / 2
    offset = np.zeros(3) if rng is None else rng.normal(0.0, 10.0, size=3)  # where the table put the patient
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = offset - linear @ centre
    return affine


def make_case(size=DEFAULT_SIZE, spacing=DEFAULT_SPACING, rng: np.random.Generator | None = None,
              affine: np.ndarray | None = None, modality: str = "MRI",
              channels: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Render one phantom scan and its label map.

    Args:
        size: voxels per axis `(X, Y, Z)`; at least 8 each.
        spacing: voxel size in mm; ignored for geometry when `affine` is given (its columns carry it).
        rng: the random source; the same generator state gives the same case.
        affine: voxel -> world affine from `make_affine`; default an upright RAS grid.
        modality: "MRI" (magnitude MR, zero air) or "CT" (Hounsfield units, air at -1000, int16 as scanners store).
        channels: MRI only: 1 (T1-like) or 2 (T1-like and T2-like contrasts of the same anatomy).

    Returns:
        `image` `(X, Y, Z)` (float32 MR units >= 0, or int16 HU), `(X, Y, Z, 2)` for two channels, and `label`
        uint8 `(X, Y, Z)` with values in `LABELS` (0 background, 1 liver, 2 lesion; both always present).
    """
    if modality not in MODALITIES:
        raise DataError(f"--modality must be one of {', '.join(MODALITIES)}, got '{modality}'")
    if channels not in (1, 2) or (channels == 2 and modality != "MRI"):
        raise DataError(f"--channels must be 1, or 2 for MRI (T1 + T2), got {channels} for {modality}")
    size = tuple(int(s) for s in size)
    rng = np.random.default_rng(0) if rng is None else rng
    if affine is None:
        affine = make_affine(size, spacing)
    linear = affine[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)  # voxel size along each array axis, in mm
    # World coordinates relative to the volume centre: the anatomy is drawn upright in RAS whatever the grid.
    grid = np.indices(size, dtype=np.float32) - ((np.asarray(size, dtype=np.float32) - 1) / 2)[:, None, None, None]
    world = np.tensordot(linear.astype(np.float32), grid, axes=1)
    del grid
    if modality == "CT":
        mean, texture, label = _anatomy(world, spacing, rng, _TISSUE_CT, _LESION["ct"])
        return _acquire_ct(mean, texture, spacing, rng), label
    start = rng.bit_generator.state  # the second contrast redraws the same anatomy from the same state
    mean, texture, label = _anatomy(world, spacing, rng, _TISSUE, _LESION["mr"])
    images = [_acquire(mean, texture, spacing, rng)]
    if channels == 2:
        again = np.random.Generator(type(rng.bit_generator)())
        again.bit_generator.state = start
        mean, texture, _ = _anatomy(world, spacing, again, _TISSUE_T2, _LESION["t2"])
        images.append(_acquire(mean, texture, spacing, rng))
    return (images[0] if channels == 1 else np.stack(images, axis=-1)), label


def _anatomy(world: np.ndarray, spacing: np.ndarray, rng: np.random.Generator, tissues: dict = _TISSUE,
             lesion_contrast=_LESION["mr"]):
    """Tissue maps of one abdomen sampled at `world` `(3, X, Y, Z)` mm (relative to the volume centre).

    `tissues` gives each tissue's (mean, texture amplitude); `lesion_contrast` ((low, high), sign) the lesion's
    relative contrast to the liver. The random draws do not depend on either, so the same generator state gives
    the same anatomy in every contrast.

    Returns:
        `mean` (tissue intensity relative to liver), `texture` (its texture amplitude), both float32, and the
        uint8 `label`, each `(X, Y, Z)`.
    """
    size = world.shape[1:]
    half = np.asarray(size) * spacing / 2  # half field of view, mm
    a, b = rng.uniform(0.80, 0.92) * half[0], rng.uniform(0.66, 0.80) * half[1]  # body semi-axes (R-L, A-P)
    hz = half[2]
    shapes = [_smooth_noise(size, spacing, rng, 0.25 * min(a, b)) for _ in range(3)]

    def deform():  # a different smooth boundary wobble per structure, from three shared fields
        weights = rng.normal(size=3)
        weights = (weights / np.linalg.norm(weights)).astype(np.float32)
        return weights[0] * shapes[0] + weights[1] * shapes[1] + weights[2] * shapes[2]

    def level(centre, axes, amplitude=0.12, spin=20.0):
        """Level set (< 1 inside) of a deformed ellipsoid turned about the body axis; centre and axes in units
        of (a, b, hz)."""
        scale = np.array([a, b, hz])
        cx, cy, cz = (np.asarray(centre) + rng.normal(0.0, 0.04, 3)) * scale
        ax, ay, az = np.asarray(axes) * scale * rng.uniform(0.85, 1.15, 3)
        angle = np.deg2rad(rng.uniform(-spin, spin))
        dx, dy = world[0] - np.float32(cx), world[1] - np.float32(cy)
        u = (np.float32(np.cos(angle)) * dx + np.float32(np.sin(angle)) * dy) / np.float32(ax)
        v = (np.float32(np.cos(angle)) * dy - np.float32(np.sin(angle)) * dx) / np.float32(ay)
        w = (world[2] - np.float32(cz)) / np.float32(az)
        return np.sqrt(u * u + v * v + w * w) + np.float32(amplitude) * deform()

    def blob(*args):
        return level(*args) < 1.0

    # Body: a rounded super-ellipse in the axial plane, slightly narrower away from the centre slice.
    p = rng.uniform(2.2, 2.8)
    taper = 1.0 - 0.08 * (world[2] / hz) ** 2
    r_body = ((np.abs(world[0] / (a * taper)) ** p + np.abs(world[1] / (b * taper)) ** p) ** (1 / p)
              + 0.03 * deform())
    # Rims in units of the body radius, capped so that a small test volume still has an inside.
    fat_rim = min(rng.uniform(3.0, 8.0) / min(a, b), 0.12)
    wall = min(rng.uniform(2.5, 5.0) / min(a, b), 0.08)
    mean = np.full(size, tissues["air"][0], np.float32)  # tissue mean intensity
    texture = np.zeros(size, np.float32)  # tissue texture amplitude

    def paint(mask, tissue, jitter=True):
        value, amplitude = tissues[tissue]
        mean[mask] = value * (rng.uniform(0.93, 1.07) if jitter else 1.0)  # tissues vary between scans
        texture[mask] = amplitude

    paint(r_body < 1.0, "fat")
    paint(r_body < 1.0 - fat_rim, "muscle")
    inside = r_body < 1.0 - fat_rim - wall
    paint(inside, "mesentery")
    del taper

    for side in (-1, 1):
        paint(blob([0.22 * side, -0.76, 0], [0.16, 0.13, 1e6], 0.05, 10) & inside, "muscle")  # paraspinal
        kidney = level([0.42 * side, -0.52, -0.15], [0.13, 0.17, 0.35], 0.05)
        paint((kidney < 1.0) & inside, "kidney")
        paint((kidney < 0.6) & inside, "renal_medulla")
    spine = blob([0.0, -0.62, 0.0], [0.14, 0.12, 1e6], 0.03, 5) & inside
    paint(spine, "cortical_bone")
    paint(ndimage.binary_erosion(spine), "marrow")
    paint(blob([-0.06, -0.40, 0.0], [0.055, 0.055, 1e6], 0.02, 0) & inside, "aorta")
    paint(blob([-0.58, -0.22, 0.25], [0.2, 0.26, 0.35]) & inside, "spleen")
    paint(blob([-0.25, 0.45, 0.0], [0.16, 0.10, 0.30], 0.2) & inside, "gas")  # bowel loop with air

    liver_axes = np.array([0.46, 0.56, 0.7])
    liver_level = level([0.36, 0.02, 0.12], liver_axes, 0.12)
    liver = (liver_level < 1.0) & inside
    if not liver.any():  # cannot happen with the proportions above; keeps label 1 guaranteed regardless
        liver = blob([0.36, 0.0, 0.0], liver_axes, 0.0)
    del world, shapes
    # Depth below the liver surface in mm, roughly: the level sets fall by 1 over the smallest half-axis; the
    # liver is also cut by the abdominal wall and the edges of the field of view.
    depth = np.minimum((1.0 - liver_level) * float(np.min(liver_axes * [a, b, hz])),
                       (1.0 - fat_rim - wall - r_body) * min(a, b))
    for axis, n in enumerate(size):
        edge = np.minimum(np.arange(n), np.arange(n)[::-1]) * np.float32(spacing[axis])
        depth = np.minimum(depth, edge.reshape([-1 if k == axis else 1 for k in range(3)]))
    depth[~liver] = 0.0
    del liver_level, r_body
    lesion = _lesion(liver, depth, spacing, min(a, b), rng)
    paint(liver, "liver", jitter=False)
    (low, high), sign = lesion_contrast
    mean[lesion] = tissues["liver"][0] * (1.0 + sign * rng.uniform(low, high))
    texture[lesion] = tissues["liver"][1] * 1.25
    label = np.zeros(size, np.uint8)
    label[liver] = 1
    label[lesion] = 2
    return mean, texture, label


def _acquire(mean: np.ndarray, texture: np.ndarray, spacing: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """What the scanner makes of the tissue maps: texture, partial-volume blur, bias field, Rician noise."""
    size = mean.shape
    fine = _smooth_noise(size, spacing, rng, 1.5)
    coarse = _smooth_noise(size, spacing, rng, 4.0)
    image = mean * (1.0 + texture * (0.6 * fine + 0.8 * coarse))
    del mean, texture, fine, coarse
    image = ndimage.gaussian_filter(image, sigma=0.6, truncate=3.0)  # partial-volume edges
    scale = 600.0 * np.exp(rng.uniform(np.log(0.5), np.log(2.0)))  # scanners scale intensities freely
    image *= _bias_field(size, rng) * np.float32(scale)
    # Magnitude of complex Gaussian noise: Rician, Rayleigh in the air around the body.
    sigma = rng.uniform(0.02, 0.04) * scale
    real = image + rng.normal(0.0, sigma, size).astype(np.float32)
    imag = rng.normal(0.0, sigma, size).astype(np.float32)
    return np.sqrt(real * real + imag * imag)


def _acquire_ct(mean: np.ndarray, texture: np.ndarray, spacing: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """What a CT scanner makes of the tissue maps (HU): texture, partial-volume blur, Gaussian quantum noise.

    Stored as int16 HU clipped to the scanner's range [-1024, 3071], as CT series are.
    """
    size = mean.shape
    fine = _smooth_noise(size, spacing, rng, 1.5)
    coarse = _smooth_noise(size, spacing, rng, 4.0)
    # texture relative to a tissue's distance from water, at least 40 HU, so water-like tissue has texture too
    image = mean + texture * np.maximum(np.abs(mean), 40.0) * (0.6 * fine + 0.8 * coarse)
    del mean, texture, fine, coarse
    image = ndimage.gaussian_filter(image, sigma=0.6, truncate=3.0)
    image += rng.normal(0.0, rng.uniform(8.0, 15.0), size).astype(np.float32)
    return np.clip(np.rint(image), -1024, 3071).astype(np.int16)


def _lesion(liver: np.ndarray, depth: np.ndarray, spacing: np.ndarray, body_size: float,
            rng: np.random.Generator) -> np.ndarray:
    """A small deformed ellipsoid inside the liver, away from its edge where the liver is thick enough.

    `depth` is an estimate of the distance below the liver surface in mm (0 outside); an exact distance
    transform cost more than the rest of the case.
    """
    radius = max(rng.uniform(0.20, 0.28) * body_size, 1.6 * float(spacing.max()))
    deep = np.flatnonzero(depth >= radius + spacing.max())
    if deep.size == 0:  # thin liver: put it at the deepest point and make it fit
        deep = np.array([int(np.argmax(depth))])
        radius = max(float(depth.flat[deep[0]]) - 0.5 * spacing.min(), 0.5 * spacing.min())
    centre = np.array(np.unravel_index(rng.choice(deep), liver.shape))
    # A box around the centre is enough: the lesion is a few voxels across.
    reach = np.ceil(1.5 * radius / spacing).astype(int) + 1
    lo, hi = np.maximum(centre - reach, 0), np.minimum(centre + reach + 1, liver.shape)
    box = tuple(slice(l, h) for l, h in zip(lo, hi))
    offsets = [(np.arange(l, h) - c) * s for l, h, c, s in zip(lo, hi, centre, spacing)]
    axes = radius * rng.uniform(0.8, 1.25, 3)
    r = sum((o / ax)[tuple(slice(None) if i == k else None for k in range(3))] ** 2
            for i, (o, ax) in enumerate(zip(offsets, axes)))
    wobble = 0.15 * rng.normal(size=r.shape)
    r = np.sqrt(r) + ndimage.gaussian_filter(wobble, 1.0)
    lesion = np.zeros_like(liver)
    lesion[box] = (r < 1.0) & liver[box]
    lesion[tuple(centre)] = True
    return lesion


def _smooth_noise(size, spacing, rng: np.random.Generator, correlation_mm: float) -> np.ndarray:
    """Gaussian random field with unit std and a correlation length in mm (isotropic in mm, not voxels).

    Filtered in the Fourier domain: one FFT pair whatever the correlation length, which is what keeps a large
    smoothing kernel cheap. The field is periodic, which does not matter for shape and texture noise.
    """
    white = rng.standard_normal(size, dtype=np.float32)
    spectrum = fft.rfftn(white)
    sigma_vox = correlation_mm / np.asarray(spacing, dtype=np.float64)
    gain = np.ones((1, 1, 1), np.float32)
    for axis, n in enumerate(size):
        freq = fft.rfftfreq(n) if axis == 2 else fft.fftfreq(n)
        shape = [1, 1, 1]
        shape[axis] = freq.size
        gain = gain * np.exp(-2 * (np.pi * freq * sigma_vox[axis]) ** 2).astype(np.float32).reshape(shape)
    field = fft.irfftn(spectrum * gain, s=size).astype(np.float32)
    return (field - field.mean()) / (field.std() + 1e-8)


def _bias_field(size, rng: np.random.Generator) -> np.ndarray:
    """Smooth multiplicative bias: exp of a random quadratic polynomial, about +-20 % across the volume."""
    coords = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in size], indexing="ij", sparse=True)
    x, y, z = coords
    terms = [x, y, z, x * x, y * y, z * z, x * y, x * z, y * z]
    coeffs = rng.normal(0.0, 0.07, len(terms))
    return np.exp(sum(c * t for c, t in zip(coeffs, terms))).astype(np.float32)


def _rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    """3x3 rotation matrix about a unit axis (Rodrigues)."""
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    image = nib.Nifti1Image(array, affine)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)  # scanner coordinates, in both forms so every reader agrees
    image.set_sform(affine, code=1)
    nib.save(image, path)


def _is_synth_dataset(folder: Path) -> bool:
    try:
        meta = json.loads((folder / "dataset.json").read_text())
        return isinstance(meta, dict) and isinstance(meta.get("generator"), dict) and \
            meta["generator"].get("tool") == GENERATOR
    except (OSError, ValueError):
        return False


def write_dataset(output, cases: int = 12, test_cases: int = 0, size=DEFAULT_SIZE, spacing=DEFAULT_SPACING,
                  oblique: bool = False, seed: int = 0, progress: bool = False, modality: str = "MRI",
                  channels: int = 1, orientation: str = "RAS") -> Path:
    """Write a synthetic dataset in MSD layout, all at once or not at all.

    Files are written to a hidden folder beside `output` and renamed into place at the end, so an interrupted
    run leaves no half-written dataset. A previous `seg synth` dataset at `output` is replaced; any other
    non-empty folder is refused.

    Args:
        output: dataset folder to create.
        cases: training cases (`imagesTr/`, `labelsTr/`).
        test_cases: held-out cases (`imagesTs/`, with their labels in `labelsTs/` for scoring).
        size: voxels per axis `(X, Y, Z)`.
        spacing: voxel size in mm.
        oblique: rotated, LPS-like affines (see `make_affine`).
        seed: case `i` depends only on `(seed, i)`, so adding cases keeps the earlier ones.
        progress: show a progress bar on stderr (only when stderr is a terminal).
        modality: "MRI" or "CT" (HU, int16, air at -1000; see `make_case`).
        channels: 1, or 2 for MRI (T1- and T2-like, one 4D file per case as MSD stores multi-modal scans).
        orientation: voxel axis codes of every case (see `make_affine`), before any `oblique` rotation.

    Returns:
        The dataset folder.
    """
    output = Path(output)
    size = tuple(int(s) for s in size)
    spacing = tuple(float(s) for s in spacing)
    if cases < 1 or test_cases < 0:
        raise DataError(f"need at least 1 training case and no negative test cases, got {cases} and {test_cases}",
                        output)
    if len(size) != 3 or min(size) < 8:
        raise DataError(f"--size needs 3 values of at least 8 voxels, got {size}", output)
    if len(spacing) != 3 or not all(np.isfinite(spacing)) or min(spacing) <= 0:
        raise DataError(f"--spacing needs 3 positive values in mm, got {spacing}", output)
    if seed < 0:
        raise DataError(f"--seed must be >= 0, got {seed}", output)
    make_affine(size, spacing, orientation=orientation)  # refuses unknown axis codes before anything is written
    if modality not in MODALITIES or channels not in (1, 2) or (channels == 2 and modality != "MRI"):
        raise DataError(f"--modality {modality} with --channels {channels}: use MRI or CT, and 2 channels with MRI "
                        "only", output)
    if output.exists():
        if not output.is_dir():
            raise DataError("exists and is not a folder; choose another --output", output)
        if any(output.iterdir()) and not _is_synth_dataset(output):
            raise DataError("folder is not empty and was not written by `seg synth`; choose another --output",
                            output)
    output.parent.mkdir(parents=True, exist_ok=True)

    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it 0700; the dataset should be as readable as any folder
    try:
        ids = [f"synth_{i:03d}" for i in range(cases + test_cases)]
        for sub in ("imagesTr", "labelsTr") + (("imagesTs", "labelsTs") if test_cases else ()):
            (staging / sub).mkdir()
        for i in _progress(range(len(ids)), progress, "synth"):
            rng = np.random.default_rng([seed, i])
            affine = make_affine(size, spacing, rng, oblique, orientation)
            image, label = make_case(size, spacing, rng, affine, modality, channels)
            split = "Tr" if i < cases else "Ts"
            _save_nifti(image, affine, staging / f"images{split}" / f"{ids[i]}.nii.gz")
            _save_nifti(label, affine, staging / f"labels{split}" / f"{ids[i]}.nii.gz")
        kind = {("CT", 1): "CT (HU, int16) phantoms with air at -1000 HU: liver (1) and a small liver lesion "
                           "(2) with 30-40 % contrast to the liver",
                ("MRI", 1): "T1-weighted-like abdominal MRI phantoms: liver (1) and a small liver lesion (2) with "
                            "30-40 % contrast to the liver",
                ("MRI", 2): "two-channel (T1-like, T2-like; 4D files) abdominal MRI phantoms: liver (1) and a small "
                            "liver lesion (2)"}[modality, channels]
        meta = {
            "name": "SynthAbdomen",
            "description": f"Synthetic {kind}. Test cases are in imagesTs/ with their labels in labelsTs/. For demos "
                           "and tests, not for clinical use.",
            "reference": "generated by `seg synth`",
            "licence": "CC0 1.0 (generated data)",
            "tensorImageSize": "3D",
            "modality": {"0": "CT"} if modality == "CT" else {"0": "MRI"} if channels == 1 else {"0": "T1",
                                                                                                "1": "T2"},
            "labels": {str(k): v for k, v in LABELS.items()},
            "numTraining": cases,
            "numTest": test_cases,
            "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in ids[:cases]],
            "test": [f"./imagesTs/{c}.nii.gz" for c in ids[cases:]],
            "generator": {"tool": GENERATOR, "phantom": PHANTOM_VERSION, "seed": seed, "size": list(size),
                          "spacing": list(spacing), "oblique": oblique, "orientation": orientation.upper(),
                          "modality": modality, "channels": channels},
        }
        (staging / "dataset.json").write_text(json.dumps(meta, indent=1) + "\n")
        _swap_into_place(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output


def _swap_into_place(staging: Path, output: Path) -> None:
    """Rename the finished folder to `output`, moving a previous dataset aside first and deleting it after."""
    old = None
    if output.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".old", dir=output.parent))
        os.rename(output, old / output.name)
    os.rename(staging, output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _progress(items, enabled: bool, description: str):
    """Iterate with a rich progress bar on stderr when asked and stderr is a terminal (never in CI logs)."""
    if not (enabled and sys.stderr.isatty()):
        yield from items
        return
    from rich.console import Console
    from rich.progress import track

    yield from track(items, description=description, console=Console(stderr=True), transient=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", required=True, type=Path, help="dataset folder to write (MSD layout)")
    parser.add_argument("--cases", type=int, default=12, help="training cases (default 12)")
    parser.add_argument("--test-cases", type=int, default=0, help="held-out cases in imagesTs/ (default 0)")
    parser.add_argument("--size", type=int, nargs=3, default=list(DEFAULT_SIZE), metavar=("X", "Y", "Z"),
                        help="voxels per axis (default 64 64 48)")
    parser.add_argument("--spacing", type=float, nargs=3, default=list(DEFAULT_SPACING),
                        metavar=("SX", "SY", "SZ"), help="voxel size in mm (default 1.5 1.5 2.0)")
    parser.add_argument("--oblique", action="store_true",
                        help="rotated, LPS-like affines (tests that readers honour the affine)")
    parser.add_argument("--orientation", default="RAS",
                        help="world direction of the voxel axes as axis codes: RAS (default), LPS, or SAR for a "
                             "volume stored thick axis first (--size 16 96 96 --spacing 4 0.8 0.8)")
    parser.add_argument("--modality", choices=MODALITIES, default="MRI",
                        help="MRI (default; zero air) or CT (Hounsfield units, int16, air at -1000 HU)")
    parser.add_argument("--channels", type=int, choices=(1, 2), default=1,
                        help="image channels: 1, or 2 (T1- and T2-like MRI of the same anatomy, 4D files)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def run(args: argparse.Namespace) -> int:
    output = write_dataset(args.output, args.cases, args.test_cases, args.size, args.spacing, args.oblique,
                           args.seed, progress=True, modality=args.modality, channels=args.channels,
                           orientation=args.orientation)
    shape = "x".join(map(str, args.size))
    spacing = "x".join(f"{s:g}" for s in args.spacing)
    extras = [args.modality] + ([f"{args.channels} channels"] if args.channels > 1 else [])
    extras += [args.orientation.upper()] if args.orientation.upper() != "RAS" else []
    extras += ["oblique"] if args.oblique else []
    print(f"wrote {args.cases} training + {args.test_cases} test cases ({shape} voxels, {spacing} mm, "
          f"{', '.join(extras)}) to {output}")
    return 0
