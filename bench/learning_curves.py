"""Learning curves of timed runs: Dice against minutes of training, validation and training patches, and held-out.

Each run is given as `LABEL=RUN_DIR[:HELD_OUT_JSON]`: RUN_DIR is a `seg fit` run folder (its `csv/version_0/metrics.csv`
holds `val/dice_mean`, `train/dice_<class>` per epoch and the step of each); HELD_OUT_JSON is the JSON a bench
printed for it (`bench/acdc.py`, `bench/hippocampus_accuracy.py`, `bench/nnunet_budget.py`): its held-out mean Dice is
drawn at the run's budget. Minutes along a run are its steps times the budget's mean time a step (budget / steps):
the CSV logger keeps steps, not clock times, so validation pauses are spread evenly. A bench JSON without a run
folder (nnU-Net's) adds held-out points only.

    python bench/learning_curves.py --title "ACDC, 2 CPU cores" --out bench/results/acdc_learning_curve.png \
        "seg 15 min=runs/acdc15/run:runs/acdc15.json" "nnU-Net=:runs/nnunet_acdc.json"
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def last_json(text: str) -> dict:
    """The last JSON document in a bench's output (after its log lines): one line, or indented over many."""
    starts = [i for i in range(len(text)) if text[i] == "{" and (i == 0 or text[i - 1] == "\n")]
    for start in reversed(starts):
        try:
            return json.loads(text[start:])
        except json.JSONDecodeError:
            try:  # one JSON line among others
                return json.loads(text[start:].splitlines()[0])
            except json.JSONDecodeError:
                continue
    raise ValueError("no JSON document in the bench output")


def read_bench_json(path: Path) -> list[dict]:
    """Held-out points `{"minutes", "dice", "steps"}` from a bench's printed JSON (the last document)."""
    doc = last_json(path.read_text())
    if "runs" in doc:  # bench/nnunet_budget.py: one entry per budget
        return [{"minutes": r["minutes"], "dice": r["dice_mean"]} for r in doc["runs"]]
    dice = doc.get("test_dice_mean", doc.get("dice_mean"))
    minutes = doc.get("minutes")
    if minutes is None and doc.get("run_dir"):  # bench/hippocampus_accuracy.py: the budget is in the run's config
        minutes = budget_minutes(Path(doc["run_dir"]))
    return [{"minutes": minutes, "dice": dice, "steps": doc.get("steps")}]


def budget_minutes(run_dir: Path) -> float | None:
    """`trainer.max_time` (DD:HH:MM:SS) of a run's logged config, in minutes."""
    import yaml

    config = yaml.safe_load((run_dir / "csv" / "version_0" / "config.yaml").read_text())
    value = (config.get("trainer") or {}).get("max_time")
    if not isinstance(value, str):
        return None
    days, hours, minutes, seconds = (int(v) for v in value.split(":"))
    return days * 1440 + hours * 60 + minutes + seconds / 60


def read_metrics(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """(step, value) per metric of a run's CSV log: `val/dice_mean` and the mean of the `train/dice_*` per epoch."""
    rows = list(csv.DictReader((run_dir / "csv" / "version_0" / "metrics.csv").open()))
    series: dict[str, list[tuple[int, float]]] = {"val": [], "train": []}
    for row in rows:
        step = int(float(row["step"]))
        if row.get("val/dice_mean"):
            series["val"].append((step, float(row["val/dice_mean"])))
        train = [float(v) for k, v in row.items() if k.startswith("train/dice_") and v and not math.isnan(float(v))]
        if train:
            series["train"].append((step, sum(train) / len(train)))
    return series


def plot(runs: list[tuple[str, Path | None, list[dict]]], title: str, out: Path) -> None:
    figure, axis = plt.subplots(figsize=(10.5, 4.6), dpi=110)
    for index, (label, run_dir, held_out) in enumerate(runs):
        colour = f"C{index}"
        seconds_per_step = None
        if held_out and held_out[0].get("steps") and held_out[0].get("minutes"):
            seconds_per_step = held_out[0]["minutes"] * 60 / held_out[0]["steps"]  # the budget is training time
        if run_dir is not None and seconds_per_step:
            series = read_metrics(run_dir)
            for name, style in (("val", "-"), ("train", ":")):
                if series[name]:
                    steps, values = zip(*series[name])
                    axis.plot([s * seconds_per_step / 60 for s in steps], values, style, color=colour,
                              label=f"{label}: {'validation' if name == 'val' else 'training patches'}")
        for point in held_out:
            if point["dice"] is not None and point["minutes"] is not None:
                axis.plot(point["minutes"], point["dice"], "o", color=colour, markersize=7)
                axis.annotate(f"{point['dice']:.3f}", (point["minutes"], point["dice"]), textcoords="offset points",
                              xytext=(4, -12), fontsize=8, color=colour)
        axis.plot([], [], "o", color=colour, label=f"{label}: held out")
    axis.set_xlabel("minutes of training")
    axis.set_ylabel("mean Dice")
    axis.set_title(title, fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))  # beside: many runs would hide the curves
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="LABEL=RUN_DIR[:HELD_OUT_JSON] (RUN_DIR may be empty)")
    parser.add_argument("--title", default="")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    runs = []
    for spec in args.runs:
        label, _, rest = spec.partition("=")
        run, _, held = rest.partition(":")
        runs.append((label, Path(run) if run else None, read_bench_json(Path(held)) if held else []))
    plot(runs, args.title, args.out)
    print(args.out)


if __name__ == "__main__":
    main()
