"""CPU bf16 weight gradients of 3D convolutions whose kernel exceeds the input: the fault and `Conv3dSafeBF16`.

Two measurements, plain `nn.Conv3d` against `seg.models.conv.Conv3dSafeBF16` in the same invocation:
1. **Fault rate**: for each shape, `--tries` bf16 forward + backward passes of one convolution, each after
   freed memory was filled with NaN (so that a read of memory the kernel never wrote shows), counting tries whose
   weight or input gradient is not finite. The shapes are the Attention U-Net's: CBAM's 2 -> 1, 7^3 convolution
   on the hippocampus bottleneck (5 x 7 x 5) and on a finer level (10 x 14 x 10), and a 3^3 convolution on an
   axis two voxels thin (a thin-slice bottleneck). A float32 row for the first is the control.
2. **Cost**: the default `AttentionUNet` (gates and CBAM) of the hippocampus plan (widths 16-128, 4 windows of
   40 x 56 x 40) and of ACDC's 3D plan (widths 16-128, 4 windows of 80 x 80 x 16) training in bf16 on random
   input, with its 3D convolutions as plain `nn.Conv3d` or as `Conv3dSafeBF16` (where CBAM's convolutions on
   grids smaller than 7^3 then run in float32), alternating for `--repeats` rounds; best round of each; and the
   steps whose gradients were not finite, per network.

Prints the CPU's bf16 units and one JSON line per measurement.

usage: python bench/bf16_small_grid.py [--tries 40] [--repeats 3] [--iterations 6] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from seg import hardware
from seg.models.attention_unet import AttentionUNet
from seg.models.conv import Conv3dSafeBF16

# (in channels, out channels, kernel, spatial shape, channels-last)
SHAPES = [(2, 1, 7, (5, 7, 5), True), (2, 1, 7, (5, 7, 5), False), (2, 1, 7, (10, 14, 10), True),
          (16, 16, 3, (2, 8, 8), True), (16, 16, 3, (2, 8, 8), False)]
# The two 3D plans of this project's data (`seg plan`): (widths, strides, window). In the hippocampus plan CBAM's
# 7^3 exceeds the 5 x 7 x 5 bottleneck; in ACDC's 3D plan (`--dims 3d`) the two coarsest levels, 10 x 10 x 4 and
# 5 x 5 x 4.
NETWORKS = {
    "hippocampus plan": ((16, 32, 64, 128), (2, 2, 2), (40, 56, 40)),
    "ACDC 3D plan": ((16, 32, 64, 128, 128), ((2, 2, 1), (2, 2, 2), (2, 2, 2), (2, 2, 1)), (80, 80, 16)),
}


def fill_freed_memory_with_nan() -> None:
    for size in (2**12, 2**14, 2**16, 2**18):
        torch.full((size,), float("nan"))
        torch.full((size,), float("nan"), dtype=torch.bfloat16)


def faulty_tries(conv: torch.nn.Module, shape: tuple[int, ...], channels_last: bool, bf16: bool, tries: int) -> int:
    bad = 0
    for _ in range(tries):
        fill_freed_memory_with_nan()
        x = torch.randn(4, conv.in_channels, *shape)
        x = (x.contiguous(memory_format=torch.channels_last_3d) if channels_last else x).requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = conv(x)
        conv.zero_grad()
        (out.float() ** 2).sum().backward()
        bad += not (torch.isfinite(conv.weight.grad).all() and torch.isfinite(x.grad).all())
    return bad


def as_plain_conv3d(net: torch.nn.Module) -> torch.nn.Module:
    """The same network with every `Conv3dSafeBF16` turned back into a plain `nn.Conv3d` (same weights)."""
    for module in net.modules():
        if isinstance(module, Conv3dSafeBF16):
            module.__class__ = torch.nn.Conv3d
    return net


def training_steps(net: torch.nn.Module, x: torch.Tensor, iterations: int) -> tuple[float, int]:
    """Seconds per bf16 training step, and how many steps had non-finite gradients (those are not applied)."""
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    net.train()
    bad = 0

    def once() -> bool:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            net(x).float().mean().backward()
        finite = all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
        if finite:
            optimizer.step()
        optimizer.zero_grad()
        return finite

    once()
    start = time.perf_counter()
    for _ in range(iterations):
        bad += not once()
    return (time.perf_counter() - start) / iterations, bad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tries", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(json.dumps({"bf16_units": hardware.cpu_bf16_units(), "threads": args.threads,
                      "torch": torch.__version__}), flush=True)

    for cin, cout, k, shape, channels_last in SHAPES:
        row = {"conv": f"{cin}->{cout}, {k}^3", "shape": list(shape), "channels_last": channels_last,
               "tries": args.tries}
        for name, kind in (("nn.Conv3d", torch.nn.Conv3d), ("Conv3dSafeBF16", Conv3dSafeBF16)):
            torch.manual_seed(0)
            row[f"{name} bf16 non-finite"] = faulty_tries(kind(cin, cout, k, padding=k // 2), shape, channels_last,
                                                          True, args.tries)
        if shape == SHAPES[0][3] and channels_last:
            torch.manual_seed(0)
            row["nn.Conv3d float32 non-finite"] = faulty_tries(torch.nn.Conv3d(cin, cout, k, padding=k // 2), shape,
                                                               channels_last, False, args.tries)
        print(json.dumps(row), flush=True)

    for name, (channels, strides, shape) in NETWORKS.items():
        torch.manual_seed(0)
        nets = {"Conv3dSafeBF16": AttentionUNet(3, 1, 3, channels=channels, strides=strides)}
        nets["nn.Conv3d"] = as_plain_conv3d(AttentionUNet(3, 1, 3, channels=channels, strides=strides))
        nets["nn.Conv3d"].load_state_dict(nets["Conv3dSafeBF16"].state_dict())
        x = torch.randn(4, 1, *shape)
        best = {kind: float("inf") for kind in nets}
        bad = {kind: 0 for kind in nets}
        for _ in range(args.repeats):
            for kind, net in nets.items():
                seconds, faults = training_steps(net, x, args.iterations)
                best[kind] = min(best[kind], seconds)
                bad[kind] += faults
        print(json.dumps({"pass": f"bf16 training step, {name}, 4 x {' x '.join(map(str, shape))}",
                          "nn.Conv3d_s": round(best["nn.Conv3d"], 3),
                          "Conv3dSafeBF16_s": round(best["Conv3dSafeBF16"], 3),
                          "ratio": round(best["Conv3dSafeBF16"] / best["nn.Conv3d"], 3),
                          "steps": args.repeats * args.iterations, "non-finite steps": bad}), flush=True)


if __name__ == "__main__":
    main()
