"""Does the attention earn its place? The same network with and without gates and CBAM, under one CPU budget.

On the shared hippocampus cases, split once (train / held out, seed 0, as `bench/hippocampus_accuracy.py`), every
run gets the same wall-clock budget on the same machine, one after the other:
  plain   `seg fit --config configs/hippocampus.yaml --model.gates false --model.cbam false`
  gates   `--model.cbam false`            cbam   `--model.gates false`            both   (the default)
  monai_attention, monai_unet: MONAI's AttentionUnet and UNet (`../shared/bench/monai_reference_hippocampus.py`)
each with every seed of `--seeds` (`--seed_everything`; the MONAI script under `runpy` with its seed rebound).
For each run: held-out Dice per class (`seg test --ckpt_path best`, or the MONAI script's own scoring), training
steps, seconds per step, parameters. For gated variants also the attention concentration per gate level on the
held-out cases (`seg overlays`), and for the first seed the sanity checks: the same network untrained (weights as
initialised) and with its gates re-randomised (`seg.explain.sanity.randomize_gates`).
Writes OUT/runs.jsonl (one line per run, appended as they finish: an interrupted benchmark resumes, skipping the
runs already there) and prints a summary per variant: mean and 95% confidence interval (t distribution) over seeds,
and the mean Dice's difference to the plain U-Net paired by seed, with its interval.

usage: python bench/ablation.py [--minutes 6] [--seeds 0,1,2] [--variants plain,gates,cbam,both,monai_attention,
       monai_unet] [--test-cases 40] [--out runs/bench_ablation]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from hippocampus_accuracy import SHARED, make_split, run_monai, run_seg  # noqa: E402

VARIANTS = {
    "plain": ("--model.gates", "false", "--model.cbam", "false"),
    "gates": ("--model.cbam", "false"),
    "cbam": ("--model.gates", "false"),
    "both": (),
}
MONAI = {"monai_attention": "attention", "monai_unet": "unet"}
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def concentration(checkpoint: Path, test_dir: Path, out: Path) -> dict[str, float]:
    """Mean concentration per gate level over the held-out cases (`seg overlays ... --labels`)."""
    subprocess.run([sys.executable, "-m", "seg", "overlays", "--checkpoint", str(checkpoint), "--input",
                    str(test_dir / "imagesTr"), "--labels", str(test_dir / "labelsTr"), "--output", str(out)],
                   check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    values: dict[str, list[float]] = {}
    with open(out / "concentration.csv") as f:
        for row in csv.DictReader(f):
            if row["level"].startswith("gate_") and row["concentration"] not in ("", "nan"):
                values.setdefault(row["level"], []).append(float(row["concentration"]))
    return {level: round(float(np.mean(v)), 3) for level, v in sorted(values.items())}


def control_checkpoint(best: Path, out: Path, how: str, seed: int = 0) -> Path:
    """A copy of `best` with the network untrained (`how="untrained"`: every weight freshly initialised under
    `seed`) or with its gates re-randomised (`how="randomised"`); everything else in the file kept."""
    from seg.explain.sanity import randomize_gates
    from seg.inference.checkpoint import build_network

    checkpoint = torch.load(best, map_location="cpu", weights_only=True)
    network = build_network(dict(checkpoint["hyper_parameters"]))
    weights = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    if how == "untrained":
        torch.manual_seed(seed)
        network = build_network(dict(checkpoint["hyper_parameters"]))
    else:
        network.load_state_dict(weights)
        network = randomize_gates(network, seed)
    checkpoint["state_dict"] = {f"model.{k}": v for k, v in network.state_dict().items()}
    path = out / f"{how}.ckpt"
    torch.save(checkpoint, path)
    return path


def parameters(checkpoint: Path) -> int:
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    return int(sum(v.numel() for k, v in state.items() if k.startswith("model.") and v.is_floating_point()))


def run_one(variant: str, seed: int, train_dir: Path, test_dir: Path, out: Path, minutes: float,
            sanity: bool) -> dict:
    if variant in MONAI:
        result = run_monai(train_dir, test_dir, minutes, kind=MONAI[variant], seed=seed)
        return {"variant": variant, "seed": seed, "steps": result["steps"],
                "seconds_per_step": round(result["train_s"] / max(result["steps"], 1), 3),
                "parameters": int(round(result["params_M"] * 1e6)),
                **{k: result[k] for k in ("dice_anterior", "dice_posterior", "dice_mean")}}
    name = f"{variant}_seed{seed}"
    result = run_seg(train_dir, out, minutes, extra_args=(*VARIANTS[variant], "--seed_everything", str(seed),
                                                           "--overlays.every_n_epochs", "0"), name=name)
    run_dir = Path(result["run_dir"])
    best = run_dir / "checkpoints" / "best.ckpt"
    row = {"variant": variant, "seed": seed, "steps": result["steps"],
           # the budget over the steps, as the MONAI script's train_s / steps (start-up and final scoring left out)
           "seconds_per_step": round(minutes * 60 / max(result["steps"], 1), 3),
           "parameters": parameters(best),
           **{k: result[k] for k in ("dice_anterior", "dice_posterior", "dice_mean", "hd95_mean_mm")}}
    if variant in ("gates", "both"):
        row["concentration"] = concentration(best, test_dir, run_dir / "heldout_overlays")
        if sanity:
            for how in ("untrained", "randomised"):
                control = control_checkpoint(best, run_dir, how, seed)
                row[f"concentration_{how}"] = concentration(control, test_dir, run_dir / f"heldout_overlays_{how}")
    return row


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval (t distribution; NaN for one value)."""
    mean = float(np.mean(values))
    if len(values) < 2:
        return mean, float("nan")
    return mean, T_975.get(len(values) - 1, 1.96) * float(np.std(values, ddof=1)) / math.sqrt(len(values))


