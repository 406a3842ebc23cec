"""`seg plan`: a complete training config derived from a dataset's fingerprint, each value with its reason.

The rules follow nnU-Net's planner where they apply to our network, and say so:

- **Target spacing**: the median spacing. When the data are anisotropic (largest / smallest median spacing > 3),
  the thick axis takes the 10th percentile of its spacings instead (nnU-Net), but never finer than the other
  axes: resampling every scan to the thickest slices would throw away the thin-slice cases' detail.
- **2D or 3D**: 3D unless the thick axis holds fewer than `MIN_3D_SLICES` voxels after resampling (a 3D patch
  could then see no context along it), or, on a CPU, the slices are more than `ANISOTROPY` times thicker than the
  in-plane spacing (ACDC-like cine MR at 5-10 mm: a 2D step is far cheaper and learns more per CPU minute); then
  2D in-plane slices.
- **Patch**: the median resampled scan, shrunk along its longest axis (in mm) until it fits the budget (CPU: a
  step-time budget of voxels per patch; GPU: voxels that fit `--gpu-memory` in bf16), then padded to a multiple
  of the strides as nnU-Net does. A 2D CPU patch is about 128 x 128, not the whole slice: for 1.4x the step cost,
  32 such patches a step learned far more per CPU minute than 8 whole slices (ACDC, 15 minutes: 0.81 against
  0.72 held-out mean Dice, BENCHMARKS.md).
- **Topology**: halve an axis at each level while its feature map stays >= `MIN_FEATURE` voxels and its spacing
  is at most twice the finest axis's (so thin slices are first brought to the in-plane resolution;
  `seg.models.topology.plan_strides`, which `seg fit` also suggests from); widths double per level from 32
  capped at 320 on a GPU (nnU-Net). On a CPU the width grows with the budget: from 32, 24 or 16, the widest that
  still gets `MIN_STEPS_FOR_WIDTH` training steps in the time given (a step costs the width squared).
- **Augmentation**: nnU-Net's strength (`seg.data.augmentation`) and mirroring on every axis when the run gets at
  least `STRONG_AUGMENTATION_STEPS` steps (a GPU run, a long CPU run); light augmentation and no mirroring in a
  short CPU run, where mirroring every axis was measured to cost Dice (`MIRRORING_COST`); there left-right only,
  where that keeps the classes' arrangement (`short_run_mirroring`: hippocampus, not a heart's ventricles).
  Mirroring skips left-right when a label name says a side.
- **Batch** (`batch_shape`): 2 volumes a step (at least 2, for batch statistics), 2 patches each in 3D and 4
  slices each in 2D on a GPU; on a CPU a 2D step takes 8 volumes x 4 small patches. When a 3D patch holds the
  whole median scan, a second patch from one volume would repeat the first: 4 volumes x 1 patch instead
  (`WHOLE_SCAN_BATCH`). A third of the patches are centred on foreground.
- **Normalisation** per channel from `dataset.json`'s modality: CT is clipped to the foreground's 0.5-99.5
  percentiles and scaled by the foreground mean and std; every other channel gets a per-scan z-score.
- **Deep supervision** (auxiliary losses on the coarser decoder levels, nnU-Net's) on a GPU and in 2D on a CPU,
  where it sped learning up (ACDC, 15 minutes: 0.83 against 0.80 held-out mean Dice); off in 3D on a CPU until
  measured there.
- **Precision**: on a GPU bf16 mixed precision; on a CPU bf16 mixed precision when the CPU planning the run has
  native bf16 instructions (`seg.hardware.cpu_bf16_units`: AMX, a step 1.3x faster in 3D and 2.5x in 2D; AVX-512
  BF16, 1.9x and 2.5x), float32 otherwise.
- **Validation**: often enough to pick a good checkpoint, rarely enough to stay about a tenth of the run, from a
  step-time estimate (a constant per voxel measured on this project's 2-core CPU reference machine). Gate
  overlays at the validations, but at most about `MAX_OVERLAY_EXPORTS` sets in a run (a long GPU run would
  otherwise write gigabytes of them).
- **Split by patient**: case ids like `patient001_frame01` (several volumes of one patient) are split by patient.

Every decision is a `Decision` (config key, value, reason); `render_yaml` writes them as a LightningCLI config
with the reason beside each value, and the decisions also travel inside checkpoints (`data.plan`). Each family
above is one rule function (`RULES`: `plan_dims`, `plan_spacing`, ...) that returns its decisions; a rule reads
the dataset's `Facts` and the decisions of the rules before it. (Over 400 lines: each rule stays beside the
constants and the helpers it uses, and the command that writes its decisions.)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from seg import hardware
from seg.data.fingerprint import load_fingerprint
from seg.data.layout import DatasetInfo, load_dataset
from seg.data.preprocessing import channel_schemes
from seg.errors import DataError
from seg.io import write_text
from seg.models.topology import PLANNED_FEATURE_SIZE, plan_strides

MIN_3D_SLICES = 12  # fewer resampled voxels along the thick axis than this: 2D
MIN_FEATURE = PLANNED_FEATURE_SIZE  # the stride rule's smallest feature map edge (seg.models.topology)
ANISOTROPY = 3.0  # nnU-Net's threshold for a thick axis
# Voxels per training patch. CPU: a step of 2 x 2 patches of this size takes about 2 s on two cores with widths
# 16-128 (the hippocampus config, 40 x 56 x 40 = 90k voxels, runs 0.5 steps/s; BENCHMARKS.md). A 2D patch is about
# 128 x 128, 32 of them a step (`batch_shape`): on ACDC in 15 float32 CPU minutes, 32 patches of 128 x 128 a step
# (2.5 s) reached 0.81 held-out mean Dice where 8 whole slices of 224 x 256 a step (1.7 s) reached 0.72: more
# distinct patches a step, more of them on the heart, and the same convolutions (bench/acdc.py, 2026-12-07).
CPU_PATCH_VOXELS = {3: 128_000, 2: 128 * 128}
# GPU: nnU-Net's reference, a 128^3 patch with batch 2 and widths 32-320 in about 10 GB of bf16 training memory.
GPU_VOXELS_PER_GB = {3: 128**3 / 10.0, 2: 1024 * 1024 / 10.0}
# One float32 training step, widths from 16, per voxel of the batch. 3D: 2 s for 4 hippocampus patches. 2D: the ACDC
# plan's step (32 patches of 128 x 128) took 2.46 s on the 2-core EPYC (bench/acdc.py, 2026-12-07); small patches
# cost a quarter more per voxel than whole slices (8 x 224 x 256 took 1.70 s).
CPU_SECONDS_PER_VOXEL = {3: 2.0 / (4 * 40 * 56 * 40), 2: 2.46 / (32 * 128 * 128)}
DEFAULT_CPU_MINUTES = 60.0  # a CPU run without --minutes
# Widths at full resolution (and their cap) a CPU plan may take, widest first, and the training steps the budget
# must still buy at that width. Hippocampus, widths from 16: validation Dice 0.875-0.880 from step 600 to step
# 4,733 of a 60-minute run (BENCHMARKS.md), so steps past about 800 are better spent on a wider network.
CPU_WIDTHS = ((32, 256), (24, 192), (16, 128))
MIN_STEPS_FOR_WIDTH = 800
# nnU-Net's augmentation is made for its 250,000 steps; a short CPU run (hundreds of steps) learns more from
# lightly augmented patches. Below this many planned steps a plan keeps the light augmentation and does not mirror:
# mirroring on every axis cost the hippocampus hour (909 steps) 0.027 held-out mean Dice, 0.857 against 0.8835, and
# mirrored test-time augmentation won back only 0.003 of it (BENCHMARKS.md, issue 28, fifth session).
STRONG_AUGMENTATION_STEPS = 5000
MIRRORING_COST = "hippocampus, 60 minutes: 0.857 held-out mean Dice mirrored on every axis against 0.8835 without"
# Mirroring left-right only keeps the hippocampus's anterior part in front of its posterior part, and it helped the
# short runs that mirroring every axis hurt (BENCHMARKS.md, issue 28, eighth session). It is planned where the classes
# keep their arrangement under it: their centroids lie left-right at most `LEFT_RIGHT_SHARE` as far apart as along
# the axis they are farthest apart on, or within `LEFT_RIGHT_VOXELS` voxels (hippocampus 1.9 mm left-right against
# 18.3 front to back; ACDC's ventricles 33 mm left-right, not mirrored).
LEFT_RIGHT_GAIN = ("hippocampus, 60 minutes: 0.8865 and 0.8832 held-out mean Dice over two seeds mirrored left-right "
                   "against 0.879 without; 10 minutes: 0.882 either way")
LEFT_RIGHT_SHARE = 0.25
LEFT_RIGHT_VOXELS = 2.0
WHOLE_SCAN_BATCH = ("hippocampus, 60 minutes: 0.886 held-out mean Dice against 0.8835 with 2 volumes x 2, "
                    "within noise, for twice the cases a step at the same cost")
BF16_UNITS = {"amx": "AMX matrix units", "avx512_bf16": "AVX-512 BF16 instructions"}
# Gate overlays written over a whole run, at most (and the last validation's always): every set holds each validation
# scan's maps and pictures, 17 MB for the 17 hippocampus validation scans, and the review page keeps a picture of
# each. The 60-minute CPU hippocampus run wrote 27 sets (450 MB, and a 287 MB review page); a 1000-epoch GPU run
# validating every epoch would write 17 GB. 25 sets still show how the gates settle over a run.
MAX_OVERLAY_EXPORTS = 25
# Case ids that name a patient and one of its volumes: `patient001_frame01`, `sub-01_ses-2`, `p7_ED`.
GROUP_PATTERN = r"(?i)^(.+?)[_-](?:frame|phase|time|tp|visit|ses|scan|ed|es)[_-]?\d*$"


@dataclass(frozen=True)
class Decision:
    """One planned config value: `key` is LightningCLI's dotted path (`data.patch_size`), `reason` says why."""

    key: str
    value: object
    reason: str


