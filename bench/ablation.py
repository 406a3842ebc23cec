"""Does the attention earn its place? The same network with and without gates and CBAM, under one CPU budget.

`--dataset hippocampus`: the shared hippocampus cases, split once (train / held out, seed 0, as
`bench/hippocampus_accuracy.py`), trained from `configs/hippocampus.yaml`. `--dataset acdc`: the shared ACDC volumes
split by patient (`bench/acdc.py`'s 10 held-out patients, seed 0), trained by the default command
(`seg fit --data.root TRAIN`, planned for the budget), where thin structures (myocardium, right ventricle) are
where attention should matter. Every run gets the same wall-clock budget on the same machine, one after the other:
  plain   `--model.gates false --model.cbam false`
  gates   `--model.cbam false`            cbam   `--model.gates false`            both   (the default)
  monai_attention, monai_unet (hippocampus only): MONAI's AttentionUnet and UNet
  (`../shared/bench/monai_reference_hippocampus.py`)
each with every seed of `--seeds` (`--seed_everything`; the MONAI script under `runpy` with its seed rebound).
For each run: held-out Dice per class (`seg test --ckpt_path best`, or the MONAI script's own scoring), training
steps, seconds per step, parameters. For gated variants also, per gate level on the held-out scans (`seg overlays`):
the attention concentration and the share of the map's mass inside each class dilated by 2 mm
(`seg.explain.concentration.class_energy_share`); for the first seed the sanity checks: the same network untrained
(weights as initialised) and with its gates re-randomised (`seg.explain.sanity.randomize_gates`).
Writes OUT/runs.jsonl (one line per run, appended as they finish: an interrupted benchmark resumes, skipping the
runs already there) and prints a summary per variant: mean and 95% confidence interval (t distribution) over seeds,
and the mean Dice's difference to the plain U-Net paired by seed, with its interval.

usage: python bench/ablation.py [--dataset hippocampus|acdc] [--minutes 6 (hippocampus) | 15 (acdc)] [--seeds 0,1,2]
       [--variants plain,gates,cbam,both[,monai_attention,monai_unet]] [--test-cases 40 | 10 patients]
       [--out runs/bench_ablation]
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
from scipy import stats

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import acdc  # noqa: E402
from hippocampus_accuracy import SHARED, make_split, run_monai, run_seg  # noqa: E402

VARIANTS = {
    "plain": ("--model.gates", "false", "--model.cbam", "false"),
    "gates": ("--model.cbam", "false"),
    "cbam": ("--model.gates", "false"),
    "both": (),
}
MONAI = {"monai_attention": "attention", "monai_unet": "unet"}


def gate_scores(checkpoint: Path, images: Path, labels: Path, out: Path) -> tuple[dict, dict]:
    """Per gate level, the mean over the held-out scans (`seg overlays ... --labels`) of the attention concentration,
    and of each class's share of the map's mass: `({level: concentration}, {level: {class: share}})`."""
    subprocess.run([sys.executable, "-m", "seg", "overlays", "--checkpoint", str(checkpoint), "--input",
                    str(images), "--labels", str(labels), "--output", str(out)],
                   check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return read_gate_scores(out / "concentration.csv")


def read_gate_scores(path: Path) -> tuple[dict, dict]:
    """`gate_scores` from a `concentration.csv`: NaN (a class absent from a scan) is left out of the means."""
    values: dict[str, list[float]] = {}
    shares: dict[str, dict[str, list[float]]] = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            if not row["level"].startswith("gate_"):
                continue
            if row["concentration"] not in ("", "nan"):
                values.setdefault(row["level"], []).append(float(row["concentration"]))
            for key, value in row.items():
                if key.startswith("energy_") and value not in ("", "nan"):
                    shares.setdefault(row["level"], {}).setdefault(key.removeprefix("energy_"), []).append(float(value))
    return ({level: round(float(np.mean(v)), 3) for level, v in sorted(values.items())},
            {level: {c: round(float(np.mean(v)), 4) for c, v in per_class.items()}
             for level, per_class in sorted(shares.items())})


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


def row_head(variant: str, seed: int, steps: int, minutes: float, best: Path) -> dict:
    """The columns every seg row starts with. Seconds per step are the budget over the steps, as the MONAI
    script's train_s / steps (start-up and final scoring left out)."""
    return {"variant": variant, "seed": seed, "steps": steps,
            "seconds_per_step": round(minutes * 60 / max(steps, 1), 3), "parameters": parameters(best)}


def run_one(variant: str, seed: int, train_dir: Path, test_dir: Path, out: Path, minutes: float,
            sanity: bool, dataset: str = "hippocampus") -> dict:
    """One training of `variant` under `seed`, scored on the held-out scans. `dataset="acdc"`: `train_dir` is
    `bench/acdc.py`'s split folder (held-out volumes in its imagesTs / labelsTs) and `test_dir` is not used."""
    if dataset == "acdc":
        return run_one_acdc(variant, seed, train_dir, out, minutes, sanity)
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
    row = {**row_head(variant, seed, result["steps"], minutes, best),
           **{k: result[k] for k in ("dice_anterior", "dice_posterior", "dice_mean", "hd95_mean_mm")}}
    return row | attention_scores(variant, seed, best, test_dir / "imagesTr", test_dir / "labelsTr", run_dir, sanity)


