"""`seg plan` side by side with nnU-Net v2's own planner, on the same datasets (issue 16, "Measure").

For each dataset this
  1. plans it with `seg.data.plan.plan_dataset` (CPU, the default, and optionally `--device gpu`);
  2. converts it to nnU-Net v2's raw layout (`DatasetXXX_Name/imagesTr/<case>_0000.nii.gz` per channel,
     `labelsTr/<case>.nii.gz`, `dataset.json`), with symlinks where the files can be used as they are (4D
     multi-channel files are split into one file per channel);
  3. runs nnU-Net's fingerprint extraction, planning and 3d_fullres preprocessing
     (`nnUNetv2_plan_and_preprocess -d ID -c 3d_fullres -np 1 -npfp 1 --verify_dataset_integrity`) with the
     Python of a separate virtual environment (`--nnunet-python`; nnU-Net is never a dependency of seg), with
     `nnUNet_raw` / `nnUNet_preprocessed` / `nnUNet_results` under `--work`;
  4. reads `nnUNetPlans.json` and writes one JSON file and one Markdown table of both planners' decisions.

Axis order. seg reports everything along R, A, S (after reorientation). nnU-Net reads NIfTI with SimpleITK, whose
arrays are in reversed file-index order (k, j, i), and its plans then apply `transpose_forward` (the coarsest
axis first). `ras_axes` maps each of nnU-Net's planned axes back to R, A or S through the file's affine (the world
axis each voxel axis points along), so both planners are compared along the same anatomical axes.

Datasets: the shared hippocampus (`--hippocampus`, default `../shared/data/hippocampus` next to the repository),
synthetic datasets made with `seg synth` (thin anisotropic MR, CT phantom, 2-channel MR, and the thin MR stored thick
axis first to check the axis mapping) and ACDC cine MR (`--acdc`; non-commercial research use, cite Bernard et al.,
IEEE TMI 2018). A run of some `--datasets` updates their entries in an existing JSON and keeps the others.
Nothing is timed: this compares plans.

usage: python bench/plan_vs_nnunet.py --nnunet-python /work/nnunet-venv/bin/python [--work /tmp/plan_vs_nnunet]
       [--datasets hippocampus thin ct two_channel acdc thin_sar] [--out runs/plan_vs_nnunet]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
AXES = "RAS"

# `seg synth` arguments of the synthetic datasets (issue 16).
SYNTHETIC = {
    "thin": ["--size", "96", "96", "16", "--spacing", "0.8", "0.8", "4.0", "--cases", "20"],
    "ct": ["--modality", "CT", "--size", "128", "128", "32", "--spacing", "0.8", "0.8", "3.0", "--cases", "20"],
    "two_channel": ["--channels", "2", "--cases", "20"],
    # the thin MR again, stored thick axis first (file axes S, A, R): nnU-Net then transposes, seg reorients
    "thin_sar": ["--orientation", "SAR", "--size", "16", "96", "96", "--spacing", "4.0", "0.8", "0.8", "--cases", "20"],
}
DATASET_IDS = {"hippocampus": 901, "thin": 902, "ct": 903, "two_channel": 904, "acdc": 905, "thin_sar": 906}
NAMES = {"hippocampus": "Hippocampus", "thin": "ThinMR", "ct": "CTPhantom", "two_channel": "TwoChannelMR",
         "acdc": "ACDC", "thin_sar": "ThinMRSAR"}


# ---- conversion to nnU-Net v2's raw layout ------------------------------------------------------------------------
def _ending(path: Path) -> str:
    return ".nii.gz" if path.name.lower().endswith(".nii.gz") else ".nii"


def _place(src: Path, dst: Path) -> None:
    """`dst` -> `src` as a symlink (replacing an old one)."""
    if dst.is_symlink() or dst.exists():
        dst.unlink()
    dst.symlink_to(src.resolve())


def _resave(src: Path, dst: Path, data: np.ndarray | None = None) -> None:
    """`src` (or `data` on its grid) written to `dst` as a 3D NIfTI with `src`'s affine and header."""
    image = nib.load(os.fspath(src))
    if data is None:
        data = np.asarray(image.dataobj)
    header = image.header.copy()
    header.set_data_shape(data.shape)
    out = nib.Nifti1Image(data, image.affine, header)
    out.set_qform(image.affine, int(image.header["qform_code"]) or 1)
    out.set_sform(image.affine, int(image.header["sform_code"]) or 1)
    if dst.is_symlink() or dst.exists():
        dst.unlink()
    nib.save(out, os.fspath(dst))