def target_spacing(spacings: np.ndarray) -> tuple[list[float], str]:
    """The target voxel size (mm, R A S) for per-case spacings `(N, 3)`, and why."""
    median = np.median(spacings, axis=0)
    thick = int(np.argmax(median))
    ratio = float(median.max() / max(median.min(), 1e-6))
    if ratio <= ANISOTROPY:
        return [round(float(v), 4) for v in median], f"the median spacing (anisotropy {ratio:.1f} <= {ANISOTROPY:g})"
    target = median.copy()
    others = np.delete(median, thick)
    target[thick] = max(float(np.percentile(spacings[:, thick], 10)), float(others.max()))
    return [round(float(v), 4) for v in target], (
        f"anisotropic ({ratio:.1f}x): the median spacing in-plane, the 10th percentile of the thick axis's "
        f"spacings along it (nnU-Net), so thin-slice cases keep their detail")


def resampled_shape(shapes: np.ndarray, spacings: np.ndarray, target: Sequence[float]) -> np.ndarray:
    """The median shape `(3,)` of the cases after resampling to `target`."""
    return np.median(shapes * spacings / np.asarray(target, dtype=np.float64), axis=0)


def _multiple(strides: list[list[int]], dims: int) -> np.ndarray:
    return np.prod(np.asarray(strides), axis=0).astype(int) if strides else np.ones(dims, dtype=int)


