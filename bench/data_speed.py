"""Can the training loader keep the model busy? Loader batches per second vs training steps per second.

Both are measured alone, on the same data and settings (the `data:` and `model:` sections of a config):
- loader: batches per second out of `NiftiDataModule.train_dataloader()` (cache filled beforehand, first batch
  and worker start-up not counted);
- model: AttentionUNet forward + DiceCE loss + backward + AdamW step per second, on batches from that loader
  held in memory.
A ratio (loader / model) of 2 or more leaves the loader room while it shares the CPU with training.

    python bench/data_speed.py --config configs/hippocampus.yaml
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import yaml
from monai.losses import DiceCELoss

from seg.data import NiftiDataModule
from seg.models import AttentionUNet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/hippocampus.yaml", help="LightningCLI config with data: / model:")
    parser.add_argument("--root", default=None, help="dataset folder (default: the config's data.root)")
    parser.add_argument("--seconds", type=float, default=30.0, help="time spent measuring each of the two rates")
    args = parser.parse_args()

    config = yaml.safe_load(Path(args.config).read_text())
    data = dict(config["data"], check=False)
    if args.root:
        data["root"] = args.root
    model_config = config.get("model", {})

    load_before = os.getloadavg()[0]  # a shared machine: other jobs slow both measurements
    started = time.perf_counter()
    datamodule = NiftiDataModule(**data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    setup_s = time.perf_counter() - started
    print(f"setup (fingerprint, split, cache fill): {setup_s:.1f} s", file=sys.stderr)

    loader = datamodule.train_dataloader()
    batches = iter(itertools.chain.from_iterable(itertools.repeat(loader)))  # epochs back to back
    kept = [next(batches)]  # worker start-up and first batch: not timed
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < args.seconds:
        batch = next(batches)
        count += 1
        if len(kept) < 8:
            kept.append(batch)
    loader_batches, loader_rate = count, count / (time.perf_counter() - started)
    print(f"loader: {count} batches, {loader_rate:.2f}/s", file=sys.stderr)
    del batches, loader  # stop the workers before timing the model

    model = AttentionUNet(datamodule.hparams.spatial_dims, datamodule.in_channels, datamodule.num_classes,
                          model_config.get("channels", (16, 32, 64, 128)), model_config.get("strides", (2, 2, 2)))
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=model_config.get("lr", 3e-3),
                                  weight_decay=model_config.get("weight_decay", 3e-5))
    held = [(b["image"].as_tensor(), b["label"].as_tensor()) for b in kept]

    def step(image, label):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(image), label)
        loss.backward()
        optimizer.step()

    model.train()
    step(*held[0])  # warm-up (allocator, kernels)
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < args.seconds:
        step(*held[count % len(held)])
        count += 1
    steps, step_rate = count, count / (time.perf_counter() - started)
    print(f"model: {count} steps, {step_rate:.2f}/s", file=sys.stderr)

    print(json.dumps({
        "config": args.config,
        "root": data["root"],
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],  # before, after
        "torch_threads": torch.get_num_threads(),
        "spatial_dims": datamodule.hparams.spatial_dims,
        "patch_size": list(datamodule.hparams.patch_size),
        "patches_per_batch": int(held[0][0].shape[0]),
        "num_workers": datamodule.hparams.num_workers,
        "train_cases": len(datamodule.split.train),
        "setup_s": round(setup_s, 2),
        "loader_batches_timed": loader_batches,
        "loader_batches_per_s": round(loader_rate, 3),
        "train_steps_timed": steps,  # at least one; few when a step is slow (the rate is then coarse)
        "train_steps_per_s": round(step_rate, 3),
        "loader_to_step_ratio": round(loader_rate / step_rate, 2),
    }, indent=1))


if __name__ == "__main__":
    main()