def to_nnunet(root: str | os.PathLike, raw: str | os.PathLike, dataset_id: int, name: str) -> Path:
    """Write dataset `root` (any layout seg reads) as nnU-Net v2 raw dataset `raw/DatasetXXX_name`; its folder.

    Every image channel becomes `imagesTr/<case>_<channel:04d><ending>`, every label `labelsTr/<case><ending>`.
    Files are symlinked when they can be used as they are: one 3D file per channel, all with one file ending.
    A 4D file (the channels along its last axis) is split into one 3D file per channel; the files of a dataset
    that mixes `.nii` and `.nii.gz` are written again as `.nii.gz`. `dataset.json` gets `channel_names` (seg's
    modalities, so that "CT" selects nnU-Net's CT normalisation), `labels` as {name: value}, `numTraining` and
    `file_ending`.
    """
    from seg.data.layout import load_dataset

    info = load_dataset(root)
    folder = Path(raw) / f"Dataset{dataset_id:03d}_{name}"
    images, labels = folder / "imagesTr", folder / "labelsTr"
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    files = [p for c in info.cases for p in (*c.images, c.label)]
    endings = {_ending(p) for p in files}
    ending = endings.pop() if len(endings) == 1 else ".nii.gz"
    for case in info.cases:
        if len(case.images) == 1 and len(nib.load(os.fspath(case.images[0])).shape) == 4:
            image = nib.load(os.fspath(case.images[0]))
            data = np.asarray(image.dataobj)
            for c in range(data.shape[-1]):
                _resave(case.images[0], images / f"{case.case_id}_{c:04d}{ending}", data[..., c])
            sources = []
        else:
            sources = [(p, images / f"{case.case_id}_{c:04d}{ending}") for c, p in enumerate(case.images)]
        sources.append((case.label, labels / f"{case.case_id}{ending}"))
        for src, dst in sources:
            _place(src, dst) if _ending(src) == ending else _resave(src, dst)
    meta = {
        "name": name,
        "description": f"converted from {Path(root).resolve()} by bench/plan_vs_nnunet.py (seg)",
        "channel_names": {str(c): m for c, m in enumerate(info.modalities)},
        "labels": {n: v for v, n in sorted(info.labels.items())},
        "numTraining": len(info.cases),
        "file_ending": ending,
    }
    (folder / "dataset.json").write_text(json.dumps(meta, indent=1))
    return folder


# ---- axis order ---------------------------------------------------------------------------------------------------
def ras_of_array_axes(affine: np.ndarray) -> list[int]:
    """For each axis of SimpleITK's array of a NIfTI file (file axes k, j, i), the R/A/S axis (0, 1, 2) it runs along.

    SimpleITK keeps the file's voxel order and reverses it in the numpy array (z, y, x = k, j, i); which world
    axis each voxel axis runs along is read from the affine (nibabel's `io_orientation`, as seg reorients).
    """
    ornt = nib.orientations.io_orientation(np.asarray(affine, dtype=np.float64))
    return [int(ornt[2 - a, 0]) for a in range(3)]


def dataset_axes(root: str | os.PathLike) -> tuple[list[int], int]:
    """`ras_of_array_axes` of the dataset's first case, and how many cases have another axis order."""
    from seg.data.layout import load_dataset

    info = load_dataset(root)
    orders = [ras_of_array_axes(nib.load(os.fspath(c.images[0])).affine) for c in info.cases]
    return orders[0], sum(o != orders[0] for o in orders)


def to_ras(values: list, planned_axes: list[int]) -> list:
    """Values along nnU-Net's planned axes (`planned_axes[t]` = R/A/S axis of planned axis t) in R, A, S order.

    For a 2D configuration the two values go to their in-plane axes and the third is None.
    """
    out = [None, None, None]
    for t, v in zip(planned_axes, values):
        out[t] = v
    return out