def plan_patch(median: Sequence[float], spacing: Sequence[float], budget: float,
               max_levels: int) -> tuple[list[int], list[list[int]]]:
    """The patch (voxels) and its strides: the median shape shrunk to `budget` voxels, padded to the strides."""
    # rounded: 96 voxels * 0.8 mm / 0.8 mm is 96.00000000000001, which the padding below would take to 112
    median = np.maximum(np.round(np.asarray(median, dtype=np.float64), 6), 1.0)
    mm = np.asarray(spacing, dtype=np.float64)
    patch = median.copy()
    while np.prod(patch) > budget:  # shrink the longest side in mm, by 5 %: the field of view stays as square as it can
        axis = int(np.argmax(patch * mm))
        patch[axis] = max(patch[axis] * 0.95, MIN_FEATURE)
        if np.all(patch <= MIN_FEATURE):
            break
    for _ in range(4):  # strides depend on the patch, the padded patch on the strides: settles in one or two rounds
        strides = plan_strides(np.floor(patch), spacing, max_levels)
        multiple = _multiple(strides, len(patch))
        padded = np.ceil(patch / multiple) * multiple
        if np.prod(padded) > budget * 1.25:  # padding up would overshoot the budget: round down instead
            padded = np.maximum(np.floor(patch / multiple), 1) * multiple
        if np.array_equal(plan_strides(padded, spacing, max_levels), strides):
            return [int(v) for v in padded], strides
        patch = padded
    return [int(v) for v in padded], plan_strides(padded, spacing, max_levels)


def detect_groups(case_ids: Sequence[str]) -> str | None:
    """`GROUP_PATTERN` when it puts several cases of this dataset into one group (patients with several volumes)."""
    regex = re.compile(GROUP_PATTERN)
    groups = [m.group(1) for m in map(regex.match, case_ids) if m]
    return GROUP_PATTERN if groups and len(set(groups)) < len(groups) else None


@dataclass(frozen=True)
class Facts:
    """What the rules decide from: the dataset, its fingerprint, and the machine and time the run is planned for."""

    info: DatasetInfo
    spacings: np.ndarray  # (cases, 3) mm, RAS
    shapes: np.ndarray  # (cases, 3) voxels, RAS
    target: list[float]  # the target spacing, before the dims rule (`target_spacing`)
    target_why: str
    median: np.ndarray  # the median scan resampled to `target`, voxels
    gpu: bool
    device_why: str
    gpu_memory: float
    bf16: str | None  # the CPU's native bf16 units (`hardware.cpu_bf16_units`); None on a GPU or without them
    minutes: float | None
    dims: str
    class_separation: list[float] | None = None  # mm R, A, S between the classes' centroids (fingerprint)

    @property
    def anisotropy(self) -> float:
        median_spacing = np.median(self.spacings, axis=0)
        return float(median_spacing.max() / max(median_spacing.min(), 1e-6))


Decided = dict  # config key -> value of the decisions made so far


def plan_dims(facts: Facts, decided: Decided) -> list[Decision]:
    """2D or 3D (module docstring, "2D or 3D")."""
    if facts.dims != "auto":
        return [Decision("data.spatial_dims", int(facts.dims[0]), f"--dims {facts.dims}")]
    median, thick = facts.median, int(np.argmax(facts.target))
    few_slices = median[thick] < MIN_3D_SLICES and thick == 2
    # On a CPU, thick slices make 2D the better use of the minutes: a 2D step costs a fraction of a 3D one
    # (2.5x faster again in bf16) and the thick axis holds little context. ACDC (10 mm slices, 1.5 mm in-plane)
    # in 15 CPU minutes: 0.82 mean Dice in 2D, 0.41 in 3D (BENCHMARKS.md).
    thick_on_cpu = not facts.gpu and facts.anisotropy > ANISOTROPY and thick == 2
    if few_slices:
        why = f"2D: {median[thick]:.0f} slices after resampling (< {MIN_3D_SLICES}) give a 3D patch no context along S"
    elif thick_on_cpu:
        why = (f"2D: on a CPU, slices {facts.anisotropy:.1f}x thicker than the in-plane spacing (> {ANISOTROPY:g}) "
               "hold little context and a 2D step costs a fraction of a 3D one (ACDC in 15 CPU minutes: "
               "0.82 mean Dice in 2D, 0.41 in 3D); --dims 3d for 3D")
    else:
        why = f"3D: the median resampled scan is {'x'.join(f'{v:.0f}' for v in median)} voxels"
    return [Decision("data.spatial_dims", 2 if few_slices or thick_on_cpu else 3, why)]


def plan_spacing(facts: Facts, decided: Decided) -> list[Decision]:
    """The target spacing (module docstring, "Target spacing"); 2D slices keep their own thickness."""
    target = list(facts.target)
    if decided["data.spatial_dims"] == 2:
        target[2] = 0.0  # slices keep their own thickness
        return [Decision("data.spacing", target, facts.target_why + "; 2D slices keep their own thickness (0)")]
    return [Decision("data.spacing", target, facts.target_why)]


def _patch_geometry(facts: Facts, decided: Decided) -> tuple[int, np.ndarray, float, int]:
    """Spatial dims, the patch axes' spacing, the voxel budget and the most levels, for the patch and topology."""
    spatial = decided["data.spatial_dims"]
    target = decided["data.spacing"]
    return (spatial, np.asarray(target[:spatial]) if spatial == 3 else target[:2], patch_budget(facts, spatial),
            5 if facts.gpu else 4)


