"""What the machine's processor can do, where it changes a default (the network's precision)."""

from __future__ import annotations

import torch

# bf16 autocast against float32 on the two kinds of 2-core machine this project is measured on (BENCHMARKS.md,
# "bf16 on a CPU"): the hippocampus network's forward pass (4 windows of 40 x 56 x 40) and a training step (3D:
# 40 x 56 x 40, batch 4; 2D: 224 x 256, batch 8).
#   AMX (Xeon; widths 16-128 in 2D):      forward 3.1x, step 1.3x in 3D (bf16 3D convolution backward is slow),
#                                         2.5x in 2D
#   AVX-512 BF16 (EPYC; `bench/bf16_speed.py`, widths 32-256 in 2D): forward 2.0x, step 1.9x in 3D, 2.5x in 2D
BF16_FORWARD_SPEEDUP = {"amx": 3.1, "avx512_bf16": 2.0}
BF16_STEP_SPEEDUP = {"amx": {3: 1.3, 2: 2.5}, "avx512_bf16": {3: 1.9, 2: 2.5}}


def _probe(name: str) -> bool:
    probe = getattr(torch.cpu, name, None)  # private in torch 2.x; absent: assume the CPU lacks it
    try:
        return bool(probe()) if probe is not None else False
    except Exception:  # a probe that fails says nothing about the hardware: keep float32
        return False


def cpu_bf16_units() -> str | None:
    """The CPU's native bfloat16 instructions that oneDNN runs convolutions on: "amx" (AMX tiles, Intel Sapphire
    Rapids and later), "avx512_bf16" (AVX-512 BF16 dot products, AMD Zen 4 and later, Intel Cooper Lake), or None,
    where bf16 is emulated and no faster than float32. Speed-ups against float32: `BF16_STEP_SPEEDUP`.
    """
    if _probe("_is_amx_tile_supported"):
        return "amx"
    if _probe("_is_avx512_bf16_supported"):
        return "avx512_bf16"
    return None
