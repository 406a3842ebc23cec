"""`seg cv`: k-fold cross-validation: train every fold, predict every case with the fold that did not see it, score
those out-of-fold predictions, and choose the connected-component postprocessing on them.

    seg cv --config configs/hippocampus.yaml --folds 5 --output runs/hippo_cv [-- --trainer.max_time 00:00:04:00]
    seg cv --folds 5 -- --data.root DATASET --trainer.max_time 00:00:12:00

Without `--config`, every fold's `seg fit --data.root DATASET` plans the dataset itself (`seg plan`, for the fold's
own `--trainer.max_time`), as `seg fit` does, and writes the plan into its fold folder.

Under `--output PARENT`:
- `fold_k/`: a normal `seg fit` run folder (`--data.fold k --data.num_folds N`), and `fold_k/fit_done.json` once
  its fit has returned; a fold with that marker is not trained again, one with only `checkpoints/last.ckpt`
  resumes (`--ckpt_path last`);
- `cv.json`: the config, the folds and the extra `seg fit` options (what `seg predict --checkpoint PARENT` reads);
- once every fold is trained: `cv/predictions/<case>.nii.gz` (each training case predicted by the `best.ckpt` of the
  fold that validated on it, in the scan's own geometry) with its `summary.csv`; `cv/per_case.csv` and
  `cv/summary.json` (`seg evaluate`'s scores of those predictions); `cv/postprocessing.json` (per class, the step
  that raised the out-of-fold mean Dice, if any).
Folds run one after the other, each `seg fit` a subprocess (its memory, W&B run and seed its own). With
`--print-commands` the `seg fit` commands are printed instead, to run in parallel (a SLURM array); `seg cv` with the
same options afterwards finds them done and does the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from seg.data.layout import load_dataset, strip_nifti_suffix
from seg.data.split import load_split
from seg.errors import SegError
from seg.evaluate import DEFAULT_TOLERANCE_MM, atomic_write_text, evaluate_pairs, format_summary, read_label_map, \
    write_results
from seg.inference.ensemble import CV_MANIFEST
from seg.io import read_json
from seg.postprocessing import choose_postprocessing, measure, save_postprocessing

FIT_DONE = "fit_done.json"


def _report(line: str) -> None:
    print(f"seg cv: {line}", file=sys.stderr, flush=True)


def parse_fold_list(text: str | None, folds: int) -> list[int]:
    if text is None:
        return list(range(folds))
    try:
        chosen = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise SegError(f"--fold-list '{text}' must be fold numbers separated by commas, e.g. 0,1") from None
    bad = [k for k in chosen if not 0 <= k < folds]
    if bad or not chosen:
        raise SegError(f"--fold-list {text}: folds are 0..{folds - 1} for --folds {folds}")
    return chosen


def fit_arguments(config: Path | None, fold: int, folds: int, parent: Path, extra: list[str]) -> list[str]:
    """The `seg fit` options of one fold (without `--ckpt_path`); with no config, `seg fit` plans the dataset."""
    return [*(["--config", str(config)] if config else []), "--data.fold", str(fold), "--data.num_folds", str(folds),
            "--trainer.default_root_dir", str(parent / f"fold_{fold}"), *extra]


def fold_state(folder: Path, arguments: list[str]) -> str:
    """"done" (its fit returned), "resume" (a `last.ckpt` of an interrupted fit) or "new"."""
    marker = folder / FIT_DONE
    if marker.is_file():
        what = "this fold's completion marker; remove it to train the fold again"
        recorded = read_json(marker, what, error=SegError)
        recorded = recorded.get("arguments") if isinstance(recorded, dict) else None
        if not (isinstance(recorded, list) and all(isinstance(a, str) for a in recorded)):
            raise SegError(f"cannot read {what}", marker)
        if recorded != arguments:
            raise SegError(f"this fold was trained with other options ({shlex.join(recorded)}); give the same "
                           "options, another --output, or remove the fold's folder", marker)
        return "done"
    return "resume" if (folder / "checkpoints" / "last.ckpt").is_file() else "new"


def train_fold(fold: int, arguments: list[str], folder: Path, resume: bool) -> None:
    """Run `seg fit` for one fold in a subprocess; write the completion marker when it returns 0."""
    command = [sys.executable, "-m", "seg", "fit", *arguments, *(["--ckpt_path", "last"] if resume else [])]
    _report(f"fold {fold}: {'resuming' if resume else 'training'}: seg fit {shlex.join(command[4:])}")
    done = subprocess.run(command)
    if done.returncode != 0:
        raise SegError(f"seg fit of fold {fold} failed (exit code {done.returncode}; its messages are above); fix "
                       "that and run the same seg cv again: finished folds are kept, this one resumes", folder)
    from seg.training.checkpoint_io import load_weights_only

    last = load_weights_only(folder / "checkpoints" / "last.ckpt")
    # the dataset as the fold's seg fit resolved it (config, overrides, plan): what out-of-fold prediction reads
    root = (last.get("datamodule_hyper_parameters") or {}).get("root")
    atomic_write_text(folder / FIT_DONE, json.dumps({"fold": fold, "arguments": arguments, "data_root": root,
                                                     "epoch": last.get("epoch"),
                                                     "global_step": last.get("global_step")}, indent=1))


def write_manifest(parent: Path, config: Path | None, folds: int, extra: list[str]) -> None:
    """`cv.json`; refuses a parent folder that holds a run of another config or fold count."""
    manifest = parent / CV_MANIFEST
    config_text = str(config) if config else None  # None: every fold planned the dataset itself
    content = {"config": config_text, "num_folds": folds, "folds": list(range(folds)), "fit_arguments": extra}
    if manifest.exists():
        old = read_json(manifest, f"the {CV_MANIFEST} of an earlier run (remove it, or choose another --output)",
                        error=SegError)
        if isinstance(old, dict) and (old.get("num_folds"), old.get("config")) != (folds, config_text):
            raise SegError(f"holds a {old.get('num_folds')}-fold run of {old.get('config') or 'a planned dataset'}; "
                           "choose another --output for this one", manifest)
    parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(manifest, json.dumps(content, indent=1))


def fold_checkpoint(folder: Path) -> Path:
    """A fold's `best.ckpt` (highest validation Dice), or its `last.ckpt` when it never validated."""
    best = folder / "checkpoints" / "best.ckpt"
    if best.is_file():
        return best
    last = folder / "checkpoints" / "last.ckpt"
    if not last.is_file():
        raise SegError("fold has no checkpoint; train it first", folder)
    _report(f"{folder.name}: no best.ckpt (it never validated): out-of-fold prediction with last.ckpt")
    return last