def patch_budget(facts: Facts, spatial: int) -> float:
    """Voxels a patch may hold: on a GPU what `--gpu-memory` fits in bf16, on a CPU a step-time budget."""
    return (GPU_VOXELS_PER_GB[spatial] * facts.gpu_memory) if facts.gpu else CPU_PATCH_VOXELS[spatial]


def plan_patch_size(facts: Facts, decided: Decided) -> list[Decision]:
    """The patch (module docstring, "Patch")."""
    spatial, spacing, budget, max_levels = _patch_geometry(facts, decided)
    in_plane = facts.median[:spatial]
    patch, _ = plan_patch(in_plane, spacing, budget, max_levels)
    over = any(patch[a] > in_plane[a] for a in range(spatial))
    shrunk = not whole_scan_patch(facts, spatial)
    how = ("shrunk along its longest side (mm) to the budget and rounded to" if shrunk
           else "padded to" if over else "already")
    return [Decision("data.patch_size", patch,
                     f"the median resampled scan ({'x'.join(f'{v:.0f}' for v in in_plane)}) {how}"
                     + f" a multiple of the strides; budget {budget / 1000:.0f}k voxels "
                     + (f"({facts.gpu_memory:g} GB of GPU memory, bf16)" if facts.gpu else
                        f"(a step of {math.prod(batch_shape(facts, spatial))}: about "
                        f"{step_seconds(facts, spatial, patch):.1f} s on 2 CPU cores with widths from 16)"))]


def batch_shape(facts: Facts, spatial: int) -> tuple[int, int]:
    """Volumes a step and patches cut from each (module docstring, "Batch").

    3D: 2 x 2, or 4 x 1 when the patch holds the whole median scan (`whole_scan_patch`). 2D on a GPU: 2 volumes x
    4 whole slices. 2D on a CPU: 8 volumes x 4 small patches (ACDC, 15 minutes: 0.81 held-out mean Dice; 4 volumes
    x 8 patches, half the loads, made as many steps for 0.80).
    """
    if spatial == 3:
        return (4, 1) if whole_scan_patch(facts, 3) else (2, 2)
    return (2, 4) if facts.gpu else (8, 4)


def whole_scan_patch(facts: Facts, spatial: int) -> bool:
    """Whether the patch holds the whole median resampled scan: it fits the voxel budget unshrunk (`plan_patch`).

    Then every patch cut from a typical volume is that volume, padded: the volume's second patch differs from the
    first only by augmentation, and costs a full patch of compute. Hippocampus (35 x 50 x 36 in a 40 x 56 x 40
    patch), 60 float32 CPU minutes, the same 4 patches a step: 4 volumes x 1 made 937 steps for 0.886 held-out
    mean Dice, 2 volumes x 2 made 908 for 0.8835, and fitted its training patches less (0.887 against 0.899). The
    gain is within noise (+0.0025 +- 0.005 paired over the 40 cases, one seed); the rule stands on the waste it
    removes, and the measurement says it costs nothing.
    """
    return float(np.prod(np.maximum(facts.median[:spatial], 1.0))) <= patch_budget(facts, spatial)


def step_seconds(facts: Facts, spatial: int, patch: Sequence[int], width: int = 16) -> float:
    """Estimated seconds of one training step of `batch_shape` patches, widths from `width`.

    From a constant per voxel measured with widths from 16 on the 2-core reference (`CPU_SECONDS_PER_VOXEL`), the
    CPU's bf16 speed-up, and the width squared (a convolution's cost; `bench/step_variants.py`: from 24 1.97x, from
    32 3.96x the step from 16). A GPU is taken as 50x the reference.
    """
    volumes, per_volume = batch_shape(facts, spatial)
    voxels = volumes * per_volume * float(np.prod(patch))
    speedup = 50 if facts.gpu else hardware.BF16_STEP_SPEEDUP[facts.bf16][spatial] if facts.bf16 else 1
    return voxels * CPU_SECONDS_PER_VOXEL[spatial] / speedup * (width / 16) ** 2


def planned_steps(facts: Facts, seconds_per_step: float) -> float | None:
    """Training steps the budget buys at `seconds_per_step`; None for a GPU run bounded by epochs."""
    minutes = facts.minutes if facts.minutes is not None else (None if facts.gpu else DEFAULT_CPU_MINUTES)
    return None if minutes is None else minutes * 60 / seconds_per_step


def plan_topology(facts: Facts, decided: Decided) -> list[Decision]:
    """Widths and strides (module docstring, "Topology"): the strides `plan_patch` padded the patch to.

    The width grows with the budget: on a CPU the widest of `CPU_WIDTHS` that still gets `MIN_STEPS_FOR_WIDTH`
    steps in the time given; on a GPU nnU-Net's 32-320.
    """
    spatial, spacing, _, max_levels = _patch_geometry(facts, decided)
    patch = decided["data.patch_size"]
    strides = plan_strides(patch, spacing, max_levels)
    if facts.gpu:
        base, cap = 32, 320
        why = f"{base} at full resolution, doubling per level, capped at {cap} (nnU-Net's widths, on a GPU)"
    else:
        steps = {w: planned_steps(facts, step_seconds(facts, spatial, patch, w)) for w, _ in CPU_WIDTHS}
        base, cap = next(((w, c) for w, c in CPU_WIDTHS if steps[w] >= MIN_STEPS_FOR_WIDTH), CPU_WIDTHS[-1])
        widest = steps[base] >= MIN_STEPS_FOR_WIDTH and base != CPU_WIDTHS[-1][0]
        why = (f"{base} at full resolution, doubling per level, capped at {cap}: "
               + ("the widest that still gets" if widest else "the narrowest; a wider network would get fewer than")
               + f" {MIN_STEPS_FOR_WIDTH} steps in the budget (about {steps[base]:.0f} estimated; "
               + ", ".join(f"{w} wide: {steps[w]:.0f}" for w, _ in CPU_WIDTHS if w != base)
               + f"); past about {MIN_STEPS_FOR_WIDTH} steps a 16-wide network learned no more on hippocampus")
    channels = [min(base * 2**i, cap) for i in range(len(strides) + 1)]
    return [Decision("model.channels", channels, why),
            Decision("model.strides", strides,
                     f"halve an axis while its feature map stays >= {MIN_FEATURE} voxels and its spacing <= 2x the "
                     f"finest (coarsest map "
                     f"{'x'.join(str(int(p // m)) for p, m in zip(patch, _multiple(strides, spatial)))})")]