# ---- seg plan -----------------------------------------------------------------------------------------------------
def seg_summary(root: str | os.PathLike, device: str = "cpu") -> dict:
    """seg's plan of `root` in the table's terms (all along R, A, S), with checks of its internal consistency."""
    from seg.data.fingerprint import load_fingerprint
    from seg.data.layout import load_dataset
    from seg.data.plan import MIN_FEATURE, plan_dataset, resampled_shape, target_spacing

    decisions = {d.key: (d.value, d.reason) for d in plan_dataset(root, device=device)}
    value = {k: v for k, (v, _) in decisions.items()}
    fingerprint = load_fingerprint(load_dataset(root))
    spacings = np.asarray(fingerprint["spacings"], dtype=np.float64)
    shapes = np.asarray(fingerprint["shapes"], dtype=np.float64)
    spatial = value["data.spatial_dims"]
    target = target_spacing(spacings)[0]
    median = resampled_shape(shapes, spacings, target)[:spatial]
    patch, strides = value["data.patch_size"], value["model.strides"]
    total = np.prod(np.asarray(strides), axis=0).astype(int).tolist() if strides else [1] * spatial
    per_axis = [[s[a] for s in strides] for a in range(spatial)]
    problems = []
    for a in range(spatial):
        if patch[a] % total[a]:
            problems.append(f"patch {patch[a]} along {AXES[a]} is not a multiple of its total stride {total[a]}")
        # nnU-Net too pads the median scan up to the next multiple of the total stride; anything beyond is a bug
        rounded_up = math.ceil(round(float(median[a]), 3) / total[a]) * total[a]
        if patch[a] > max(rounded_up, median[a]):
            problems.append(f"patch {patch[a]} along {AXES[a]} exceeds the median resampled scan ({median[a]:.6g}) "
                            f"rounded up to a multiple of its total stride {total[a]} ({rounded_up})")
        if patch[a] / total[a] < MIN_FEATURE and total[a] > 1:
            problems.append(f"coarsest map along {AXES[a]} is {patch[a] / total[a]:g} < {MIN_FEATURE} voxels")
    return {
        "planner": f"seg ({device})",
        "config": f"{spatial}d",
        "spacing": value["data.spacing"] if spatial == 3 else value["data.spacing"][:2] + [None],
        "median_shape": [round(float(v), 1) for v in median] + ([None] if spatial == 2 else []),
        "patch": patch + ([None] if spatial == 2 else []),
        "strides": per_axis + ([None] if spatial == 2 else []),
        "num_downsamplings": len(strides),
        "features": value["model.channels"],
        "batch": f"{value['data.batch_size']} x {value['data.samples_per_volume']}",
        "patches_per_step": value["data.batch_size"] * value["data.samples_per_volume"],
        "normalization": decisions["data.normalization"][1].split(": ", 1)[-1],
        "problems": problems,
        "reasons": {k: r for k, (_, r) in decisions.items()
                    if k in ("data.spatial_dims", "data.spacing", "data.patch_size", "model.strides")},
    }


# ---- nnU-Net ------------------------------------------------------------------------------------------------------
def nnunet_env(work: Path) -> dict:
    env = dict(os.environ)
    for var, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "preprocessed"), ("nnUNet_results", "results")):
        env[var] = os.fspath(work / sub)
        (work / sub).mkdir(parents=True, exist_ok=True)
    env.setdefault("OMP_NUM_THREADS", "1")  # a shared 2-core machine
    env["nnUNet_n_proc_DA"] = "1"
    return env