def validation_cases(parent: Path, folds: int) -> tuple[dict[int, list[str]], Path]:
    """Each fold's validation cases (from its `split.json`), checked to hold every case once; and the dataset root."""
    roots = {json.loads((parent / f"fold_{k}" / FIT_DONE).read_text()).get("data_root") for k in range(folds)}
    if len(roots) != 1 or None in roots:
        raise SegError(f"the folds were trained on different datasets ({sorted(map(str, roots))}); train every fold "
                       "on one", parent)
    root = Path(roots.pop())
    ids = {c.case_id for c in load_dataset(root).cases}
    by_fold, seen = {}, {}
    for k in range(folds):
        path = parent / f"fold_{k}" / "split.json"
        split = load_split(path)
        for case_id in split.val:
            if case_id in seen:
                raise SegError(f"case '{case_id}' is validated by fold {seen[case_id]} and fold {k}: the folds were "
                               "not cut from one split; train them with the same seed and --folds", path)
            seen[case_id] = k
        by_fold[k] = list(split.val)
    missing = sorted(ids - set(seen))
    if missing:
        raise SegError(f"cases {missing[:5]} are validated by no fold (the dataset changed since training?)", root)
    return by_fold, root


def _link_inputs(cases, folder: Path) -> None:
    """Symbolic links named by case id (`<case>.nii.gz`, `<case>_0000.nii.gz` per channel) to the cases' images."""
    folder.mkdir(parents=True)
    for case in cases:
        for channel, image in enumerate(case.images):
            suffix = image.name[len(strip_nifti_suffix(image.name)):]
            name = case.case_id if len(case.images) == 1 else f"{case.case_id}_{channel:04d}"
            (folder / f"{name}{suffix}").symlink_to(image.resolve())


def _swap_into_place(staging: Path, target: Path) -> None:
    old = target.with_name(f".old-{os.getpid()}-{target.name}")
    if target.exists():
        os.replace(target, old)
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)


def out_of_fold(parent: Path, folds: int, device: str, tolerance_mm: float) -> dict:
    """Predict every case with the fold that validated on it, score the predictions, choose the postprocessing."""
    from seg.inference.folder import predict_folder
    from seg.inference.outputs import SUMMARY, write_summary
    from seg.inference.predictor import Predictor

    by_fold, root = validation_cases(parent, folds)
    info = load_dataset(root)
    cases = {c.case_id: c for c in info.cases}
    out = parent / "cv"
    out.mkdir(parents=True, exist_ok=True)
    staging = out / f".predictions-{os.getpid()}"
    results, checkpoints = [], {}
    try:
        for k, val in by_fold.items():
            checkpoint = fold_checkpoint(parent / f"fold_{k}")
            checkpoints[k] = str(checkpoint)
            inputs = out / f".inputs-{os.getpid()}-fold_{k}"
            try:
                _link_inputs([cases[i] for i in val], inputs)
                _report(f"fold {k}: predicting its {len(val)} validation cases with {checkpoint}")
                predictor = Predictor.from_checkpoint(checkpoint, device=device)
                results += predict_folder(predictor, inputs, staging, progress=False)
            finally:
                shutil.rmtree(inputs, ignore_errors=True)
        write_summary(sorted(results, key=lambda r: r.case_id), staging / SUMMARY, predictor.class_names)
        _swap_into_place(staging, out / "predictions")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    predictions = out / "predictions"
    classes = {v: n for v, n in info.labels.items() if v}
    pairs = [(i, predictions / f"{i}.nii.gz" if (predictions / f"{i}.nii.gz").is_file() else None, cases[i].label)
             for i in sorted(cases)]
    scored = evaluate_pairs(pairs, list(classes), tolerance_mm, _report)
    summary = write_results(scored, classes, out, tolerance_mm,
                            {"predictions": str(predictions), "folds": folds, "checkpoints": checkpoints})
    measured = []
    for case in scored:
        if case.ok:
            prediction, affine = read_label_map(case.prediction)
            label, _ = read_label_map(case.label)
            measured.append(measure(prediction, label, affine, list(classes)))
    plan = choose_postprocessing(measured, classes)
    save_postprocessing(plan, out / "postprocessing.json")
    for line in format_summary(summary):
        _report(f"out of fold: {line}")
    for value, choice in plan["classes"].items():
        kept = choice["step"] or "none"
        if choice["min_ml"] is not None:
            kept += f" < {choice['min_ml']:.4g} ml"
        _report(f"postprocessing {choice['name']}: {kept} (mean Dice {choice['dice_before']} -> {choice['dice_after']})")
    return summary