def plan_batch(facts: Facts, decided: Decided) -> list[Decision]:
    """Volumes and patches a step, and the foreground share (module docstring, "Batch")."""
    spatial = decided["data.spatial_dims"]
    volumes, per_volume = batch_shape(facts, spatial)
    small_2d = spatial == 2 and not facts.gpu
    if small_2d:
        volumes_why = ": many small 2D patches a step learn more per CPU minute than a few whole slices"
    elif per_volume == 1:
        volumes_why = ": as many cases as patches, since the patch holds the whole median scan"
    else:
        volumes_why = ": batch statistics and batch Dice need at least 2"
    if per_volume == 1:
        per_volume_why = ("1 patch from each loaded volume: the patch holds the whole median scan, so a second one "
                          f"would repeat it ({WHOLE_SCAN_BATCH})")
    else:
        per_volume_why = (f"{per_volume} {'slices' if spatial == 2 and not small_2d else 'patches'} from each "
                          "loaded volume: loading costs more than a patch")
    return [Decision("data.batch_size", volumes, f"{volumes} volumes a step, {volumes * per_volume} patches"
                     + volumes_why),
            Decision("data.samples_per_volume", per_volume, per_volume_why),
            Decision("data.foreground_ratio", 0.33, "a third of the patches centred on a labelled voxel (nnU-Net)")]


def lateral_labels(names: Sequence[str]) -> list[str]:
    """Label names that say a side (`left kidney`, `Kidney_R`, `r-hippocampus`): mirroring left-right swaps them."""
    return [n for n in names if re.search(r"(?i)(^|[^a-z])(left|right|l|r)([^a-z]|$)", n)]


def short_run_mirroring(facts: Facts, lateral: Sequence[str]) -> Decision:
    """Mirroring in a run too short for nnU-Net's every-axis mirroring: left-right only, where the classes keep
    their arrangement under it (`LEFT_RIGHT_SHARE`) and no label names a side; else none."""
    separation, swaps = facts.class_separation, False
    if separation is None:
        where = "one class: mirrored left-right it is still one class"
    else:
        far = int(np.argmax(separation[1:])) + 1
        voxel = float(np.median(facts.spacings[:, 0]))
        where = (f"the classes' centroids lie {separation[0]:.1f} mm apart left-right, "
                 f"{separation[far]:.1f} mm {('front to back', 'top to bottom')[far - 1]}")
        swaps = separation[0] > max(LEFT_RIGHT_SHARE * separation[far], LEFT_RIGHT_VOXELS * voxel)
    if lateral or swaps:
        why_not = (f"the labels {', '.join(lateral)} name a side" if lateral else
                   f"{where}, so a flip would swap their arrangement")
        return Decision("data.flip_axes", [], f"no mirroring in a run this short ({MIRRORING_COST}), and not "
                        f"left-right either: {why_not}")
    return Decision("data.flip_axes", [0], f"left-right only in a run this short ({LEFT_RIGHT_GAIN}; "
                    f"{MIRRORING_COST}); {where}")


def plan_augmentation(facts: Facts, decided: Decided) -> list[Decision]:
    """Augmentation strength and mirroring (module docstring, "Augmentation"), from the steps the budget buys."""
    spatial = decided["data.spatial_dims"]
    steps = planned_steps(facts, step_seconds(facts, spatial, decided["data.patch_size"], decided["model.channels"][0]))
    lateral = lateral_labels(facts.info.class_names)
    if steps is not None and steps < STRONG_AUGMENTATION_STEPS:
        return [Decision("data.augmentation", "light", f"light (small rotations and scalings, mild intensity "
                         f"changes): about {steps:.0f} steps, fewer than the {STRONG_AUGMENTATION_STEPS} that "
                         "nnU-Net-strength augmentation is planned for"),
                short_run_mirroring(facts, lateral)]
    axes = [a for a in range(spatial) if not (lateral and a == 0)]
    span = "1000 epochs" if steps is None else f"about {steps:.0f} steps"
    return [Decision("data.augmentation", "strong", f"nnU-Net's strength (rotation, scaling 0.7-1.4, gamma, "
                     f"contrast, low resolution): {span}, over the {STRONG_AUGMENTATION_STEPS} it is planned for"),
            Decision("data.flip_axes", axes, "mirroring on every axis (nnU-Net)" + (
                f" but left-right: the labels {', '.join(lateral)} name a side" if lateral else ""))]


def plan_normalization(facts: Facts, decided: Decided) -> list[Decision]:
    """Normalisation per channel (module docstring, "Normalisation")."""
    modalities = facts.info.modalities
    return [Decision("data.normalization", "auto", "per channel from dataset.json: " + ", ".join(
        f"{m}: {'CT clip to the foreground 0.5-99.5 percentiles, foreground mean/std' if s == 'ct' else 'z-score per scan'}"
        for m, s in zip(modalities, channel_schemes(modalities))))]