def run_one_acdc(variant: str, seed: int, data: Path, out: Path, minutes: float, sanity: bool) -> dict:
    """`bench/acdc.py`'s default command with the variant's switches: held-out Dice per class (LV, MYO, RV)."""
    run_dir = out / f"{variant}_seed{seed}"
    result = acdc.fit_and_test(data, run_dir, minutes, (*VARIANTS[variant], "--seed_everything", str(seed),
                                                         "--overlays.every_n_epochs", "0"))
    best = run_dir / "checkpoints" / "best.ckpt"
    row = {**row_head(variant, seed, result["steps"], minutes, best),
           **{f"dice_{c}": v for c, v in result["test_dice"].items()}, "dice_mean": result["test_dice_mean"]}
    return row | attention_scores(variant, seed, best, data / "imagesTs", data / "labelsTs", run_dir, sanity)


def attention_scores(variant: str, seed: int, best: Path, images: Path, labels: Path, run_dir: Path,
                     sanity: bool) -> dict:
    """For a gated variant, `concentration` and `energy` per gate level on the held-out scans; with `sanity`, the
    same for the untrained and the gate-randomised controls (`concentration_untrained`, `energy_randomised`, ...)."""
    if variant not in ("gates", "both"):
        return {}
    scores = dict(zip(("concentration", "energy"), gate_scores(best, images, labels, run_dir / "heldout_overlays")))
    if sanity:
        for how in ("untrained", "randomised"):
            control = control_checkpoint(best, run_dir, how, seed)
            found = gate_scores(control, images, labels, run_dir / f"heldout_overlays_{how}")
            scores |= {f"concentration_{how}": found[0], f"energy_{how}": found[1]}
    return scores


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval (t distribution; NaN for one value)."""
    mean = float(np.mean(values))
    if len(values) < 2:
        return mean, float("nan")
    return mean, float(stats.t.ppf(0.975, len(values) - 1)) * float(np.std(values, ddof=1)) / math.sqrt(len(values))


def seed_means(per_seed: list[dict | None], prefix: str, decimals: int) -> dict:
    """`{prefix_key: "mean (n seeds)"}` over the seeds whose dict has the key (a missing or empty dict counts none)."""
    maps = [m for m in per_seed if m]
    means = {}
    for key in sorted({k for m in maps for k in m}, key=str):
        values = [m[key] for m in maps if key in m]
        means[f"{prefix}_{key}"] = f"{np.mean(values):.{decimals}f} ({len(values)} seeds)"
    return means


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
        for key in [k for k in runs[0] if k.startswith("dice_")]:  # per class, then the mean
            mean, half = interval([r[key] for r in runs if key in r])
            entry[key] = f"{mean:.4f} ± {half:.4f}"
        paired = [r["dice_mean"] - dice[(reference, r["seed"])] for r in runs if (reference, r["seed"]) in dice]
        if variant != reference and paired:
            mean, half = interval(paired)
            entry[f"dice_mean_minus_{reference}"] = f"{mean:+.4f} ± {half:.4f} ({len(paired)} seeds)"
        for control in ("", "_untrained", "_randomised"):
            entry |= seed_means([r.get("concentration" + control) for r in runs], "concentration" + control, 2)
            # energy is {level: {class: share}}: flattened to "level_class" it averages as concentration does
            energy = [{f"{level}_{name}": share for level, shares in maps.items() for name, share in shares.items()}
                      for maps in (r.get("energy" + control) for r in runs) if maps]
            entry |= seed_means(energy, "energy" + control, 3)
        table.append(entry)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=("hippocampus", "acdc"), default="hippocampus")
    parser.add_argument("--minutes", type=float, default=None,
                        help="training budget of every run (default 6 for hippocampus, 15 for acdc)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--variants", default=None,
                        help="default: plain,gates,cbam,both (and monai_attention,monai_unet for hippocampus)")
    parser.add_argument("--test-cases", type=int, default=None,
                        help="held-out cases (hippocampus, default 40) or patients (acdc, default 10)")
    parser.add_argument("--data", type=Path, default=None, help="default: ../shared/data/<dataset>")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_ablation")
    args = parser.parse_args()
    hippocampus = args.dataset == "hippocampus"
    args.minutes = args.minutes if args.minutes is not None else 6.0 if hippocampus else 15.0
    args.data = args.data or SHARED / "data" / args.dataset
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = (args.variants or ",".join([*VARIANTS, *(MONAI if hippocampus else ())])).split(",")
    unknown = [v for v in variants if v not in VARIANTS and not (hippocampus and v in MONAI)]
    if unknown:
        parser.error(f"unknown variants {unknown} for {args.dataset}; choose from "
                     f"{[*VARIANTS, *(MONAI if hippocampus else ())]}")
    if hippocampus:
        train_dir, test_dir = make_split(args.data, args.out, args.test_cases or 40, seed=0)
    else:
        train_dir, _ = acdc.make_split(args.data, args.out, args.test_cases or 10, seed=0)
        test_dir = train_dir
    log = args.out / "runs.jsonl"
    done = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    for seed in seeds:  # seeds outermost: a cut-short benchmark still has every variant at the first seeds
        for variant in variants:
            if any(r["variant"] == variant and r["seed"] == seed and r.get("minutes") == args.minutes
                   and r.get("dataset", "hippocampus") == args.dataset for r in done):
                continue
            row = {**run_one(variant, seed, train_dir, test_dir, args.out, args.minutes,
                             sanity=seed == seeds[0], dataset=args.dataset), "minutes": args.minutes,
                   "dataset": args.dataset}
            done.append(row)
            with open(log, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    rows = [r for r in done if r.get("minutes") == args.minutes and r.get("dataset", "hippocampus") == args.dataset
            and r["variant"] in variants and r["seed"] in seeds]
    for entry in summarise(rows):
        print(json.dumps(entry, ensure_ascii=False), flush=True)


if __name__ == "__main__":
    main()
