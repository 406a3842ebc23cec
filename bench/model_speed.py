"""Training-step time of seg's 3D AttentionUNet against MONAI's AttentionUnet, interleaved in one process.

One step = forward + Dice-CE-free loss (mean of logits squared, so the loss costs nothing) + backward,
input 1x1x64x64x64 on the CPU, channels (16, 32, 64, 128), strides (2, 2, 2). The two models alternate
step by step so that drift in the machine's speed hits both; the median of the timed steps is reported.

usage: python bench/model_speed.py [--steps 15] [--warmup 3] [--size 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import date

import torch
from monai.networks.nets import AttentionUnet

from seg.models import AttentionUNet


def step_time(model: torch.nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    out = model(x)
    out.float().pow(2).mean().backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    channels, strides = (16, 32, 64, 128), (2, 2, 2)
    models = {
        "seg": AttentionUNet(3, 1, 3, channels=channels, strides=strides),
        "seg_decoder_convs_2": AttentionUNet(3, 1, 3, channels=channels, strides=strides, decoder_convs=2),
        "seg_no_cbam": AttentionUNet(3, 1, 3, channels=channels, strides=strides, cbam=False),
        "monai": AttentionUnet(3, 1, 3, channels=channels, strides=strides),
    }
    x = torch.randn(1, 1, args.size, args.size, args.size)
    times = {name: [] for name in models}
    for i in range(args.warmup + args.steps):
        for name, model in models.items():
            model.train()
            t = step_time(model, x)
            if i >= args.warmup:
                times[name].append(t)
    median = {name: statistics.median(t) for name, t in times.items()}
    print(json.dumps({
        "date": date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "input": [1, 1] + [args.size] * 3,
        "median_step_s": {k: round(v, 4) for k, v in median.items()},
        "ratio_seg_over_monai": round(median["seg"] / median["monai"], 3),
        "ratio_seg_no_cbam_over_monai": round(median["seg_no_cbam"] / median["monai"], 3),
        "params": {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()},
    }, indent=1))


if __name__ == "__main__":
    main()