def plan_split(facts: Facts, decided: Decided) -> list[Decision]:
    """The validation cases, by patient where case ids name one (module docstring, "Split by patient")."""
    cases = facts.info.cases
    group = detect_groups([c.case_id for c in cases])
    fraction = 0.1 if len(cases) >= 50 else 0.2
    return [Decision("data.group_pattern", group,
                     "several volumes per patient (case ids such as patient001_frame01): split by patient" if group
                     else "one volume per case id: split by case"),
            Decision("data.val_fraction", fraction,
                     f"{_validation_cases(facts, fraction)} of {len(cases)} cases held out for validation")]


def _validation_cases(facts: Facts, fraction: float) -> int:
    return max(1, round(len(facts.info.cases) * fraction))


def plan_loading(facts: Facts, decided: Decided) -> list[Decision]:
    """Loader processes."""
    return [Decision("data.num_workers", 8, "loader processes for a GPU node") if facts.gpu else
            Decision("data.num_workers", 2, "loader processes: one per core on the 2-core reference")]


def plan_optimizer(facts: Facts, decided: Decided) -> list[Decision]:
    """The optimiser: nnU-Net's SGD on a GPU, AdamW for a CPU run's few steps; deep supervision on a GPU and in 2D
    on a CPU, off in 3D on a CPU (measured: no gain there)."""
    if facts.gpu:
        return [Decision("model.optimizer", "sgd", "SGD with Nesterov momentum 0.99 (nnU-Net) on a GPU"),
                Decision("model.lr", 0.01, "nnU-Net's initial learning rate for SGD"),
                Decision("model.deep_supervision", True, "auxiliary losses on coarser levels (nnU-Net)")]
    decisions = [Decision("model.optimizer", "adamw", "AdamW converges in fewer steps than SGD, and a CPU run has few"),
                 Decision("model.lr", 0.003,
                          "the learning rate that trained the hippocampus model best here (BENCHMARKS.md)")]
    if decided["data.spatial_dims"] == 2:
        decisions.append(Decision("model.deep_supervision", True, "auxiliary losses on coarser levels (nnU-Net): in "
                                  "2D on a CPU they sped learning up (ACDC, 15 minutes: 0.83 held-out mean Dice "
                                  "against 0.80 without)"))
    else:
        decisions.append(Decision("model.deep_supervision", False, "no auxiliary losses in 3D on a CPU: they cost "
                                  "steps and bought nothing (hippocampus, 60 minutes: 0.8825 held-out mean Dice "
                                  "against 0.8835 without)"))
    return decisions


def plan_precision(facts: Facts, decided: Decided) -> list[Decision]:
    """Precision and accelerator (module docstring, "Precision")."""
    if facts.gpu:
        return [Decision("trainer.precision", "bf16-mixed", "bf16 mixed precision on the GPU"),
                Decision("trainer.accelerator", "gpu", facts.device_why)]
    spatial = decided["data.spatial_dims"]
    if facts.bf16:
        precision = Decision("trainer.precision", "bf16-mixed",
                             f"bf16 mixed precision: this CPU has {BF16_UNITS[facts.bf16]} (a training step "
                             f"{hardware.BF16_STEP_SPEEDUP[facts.bf16][spatial]:g}x faster than float32 in {spatial}D "
                             "on the 2-core reference)")
    else:
        precision = Decision("trainer.precision", "32-true", "float32: this CPU has no native bf16 instructions (AMX "
                             "or AVX-512 BF16), bf16 would be emulated")
    return [precision, Decision("trainer.accelerator", "auto", "the GPU when there is one, else the CPU")]


def plan_schedule(facts: Facts, decided: Decided) -> list[Decision]:
    """Weight decay, learning-rate schedule and the windows per forward pass."""
    return [Decision("model.weight_decay", 3e-5, "nnU-Net's weight decay"),
            Decision("model.schedule", "poly", "warm-up then polynomial decay over the run (by time when time-bounded)"),
            Decision("model.sw_batch_size", 4, "windows per forward pass at validation and prediction")]