def summarise(rows: list[dict], reference: str = "plain") -> list[dict]:
    """One entry per variant: means over seeds with 95% intervals, and the mean Dice's difference to `reference`
    paired by seed (the variants of one seed share a machine and its load: the pairing takes that out)."""
    table = []
    dice = {(r["variant"], r["seed"]): r["dice_mean"] for r in rows}
    for variant in dict.fromkeys(r["variant"] for r in rows):
        runs = [r for r in rows if r["variant"] == variant]
        entry = {"variant": variant, "seeds": len(runs), "parameters": runs[0]["parameters"],
                 "steps": round(float(np.mean([r["steps"] for r in runs]))),
                 "seconds_per_step": round(float(np.mean([r["seconds_per_step"] for r in runs])), 3)}
        for key in ("dice_anterior", "dice_posterior", "dice_mean"):
            mean, half = interval([r[key] for r in runs])
            entry[key] = f"{mean:.4f} ± {half:.4f}"
        paired = [r["dice_mean"] - dice[(reference, r["seed"])] for r in runs if (reference, r["seed"]) in dice]
        if variant != reference and paired:
            mean, half = interval(paired)
            entry[f"dice_mean_minus_{reference}"] = f"{mean:+.4f} ± {half:.4f} ({len(paired)} seeds)"
        for prefix in ("concentration", "concentration_untrained", "concentration_randomised"):
            with_maps = [r[prefix] for r in runs if r.get(prefix)]
            for level in sorted({lv for maps in with_maps for lv in maps}):
                values = [maps[level] for maps in with_maps if level in maps]
                entry[f"{prefix}_{level}"] = f"{np.mean(values):.2f} ({len(values)} seeds)"
        table.append(entry)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=6.0, help="training budget of every run")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--variants", default="plain,gates,cbam,both,monai_attention,monai_unet")
    parser.add_argument("--test-cases", type=int, default=40)
    parser.add_argument("--data", type=Path, default=SHARED / "data" / "hippocampus")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_ablation")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS and v not in MONAI]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {[*VARIANTS, *MONAI]}")
    train_dir, test_dir = make_split(args.data, args.out, args.test_cases, seed=0)
    log = args.out / "runs.jsonl"
    done = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    for seed in seeds:  # seeds outermost: a cut-short benchmark still has every variant at the first seeds
        for variant in variants:
            if any(r["variant"] == variant and r["seed"] == seed and r.get("minutes") == args.minutes for r in done):
                continue
            row = {**run_one(variant, seed, train_dir, test_dir, args.out, args.minutes,
                                 sanity=seed == seeds[0]), "minutes": args.minutes}
            done.append(row)
            with open(log, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    rows = [r for r in done if r.get("minutes") == args.minutes and r["variant"] in variants and r["seed"] in seeds]
    for entry in summarise(rows):
        print(json.dumps(entry, ensure_ascii=False), flush=True)


if __name__ == "__main__":
    main()