def run_nnunet(python: str, dataset_id: int, work: Path, preprocess: bool = True,
               configuration: str = "3d_fullres") -> Path:
    """nnU-Net's fingerprint, plans (all configurations) and, with `preprocess`, `configuration`'s preprocessing."""
    argv = ["nnUNetv2_plan_and_preprocess", "-d", str(dataset_id), "--verify_dataset_integrity", "-npfp", "1"]
    argv += ["-c", configuration, "-np", "1"] if preprocess else ["--no_pp"]
    code = ("import sys; from nnunetv2.experiment_planning.plan_and_preprocess_entrypoints import "
            f"plan_and_preprocess_entry as main; sys.argv = {argv!r}; main()")
    log = work / f"nnunet_{dataset_id}.log"
    with open(log, "w") as f:
        done = subprocess.run([python, "-c", code], env=nnunet_env(work), stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        raise RuntimeError(f"nnU-Net planning of dataset {dataset_id} failed (exit {done.returncode}); see {log}")
    plans = next((work / "preprocessed").glob(f"Dataset{dataset_id:03d}_*")) / "nnUNetPlans.json"
    return plans


def nnunet_summaries(plans: dict, array_axes: list[int], num_training: int | None = None) -> list[dict]:
    """nnU-Net's configurations (2d, 3d_fullres, 3d_lowres when planned) in the table's terms, along R, A, S.

    With `num_training`, each row also gets `batch_cap_5pct`: the batch size at which one batch would cover 5 % of
    the dataset's voxels (nnU-Net's cap; the median 3d_fullres shape times the number of cases), at least 2.
    """
    transpose = plans["transpose_forward"]
    fullres = plans["configurations"].get("3d_fullres", {}).get("median_image_size_in_voxels")
    dataset_voxels = float(np.prod(fullres)) * num_training if fullres and num_training else None
    planned = [array_axes[t] for t in transpose]  # R/A/S axis of each planned (transposed) axis
    out = []
    for name, config in plans["configurations"].items():
        if "patch_size" not in config:  # cascade entries that only inherit
            continue
        dims = len(config["patch_size"])
        axes = planned if dims == 3 else planned[1:]  # 2d: the slices are along the first (coarsest) axis
        arch = config.get("architecture", {}).get("arch_kwargs", config)
        strides = arch.get("strides", config.get("pool_op_kernel_sizes"))
        features = arch.get("features_per_stage")
        per_axis = [[int(s[d]) for s in strides[1:]] for d in range(dims)]  # strides[0] is the stem (all 1)
        out.append({
            "planner": "nnU-Net",
            "config": name,
            "spacing": to_ras([round(float(v), 4) for v in config["spacing"]], axes),
            "median_shape": to_ras([round(float(v), 1) for v in config["median_image_size_in_voxels"]], axes),
            "patch": to_ras([int(v) for v in config["patch_size"]], axes),
            "strides": to_ras(per_axis, axes),
            "num_downsamplings": len(strides) - 1,
            "features": features,
            "batch": str(config["batch_size"]),
            "patches_per_step": config["batch_size"],
            "normalization": ", ".join(config["normalization_schemes"])
                             + (" (inside the nonzero mask)" if any(config.get("use_mask_for_norm", [])) else ""),
            "problems": [],
            "transpose_forward": transpose,
            "batch_cap_5pct": None if dataset_voxels is None else
            max(2, round(dataset_voxels * 0.05 / float(np.prod(config["patch_size"])))),
        })
    return out


# ---- report -------------------------------------------------------------------------------------------------------
def _axes(values: list) -> str:
    return " x ".join("-" if v is None else (str(v) if not isinstance(v, list) else "".join(map(str, v)) or "-")
                      for v in values)


def markdown(results: dict) -> str:
    lines = []
    for dataset, rows in results.items():
        lines += [f"### {dataset}", "",
                  "| planner | config | spacing R x A x S (mm) | median shape | patch | strides R x A x S | "
                  "downsamplings | features | batch | normalisation |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in rows["plans"]:
            spacing = " x ".join("-" if v is None else f"{v:g}" for v in r["spacing"])
            shape = " x ".join("-" if v is None else f"{v:g}" for v in r["median_shape"])
            features = f"{r['features'][0]}-{r['features'][-1]}" if r["features"] else "?"
            lines.append(f"| {r['planner']} | {r['config']} | {spacing} | {shape} | {_axes(r['patch'])} | "
                         f"{_axes(r['strides'])} | {r['num_downsamplings']} | {features} | {r['batch']}"
                         + (f" (5% cap {r['batch_cap_5pct']})" if r.get("batch_cap_5pct") else "") + " | "
                         f"{r['normalization']} |")
        if rows.get("note"):
            lines += ["", rows["note"]]
        for r in rows["plans"]:
            for p in r["problems"]:
                lines.append(f"- **{r['planner']} {r['config']}: {p}**")
        lines.append("")
    return "\n".join(lines)


def make_synthetic(name: str, out: Path) -> Path:
    """The synthetic dataset `name` (`SYNTHETIC`), made with `seg synth` unless already there."""
    folder = out / name
    if not (folder / "dataset.json").exists():
        subprocess.run([sys.executable, "-m", "seg", "synth", "--output", os.fspath(folder), *SYNTHETIC[name]],
                       check=True, stdout=subprocess.DEVNULL)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nnunet-python", default="/work/nnunet-venv/bin/python",
                        help="python of the virtual environment with nnunetv2 (never seg's own)")
    parser.add_argument("--hippocampus", type=Path, default=SHARED / "data" / "hippocampus")
    parser.add_argument("--acdc", type=Path, default=SHARED / "data" / "acdc")
    parser.add_argument("--datasets", nargs="+", default=list(DATASET_IDS), choices=list(DATASET_IDS))
    parser.add_argument("--work", type=Path, default=Path("/tmp/plan_vs_nnunet"),
                        help="synthetic data, nnU-Net raw / preprocessed folders (outside the repository)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "plan_vs_nnunet", help="JSON and Markdown here")
    parser.add_argument("--gpu", action="store_true", help="also plan with `seg plan --device gpu`")
    parser.add_argument("--skip-nnunet", action="store_true", help="seg's plans only")
    parser.add_argument("--no-preprocess", action="store_true", help="nnU-Net plans only (--no_pp)")
    parser.add_argument("--reuse-plans", action="store_true",
                        help="read nnUNetPlans.json left in --work by an earlier run instead of planning again")
    args = parser.parse_args(argv)

    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    version = None
    if not args.skip_nnunet:
        version = subprocess.run([args.nnunet_python, "-c", "import importlib.metadata as m; "
                                  "print(m.version('nnunetv2'))"], capture_output=True, text=True,
                                 check=True).stdout.strip()
    results: dict = {}
    for key in args.datasets:
        root = {"hippocampus": args.hippocampus, "acdc": args.acdc}.get(key) or make_synthetic(key, args.work / "data")
        print(f"== {key}: {root}", flush=True)
        rows = [seg_summary(root, "cpu")] + ([seg_summary(root, "gpu")] if args.gpu else [])
        axes, mixed = dataset_axes(root)
        note = (f"nnU-Net's array axes (z, y, x of SimpleITK) run along {', '.join(AXES[a] for a in axes)} here "
                + (f"({mixed} cases have another order!)" if mixed else "(all cases)"))
        if not args.skip_nnunet:
            to_nnunet(root, args.work / "raw", DATASET_IDS[key], NAMES[key])
            existing = list((args.work / "preprocessed").glob(f"Dataset{DATASET_IDS[key]:03d}_*/nnUNetPlans.json"))
            if args.reuse_plans and existing:
                plans_path = existing[0]
            else:
                plans_path = run_nnunet(args.nnunet_python, DATASET_IDS[key], args.work, not args.no_preprocess)
            plans = json.loads(plans_path.read_text())
            num_training = json.loads((plans_path.parent / "dataset.json").read_text())["numTraining"]
            rows += nnunet_summaries(plans, axes, num_training)
            note += f"; nnU-Net's transpose_forward {plans['transpose_forward']}"
        results[key] = {"root": os.fspath(root), "note": note, "plans": rows}
        print(markdown({key: results[key]}), flush=True)
    previous = args.out / "plan_vs_nnunet.json"
    if previous.exists():  # a run of some datasets updates theirs and keeps the others'
        old = json.loads(previous.read_text())
        if old.get("nnunetv2") in (version, None) or version is None:
            results = {**{k: v for k, v in old["results"].items() if k not in results}, **results}
            version = version or old.get("nnunetv2")
    results = {k: results[k] for k in DATASET_IDS if k in results}
    previous.write_text(json.dumps({"nnunetv2": version, "results": results}, indent=1))
    (args.out / "plan_vs_nnunet.md").write_text(markdown(results))
    print(f"written to {args.out}/plan_vs_nnunet.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
