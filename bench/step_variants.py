"""Training-step time of the planned network's variants on one batch shape, interleaved in one process.

What a step costs decides what a time budget buys: how many steps of a wider network, with deep supervision, in
channels-last memory. Each variant is a real `seg` network (`build_network`) trained with the plan's loss
(Dice-CE, batch Dice; deep supervision through MONAI's `DeepSupervisionLoss`) and AdamW on random data of the
planned batch shape. Variants alternate step by step so drift in the machine's speed hits all alike; the median of
the timed steps is reported.

    python bench/step_variants.py --dims 2 --patch 224 256 --batch 8            # ACDC's 2D plan
    python bench/step_variants.py --dims 3 --patch 40 56 40 --batch 4           # hippocampus

Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import date

import torch
from monai.losses import DeepSupervisionLoss, DiceCELoss

from machine import cpu_name  # bench/, beside this script
from seg.inference.checkpoint import build_network
from seg.models.topology import plan_strides


def make_variant(dims: int, patch: list[int], base: int, cap: int, deep_supervision: bool, channels_last: bool,
                 classes: int):
    strides = plan_strides(patch, [1.0] * dims, 5 if dims == 2 else 4)
    channels = [min(base * 2**i, cap) for i in range(len(strides) + 1)]
    network = build_network({"spatial_dims": dims, "in_channels": 1, "out_channels": classes, "channels": channels,
                             "strides": strides, "deep_supervision": deep_supervision}).train()
    fmt = {2: torch.channels_last, 3: torch.channels_last_3d}[dims]
    if channels_last:
        network = network.to(memory_format=fmt)
    base_loss = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
    loss = DeepSupervisionLoss(base_loss, weight_mode="exp") if deep_supervision else base_loss
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3)
    return network, loss, optimizer, (fmt if channels_last else None), sum(p.numel() for p in network.parameters())


def step(variant, x, y) -> float:
    network, loss_fn, optimizer, fmt, _ = variant
    start = time.perf_counter()
    logits = network(x.contiguous(memory_format=fmt) if fmt is not None else x)
    logits = [t.float() for t in logits] if isinstance(logits, (list, tuple)) else logits.float()
    loss = loss_fn(logits, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, choices=(2, 3), default=2)
    parser.add_argument("--patch", type=int, nargs="+", default=[224, 256])
    parser.add_argument("--batch", type=int, default=8, help="patches a step (volumes x patches per volume)")
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 24, 32], help="widths at full resolution")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    cap = {16: 128, 24: 192, 32: 256}
    names, variants = [], []
    for base in args.widths:
        for ds in (False, True):
            for cl in ((False, True) if base == args.widths[0] and not ds else (False,)):
                names.append(f"width {base}{' deep-sup' if ds else ''}{' channels-last' if cl else ''}")
                variants.append(make_variant(args.dims, args.patch, base, cap.get(base, base * 8), ds, cl,
                                             args.classes))
    x = torch.randn(args.batch, 1, *args.patch)
    y = torch.randint(0, args.classes, (args.batch, 1, *args.patch)).float()  # DeepSupervisionLoss resizes it
    times = {n: [] for n in names}
    for i in range(args.warmup + args.steps):
        for name, variant in zip(names, variants):
            seconds = step(variant, x, y)
            if i >= args.warmup:
                times[name].append(seconds)
    reference = statistics.median(times[names[0]])
    rows = [{"variant": n, "parameters": v[4], "step_s": round(statistics.median(times[n]), 3),
             "vs_first": round(statistics.median(times[n]) / reference, 2)} for n, v in zip(names, variants)]
    print(json.dumps({"bench": "step_variants", "date": date.today().isoformat(), "cpu": cpu_name(),
                      "threads": torch.get_num_threads(), "dims": args.dims, "patch": args.patch,
                      "batch": args.batch, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