# ---- command line ----------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None,
                        help="the seg fit YAML config every fold trains with (default: none, and every fold plans "
                             "the dataset of -- --data.root DATASET itself, as seg fit --data.root does, for its "
                             "--trainer.max_time)")
    parser.add_argument("--folds", type=int, default=5, help="number of folds (default 5)")
    parser.add_argument("--fold-list", default=None, help="train only these folds, e.g. 0,1 (default: all)")
    parser.add_argument("--output", default=None,
                        help="parent folder of the fold runs (fold_k/) and of cv/ (default: runs/cv_<config or dataset "
                             "name>)")
    parser.add_argument("--print-commands", action="store_true",
                        help="print one seg fit command per fold (to run in parallel) instead of training")
    parser.add_argument("--device", default="auto", help="for the out-of-fold predictions: auto, cpu or cuda")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE_MM,
                        help=f"surface Dice tolerance in mm (default {DEFAULT_TOLERANCE_MM})")
    parser.add_argument("fit_args", nargs="*", metavar="-- SEG_FIT_OPTIONS",
                        help="after --: options for every fold's seg fit, e.g. -- --trainer.max_epochs 100")


def option_value(args: list[str], name: str) -> str | None:
    """The value of `--name value` or `--name=value` in `args` (the last one given), or None."""
    value = None
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(f"{name}="):
            value = arg.split("=", 1)[1]
    return value


def run(args: argparse.Namespace) -> int:
    extra = list(args.fit_args)
    config = None
    data_root = option_value(extra, "--data.root")
    if args.config is not None:
        config = Path(args.config).resolve()
        if not config.is_file():
            raise SegError("config not found", args.config)
    elif data_root is None:
        raise SegError("give --config CONFIG, or the dataset for every fold to plan itself: seg cv -- --data.root "
                       "DATASET [--trainer.max_time DD:HH:MM:SS]")
    if args.folds < 2:
        raise SegError(f"--folds must be at least 2, got {args.folds}")
    chosen = parse_fold_list(args.fold_list, args.folds)
    name = config.stem if config else Path(data_root).resolve().name
    parent = Path(args.output or f"runs/cv_{name}").resolve()
    for option in ("--data.fold", "--data.num_folds", "--trainer.default_root_dir", "--ckpt_path", "--config"):
        if any(a == option or a.startswith(f"{option}=") for a in extra):
            raise SegError(f"{option} is set by seg cv for every fold; use --folds, --fold-list, --output and "
                           "--config instead")
    if args.print_commands:
        for k in chosen:
            print(shlex.join(["seg", "fit", *fit_arguments(config, k, args.folds, parent, extra)]))
        return 0
    write_manifest(parent, config, args.folds, extra)
    for k in chosen:
        arguments = fit_arguments(config, k, args.folds, parent, extra)
        folder = parent / f"fold_{k}"
        state = fold_state(folder, arguments)
        if state == "done":
            _report(f"fold {k}: trained already ({folder / FIT_DONE}), kept")
            continue
        train_fold(k, arguments, folder, resume=state == "resume")
    untrained = [k for k in range(args.folds)
                 if fold_state(parent / f"fold_{k}", fit_arguments(config, k, args.folds, parent, extra)) != "done"]
    if untrained:
        _report(f"folds {untrained} are not trained yet: the out-of-fold scores follow once all {args.folds} are "
                "(run seg cv again without --fold-list)")
        return 0
    summary = out_of_fold(parent, args.folds, args.device, args.tolerance)
    _report(f"{summary['cases']} out-of-fold cases scored: {parent / 'cv' / 'summary.json'}; ensemble: seg predict "
            f"--checkpoint {parent} --input SCANS --output OUT")
    return 1 if summary["failed"] else 0