def plan_time_and_validation(facts: Facts, decided: Decided) -> list[Decision]:
    """Training time and how often to validate (module docstring, "Validation").

    Estimates a training step and a validation. A time-bounded run validates every epoch and lets
    `ValidationSchedule` skip what goes over its share (measured, not estimated); an epoch-bounded one validates
    every n epochs, n from the estimates.
    """
    gpu, bf16, median = facts.gpu, facts.bf16, facts.median
    spatial, patch = decided["data.spatial_dims"], decided["data.patch_size"]
    n_val = _validation_cases(facts, decided["data.val_fraction"])
    n_train = len(facts.info.cases) - n_val
    steps_per_epoch = math.ceil(n_train / decided["data.batch_size"])
    epoch_seconds = steps_per_epoch * step_seconds(facts, spatial, patch, decided["model.channels"][0])
    # sliding windows at overlap 0.5 cover each voxel about 2^dims times, a forward pass is ~1/3 of a step
    scan_voxels = float(np.prod(median[:3] if spatial == 3 else median[:2])) * (median[2] if spatial == 2 else 1)
    val_seconds = n_val * scan_voxels * 2**spatial * CPU_SECONDS_PER_VOXEL[spatial] / 3 / (
        50 if gpu else hardware.BF16_FORWARD_SPEEDUP[bf16] if bf16 else 1)
    total_minutes = facts.minutes if facts.minutes is not None else (None if gpu else DEFAULT_CPU_MINUTES)
    cost = f"a validation: {val_seconds:.0f} s for {n_val} scans, an epoch: {epoch_seconds:.0f} s (estimated)"
    decisions = []
    if total_minutes is not None:
        epochs = max(1, int(total_minutes * 60 / max(epoch_seconds, 1e-6)))
        unit = "minute" if total_minutes == 1 else "minutes"
        decisions += [Decision("trainer.max_time", max_time(total_minutes), f"{total_minutes:g} {unit} of "
                               f"training; about {epochs} epochs of {epoch_seconds:.0f} s (estimated)"),
                      Decision("trainer.max_epochs", -1, "bounded by time, not epochs")]
        every, planned_epochs = 1, epochs
        why = (f"every epoch while validation stays under validation.max_share of the run: `seg fit` measures what a "
               f"validation costs and skips the ones over it; the last epoch is always validated ({cost})")
    else:
        planned_epochs = 1000
        decisions.append(Decision("trainer.max_epochs", planned_epochs, "1000 epochs, as nnU-Net trains on a GPU"))
        every = max(1, math.ceil(val_seconds / max(0.1 * epoch_seconds, 1e-6)))
        why = f"validation at most a tenth of the training time ({cost})"
    return decisions + [
        Decision("trainer.check_val_every_n_epoch", every, why),
        Decision("validation.max_share", 0.1, "validation takes at most a tenth of a time-bounded run's wall time"),
        plan_overlays(every, planned_epochs),
        Decision("trainer.log_every_n_steps", max(1, min(50, steps_per_epoch // 2)),
                 "twice an epoch, at most every 50")]


def plan_overlays(validation_every: int, planned_epochs: int) -> Decision:
    """How often the gate overlays are exported: at the validations, but no more than `MAX_OVERLAY_EXPORTS` sets
    over the run's `planned_epochs` (the last validation always exports)."""
    every = max(validation_every, math.ceil(planned_epochs / MAX_OVERLAY_EXPORTS))
    if every == validation_every:
        return Decision("overlays.every_n_epochs", every, "gate overlays at every validation (and always at the last)")
    return Decision("overlays.every_n_epochs", every,
                    f"gate overlays every {every} epochs and at the last validation: at most about "
                    f"{MAX_OVERLAY_EXPORTS} sets in the run's {planned_epochs} epochs (a set holds every validation "
                    f"scan's maps: 17 MB for 17 hippocampus scans)")


# The rules in the order they decide: a rule reads the decisions of the rules before it. The written plan lists the
# decisions in this order.
RULES = (plan_dims, plan_spacing, plan_patch_size, plan_topology, plan_batch, plan_augmentation,
         plan_normalization, plan_split, plan_loading, plan_optimizer, plan_precision, plan_schedule,
         plan_time_and_validation)


def plan_dataset(root: str | os.PathLike, device: str = "cpu", gpu_memory: float = 10.0,
                 minutes: float | None = None, dims: str = "auto", check: bool = True) -> list[Decision]:
    """Plan a training run for the dataset at `root`: the `RULES`, in order, on its `Facts`.

    Args:
        root: the dataset folder (any layout `seg.data.layout` reads).
        device: "cpu", "gpu" or "auto" (`resolve_device`): sets the patch budget, widths, optimiser and precision.
        gpu_memory: GB of GPU memory to plan for (device "gpu").
        minutes: training time; None: 60 minutes on a CPU, 1000 epochs on a GPU.
        dims: "auto" (the rule above), "2d" or "3d".
        check: run `seg check-data` first; a dataset with problems is not planned.

    Raises:
        DataError: the dataset cannot be read, or `seg check-data` finds problems (all of them, one line each).
    """
    facts = dataset_facts(root, device, gpu_memory, minutes, dims, check)
    decisions: list[Decision] = []
    for rule in RULES:
        decisions += rule(facts, {d.key: d.value for d in decisions})
    return decisions


def dataset_facts(root: str | os.PathLike, device: str = "cpu", gpu_memory: float = 10.0,
                  minutes: float | None = None, dims: str = "auto", check: bool = True) -> Facts:
    """The options checked, the dataset read (and checked) and fingerprinted: what `plan_dataset`'s rules need."""
    if device not in ("auto", "cpu", "gpu"):
        raise DataError(f"--device must be auto, cpu or gpu, got '{device}'")
    device, device_why = resolve_device(device)
    if dims not in ("auto", "2d", "3d"):
        raise DataError(f"--dims must be auto, 2d or 3d, got '{dims}'")
    if device == "gpu" and not gpu_memory > 0:
        raise DataError(f"--gpu-memory must be a positive number of GB, got {gpu_memory}")
    if minutes is not None and not minutes > 0:
        raise DataError(f"--minutes must be positive, got {minutes}")
    if check:
        from seg.data.checks import check_or_raise

        info = check_or_raise(root)
    else:
        info = load_dataset(root)
    fingerprint = load_fingerprint(info, intensities="ct" in channel_schemes(info.modalities))
    spacings = np.asarray(fingerprint["spacings"], dtype=np.float64)
    shapes = np.asarray(fingerprint["shapes"], dtype=np.float64)
    target, why = target_spacing(spacings)
    gpu = device == "gpu"
    return Facts(info=info, spacings=spacings, shapes=shapes, target=target, target_why=why,
                 median=resampled_shape(shapes, spacings, target), gpu=gpu, device_why=device_why,
                 gpu_memory=gpu_memory, bf16=None if gpu else hardware.cpu_bf16_units(),  # for the CPU it is made on
                 minutes=minutes, dims=dims, class_separation=fingerprint.get("class_separation"))


def resolve_device(device: str) -> tuple[str, str]:
    """"cpu" or "gpu" for `--device` (auto: the GPU when PyTorch sees one, as `seg fit`'s accelerator "auto"), and why."""
    if device != "auto":
        return device, f"--device {device}"
    import torch

    return ("gpu", "--device auto: PyTorch sees a GPU") if torch.cuda.is_available() else ("cpu", "--device auto: no GPU")


def _constant_text(value: float | str) -> str:
    return value if isinstance(value, str) else f"{value:g}"


def help_text() -> str:
    """The module docstring's rules as `seg plan --help` shows them: constants as their values, no markdown."""
    rules = __doc__.split("\n\n", 1)[1].split("\n\nEvery")[0]
    rules = re.sub(r"`([A-Z][A-Z0-9_]+)`", lambda m: _constant_text(globals()[m[1]]), rules)
    return rules.replace("**", "").replace("`", "")


def max_time(minutes: float) -> str:
    """`trainer.max_time` for a budget in minutes: Lightning's "DD:HH:MM:SS", to the second (90.5 -> 00:01:30:30)."""
    seconds = int(round(minutes * 60))
    return f"{seconds // 86400:02d}:{seconds % 86400 // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def plan_config(decisions: Sequence[Decision], root: str | os.PathLike) -> dict:
    """The decisions as a nested config dict (LightningCLI's sections), with `data.root` and `data.plan`."""
    config: dict = {"seed_everything": 0}
    for d in decisions:
        section, key = d.key.split(".", 1)
        config.setdefault(section, {})[key] = d.value
    config["data"]["root"] = os.fspath(root)
    config["data"]["plan"] = {d.key: d.reason for d in decisions}
    return config


def _yaml(value) -> str:
    """A value as YAML flow text that every YAML 1.1 reader types back the same (JSON, with floats such as 3e-05
    written 3.0e-05: PyYAML reads an exponent without a dot as a string)."""
    if isinstance(value, float):
        text = repr(value)
        return text.replace("e", ".0e") if "e" in text and "." not in text.split("e")[0] else text
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    return json.dumps(value)


def render_yaml(decisions: Sequence[Decision], root: str | os.PathLike, command: str = "") -> str:
    """A LightningCLI YAML config: every planned value with its reason as a comment; `data.plan` keeps them."""
    lines = ["# Planned by `seg plan` from the dataset's fingerprint; train with:",
             "#   seg fit --config THIS_FILE [--trainer.default_root_dir runs/NAME]"]
    if command:
        lines.append(f"# made by: {command}")
    lines.append("seed_everything: 0")
    sections: dict[str, list[Decision]] = {}
    for d in decisions:
        sections.setdefault(d.key.split(".", 1)[0], []).append(d)
    for section in ("trainer", "validation", "model", "data", "overlays"):
        if section not in sections and section != "data":
            continue
        lines.append(f"{section}:")
        if section == "data":
            lines.append(f"  root: {json.dumps(os.fspath(root))}")
        for d in sections.get(section, []):
            lines.append(f"  {d.key.split('.', 1)[1]}: {_yaml(d.value)}  # {d.reason}")
        if section == "data":  # the reasons travel into checkpoints with the preprocessing
            lines.append("  plan:")
            lines += [f"    {json.dumps(d.key)}: {json.dumps(d.reason)}" for d in decisions]
    return "\n".join(lines) + "\n"


def summary(decisions: Sequence[Decision]) -> str:
    """One line per decision: `key = value  (reason)`."""
    return "\n".join(f"  {d.key} = {json.dumps(d.value)}  ({d.reason})" for d in decisions)


def write_plan(path: str | os.PathLike, text: str) -> Path:
    """Write the plan atomically (temporary name beside it, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text(path, text)


# ---- seg plan -----------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Write a complete seg fit config for a dataset, derived from its fingerprint, with the "
                          "reason for every value as a comment. " + help_text())
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("root", type=Path, help="the dataset folder (MSD, nnU-Net v2 or imagesTr/ + labelsTr/)")
    parser.add_argument("--output", type=Path, default=None, help="the YAML to write (default: print it)")
    parser.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                        help="plan for a CPU or a GPU; auto (default): a GPU when PyTorch sees one, else this CPU")
    parser.add_argument("--gpu-memory", type=float, default=10.0, help="GB of GPU memory to fill (default 10)")
    parser.add_argument("--minutes", type=float, default=None,
                        help="training time; default 60 on a CPU, 1000 epochs on a GPU")
    parser.add_argument("--dims", choices=("auto", "2d", "3d"), default="auto",
                        help=f"2D slices or 3D patches; auto: 2D when the thick axis has under {MIN_3D_SLICES} "
                             f"voxels, or on a CPU when the slices are more than {ANISOTROPY:g}x thicker than the "
                             "in-plane spacing")


def run(args: argparse.Namespace) -> int:
    from seg.data.checks import check_dataset

    problems = check_dataset(args.root)
    if problems:  # a dataset `seg check-data` rejects is not planned: every problem, one line each
        for problem in problems:
            print(f"seg plan: error: {problem}", file=sys.stderr)
        print(f"seg plan: {len(problems)} problem(s) in {args.root}; fix them (`seg check-data`) and plan again",
              file=sys.stderr)
        return 1
    decisions = plan_dataset(args.root, device=args.device, gpu_memory=args.gpu_memory, minutes=args.minutes,
                             dims=args.dims, check=False)
    command = "seg plan " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else ""
    text = render_yaml(decisions, args.root, command)
    if args.output is None:
        print(text, end="")
        return 0
    write_plan(args.output, text)
    print(f"plan for {args.root}:\n{summary(decisions)}\nwritten to {args.output}; train with "
          f"`seg fit --config {args.output}`")
    return 0
