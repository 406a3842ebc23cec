"""bf16 autocast against float32 on this CPU: what `seg.hardware.BF16_STEP_SPEEDUP` rests on.

The default `AttentionUNet` (gates and CBAM) in two shapes, each timed in float32 and under
`torch.autocast("cpu", dtype=torch.bfloat16)` on the same random input, alternating for `--repeats` rounds (so
drift in the machine's load hits both) with the best round of each reported:
- 3D: the hippocampus network (widths 16-128), 4 windows of 40 x 56 x 40, 3 classes;
- 2D: widths 32-256, 8 slices of 224 x 256 (an ACDC-sized plan), 3 classes.
For each: a forward pass in eval mode without gradients (validation and prediction) and a training step
(forward, float32 loss, backward, AdamW). Prints the CPU's bf16 units (`seg.hardware.cpu_bf16_units`) and one
JSON line per measurement; the speed-up is float32 seconds over bf16 seconds.

usage: python bench/bf16_speed.py [--repeats 3] [--iterations 4] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from seg import hardware
from seg.models.attention_unet import AttentionUNet

SHAPES = {3: ((40, 56, 40), 4, (16, 32, 64, 128)), 2: ((224, 256), 8, (32, 64, 128, 256))}


def seconds_per_iteration(net: torch.nn.Module, x: torch.Tensor, train: bool, bf16: bool, iterations: int) -> float:
    optimizer = torch.optim.AdamW(net.parameters())

    def once() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if train:
                net.train()
                net(x).float().mean().backward()  # the loss in float32, as `SegmentationModule.training_step`
                optimizer.step()
                optimizer.zero_grad()
            else:
                net.eval()
                with torch.no_grad():
                    net(x)

    once()  # warm-up: oneDNN picks and caches its kernels on the first call
    start = time.perf_counter()
    for _ in range(iterations):
        once()
    return (time.perf_counter() - start) / iterations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(json.dumps({"bf16_units": hardware.cpu_bf16_units(), "threads": args.threads}), flush=True)
    for dims, (shape, batch, channels) in SHAPES.items():
        torch.manual_seed(0)
        net = AttentionUNet(dims, 1, 3, channels=channels)
        x = torch.randn(batch, 1, *shape)
        for train in (False, True):
            best = {"fp32": float("inf"), "bf16": float("inf")}
            for _ in range(args.repeats):
                for name in best:
                    best[name] = min(best[name], seconds_per_iteration(net, x, train, name == "bf16", args.iterations))
            print(json.dumps({"dims": dims, "shape": list(shape), "batch": batch,
                              "pass": "training step" if train else "forward",
                              "fp32_s": round(best["fp32"], 3), "bf16_s": round(best["bf16"], 3),
                              "speedup": round(best["fp32"] / best["bf16"], 2)}), flush=True)


if __name__ == "__main__":
    main()
