"""Two runs on the same held-out cases, compared case by case: is a difference in mean Dice more than noise?

    python bench/paired_cases.py BASE/per_case.csv NEW/per_case.csv [--names base new]

Both files are `seg evaluate`'s per_case.csv for the same cases (predictions of two checkpoints). For each class
and for the mean over classes it prints both means, the mean of the per-case differences (new - base) with its
95% t interval, and how many cases got better, worse or stayed within 0.001. Only cases scored in both files
count; a class missing from a prediction counts with the Dice 0 that `seg evaluate` gives it, never as skipped. A
class absent from both the label and a prediction has no Dice (`seg evaluate`): that case is left out of that
class's comparison, and the row's case count says so.

Why paired: the held-out cases differ far more from one another than two recipes do, so the spread of each mean
hides a small change that the per-case differences show (or show to be noise).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablation import interval  # noqa: E402

SAME = 0.001  # a per-case change smaller than this counts as unchanged


def read_per_case(path: Path) -> dict[str, dict[str, float | None]]:
    """{case: {class: Dice or None}} of the cases `seg evaluate` scored ("ok"); None: absent from both sides."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    classes = [c.removeprefix("dice_") for c in (rows[0].keys() if rows else []) if c.startswith("dice_")]
    if not classes:
        raise SystemExit(f"{path}: no dice_<class> columns: not a seg evaluate per_case.csv")
    return {r["case"]: {c: float(r[f"dice_{c}"]) if r[f"dice_{c}"] else None for c in classes}
            for r in rows if r.get("status") == "ok"}


def _pair(base: dict, new: dict, name: str, classes: list[str]) -> tuple[float, float] | None:
    """One case's (base, new) score for a class, or for "mean" the mean over the classes both runs scored."""
    shown = [c for c in (classes if name == "mean" else [name]) if base[c] is not None and new[c] is not None]
    if not shown:
        return None
    return sum(base[c] for c in shown) / len(shown), sum(new[c] for c in shown) / len(shown)


def compare(base: dict[str, dict], new: dict[str, dict]) -> list[dict]:
    """One row per class and one for the mean over classes, over the cases both runs scored."""
    cases = sorted(set(base) & set(new))
    if not cases:
        raise SystemExit("the two files share no scored case")
    classes = list(base[cases[0]])
    if list(new[cases[0]]) != classes:
        raise SystemExit(f"the two files score other classes: {classes} against {list(new[cases[0]])}")
    rows = []
    for name in [*classes, "mean"]:
        pairs = [p for p in (_pair(base[c], new[c], name, classes) for c in cases) if p is not None]
        if not pairs:
            continue  # absent from every label and both predictions: nothing to compare
        b, n = [x for x, _ in pairs], [y for _, y in pairs]
        diffs = [y - x for x, y in pairs]
        mean, half = interval(diffs)
        rows.append({"class": name, "cases": len(pairs), "base": sum(b) / len(b), "new": sum(n) / len(n),
                     "difference": mean, "half_width": half,
                     "better": sum(d > SAME for d in diffs), "worse": sum(d < -SAME for d in diffs)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base", type=Path, help="the reference run's per_case.csv")
    parser.add_argument("new", type=Path, help="the changed run's per_case.csv")
    parser.add_argument("--names", nargs=2, default=("base", "new"), help="what to call the two runs")
    args = parser.parse_args()
    rows = compare(read_per_case(args.base), read_per_case(args.new))
    base, new = args.names
    print(f"| class | cases | {base} | {new} | {new} - {base} (95% interval) | better / worse |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['class']} | {r['cases']} | {r['base']:.4f} | {r['new']:.4f} | "
              f"{r['difference']:+.4f} ± {r['half_width']:.4f} | {r['better']} / {r['worse']} |")


if __name__ == "__main__":
    main()
