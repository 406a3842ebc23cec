"""Gate overlays: the concentration number, the figure, the callback in a real `seg fit`, and `seg overlays`."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import nibabel as nib
import numpy as np
import pytest
import yaml

from seg.explain.concentration import attention_concentration, class_energy_share, dilate_mm, ellipsoid
from seg.explain.export import export_case, map_order

LEVELS = ("gate_0", "gate_1")  # channels [8, 16, 32]: two gated skips
CLASSES = ("liver", "lesion")


# ---- the number ---------------------------------------------------------------------------------------------------
def cube_target() -> np.ndarray:
    target = np.zeros((10, 10, 10), dtype=np.int16)
    target[4:6, 4:6, 4:6] = 1
    return target


def test_concentration_is_volume_over_region_when_all_mass_is_on_the_target():
    target = cube_target()
    gate = (target > 0).astype(np.float32)  # 1 inside, 0 outside
    assert attention_concentration(gate, target, (1, 1, 1), dilation_mm=0) == pytest.approx(1 / (8 / 1000))  # 125


def test_concentration_is_one_for_a_uniform_gate_and_scale_free():
    target = cube_target()
    assert attention_concentration(np.full((10, 10, 10), 0.3), target, (1, 1, 1), 0) == pytest.approx(1.0)
    assert attention_concentration(np.full((10, 10, 10), 0.3), target, (0.7, 0.7, 3.0), 2.0) == pytest.approx(1.0)
    gate = np.where(target > 0, 0.8, 0.2)
    # mass inside 8 * 0.8 = 6.4 of 6.4 + 992 * 0.2 = 204.8; region 8 / 1000
    assert attention_concentration(gate, target, (1, 1, 1), 0) == pytest.approx((6.4 / 204.8) / 0.008)
    assert attention_concentration(gate * 0.5, target, (1, 1, 1), 0) == pytest.approx((6.4 / 204.8) / 0.008)


def test_concentration_is_below_one_when_the_gate_looks_away():
    target = cube_target()
    gate = (target == 0).astype(float)
    assert attention_concentration(gate, target, (1, 1, 1), 0) == 0.0


def test_dilation_is_in_millimetres_on_an_anisotropic_grid():
    target = cube_target()
    # 1 mm on 1 x 1 x 2 mm voxels: one voxel in x and y (a cross, no diagonals), none in z
    assert ellipsoid(1.0, (1, 1, 2)).shape == (3, 3, 1) and ellipsoid(1.0, (1, 1, 2)).sum() == 5
    region = dilate_mm(target > 0, 1.0, (1, 1, 2))
    assert region.sum() == 2 * (4 + 4 * 2)  # each of the 2 slices: the 2x2 square plus one voxel on each side
    gate = (target > 0).astype(float)
    assert attention_concentration(gate, target, (1, 1, 2), 1.0) == pytest.approx(1000 / 24)
    # 2 mm on a 1 mm grid: the ball of radius 2 voxels (33 voxels) around the single voxel
    dot = np.zeros((9, 9, 9), bool)
    dot[4, 4, 4] = True
    assert dilate_mm(dot, 2.0, (1, 1, 1)).sum() == 33
    assert dilate_mm(dot, 0.0, (1, 1, 1)).sum() == 1


def test_concentration_is_nan_without_target_or_gate():
    assert math.isnan(attention_concentration(np.ones((4, 4, 4)), np.zeros((4, 4, 4)), (1, 1, 1)))
    assert math.isnan(attention_concentration(np.zeros((4, 4, 4)), cube_target()[:4, :4, :4] + 1, (1, 1, 1)))
    with pytest.raises(ValueError):
        attention_concentration(np.ones((4, 4, 4)), np.ones((4, 4, 5)), (1, 1, 1))


def test_class_energy_share_is_the_maps_mass_inside_each_dilated_class():
    # a ring class (myocardium-like) around a core class: a gate on the core holds all of its mass there
    label = np.zeros((1, 12, 12), np.int16)
    label[0, 3:9, 3:9] = 2
    label[0, 5:7, 5:7] = 1
    core = (label == 1).astype(float)
    shares = class_energy_share(core, label, (1, 1, 1), ("core", "ring"), dilation_mm=0.0)
    assert shares == {"core": 1.0, "ring": 0.0}
    # dilated by 1 mm, the ring reaches over the core's voxels: the dilated classes overlap, shares sum past 1
    shares = class_energy_share(core, label, (1, 1, 1), ("core", "ring"), dilation_mm=1.0)
    assert shares == {"core": 1.0, "ring": 1.0}
    # a uniform map: each class's share is its (dilated) area's share of the slice
    uniform = np.full(label.shape, 0.5)
    shares = class_energy_share(uniform, label, (1, 1, 1), ("core", "ring"), dilation_mm=0.0)
    assert shares == pytest.approx({"core": 4 / 144, "ring": 32 / 144})
    # the dilation is in mm: 2 mm on a 2 mm grid is one voxel, on a 1 mm grid two
    fine = class_energy_share(uniform, label, (1, 1, 1), ("core", "ring"), dilation_mm=2.0)["core"]
    coarse = class_energy_share(uniform, label, (1, 2, 2), ("core", "ring"), dilation_mm=2.0)["core"]
    assert coarse == pytest.approx(12 / 144) and fine == pytest.approx(24 / 144)
    # nothing to measure: a class not in the label, a map zero everywhere
    absent = class_energy_share(uniform, label, (1, 1, 1), ("core", "ring", "third"))
    assert math.isnan(absent["third"]) and not math.isnan(absent["core"])
    assert all(math.isnan(v) for v in class_energy_share(np.zeros(label.shape), label, (1, 1, 1), ("core",)).values())
    with pytest.raises(ValueError):
        class_energy_share(uniform, label[:, :11], (1, 1, 1), ("core",))


def test_map_order_puts_gates_coarsest_first_then_cbam():
    assert map_order(["logits", "cbam_1", "gate_10", "gate_2", "cbam_0", "gate_0"]) == \
        ["gate_0", "gate_2", "gate_10", "cbam_0", "cbam_1"]


def test_export_case_writes_maps_png_and_numbers(tmp_path):
    rng = np.random.default_rng(0)
    shape = (20, 16, 12)
    affine = np.array([[0, -1.2, 0, 10], [-0.8, 0, 0, 5], [0, 0, 2.5, -30], [0, 0, 0, 1]])  # axes swapped, LPS-like
    label = np.zeros(shape, np.int16)
    label[6:12, 5:10, 3:8] = 1
    label[8:10, 6:8, 5:7] = 2
    gate = np.clip(0.1 + 0.8 * (label > 0) + 0.05 * rng.random(shape), 0, 1)
    image = rng.normal(100, 10, shape).astype(np.float32) + 50 * (label > 0)
    result = export_case(tmp_path / "c1", "c1", image, {"gate_0": gate, "gate_1": 1 - gate}, affine, label.copy(),
                         label, CLASSES, dilation_mm=0.0, epoch=3)
    assert result.dice == {"liver": 1.0, "lesion": 1.0} and result.missing == {}
    assert result.concentration["gate_0"] > 3 > 1 > result.concentration["gate_1"]
    assert result.concentration["gate_0"] == pytest.approx(attention_concentration(gate, label, (0.8, 1.2, 2.5), 0))
    # shares of the mass inside each class (the liver without the lesion's voxels): gate 1 looks elsewhere
    liver, lesion = (gate[label == c].sum() / gate.sum() for c in (1, 2))
    assert result.energy["gate_0"] == pytest.approx({"liver": liver, "lesion": lesion})
    assert result.energy["gate_0"]["liver"] > 10 * result.energy["gate_1"]["liver"]
    written = nib.load(tmp_path / "c1" / "gate_0.nii.gz")
    assert written.shape == shape and written.get_data_dtype() == np.float32
    np.testing.assert_allclose(written.affine, affine, atol=1e-5)
    np.testing.assert_allclose(written.get_fdata(), gate, atol=1e-6)
    png = matplotlib.image.imread(tmp_path / "c1" / "overlay.png")
    assert png.shape[0] > 300 and png.shape[1] > 300 and png[..., :3].std() > 0.05
    assert not list((tmp_path / "c1").glob(".*"))  # no temporary files left
    # W&B's masks: the label drawn like the PNG, pixel for pixel, in each of its 3 x 3 panels
    masks = result.figure_masks
    assert masks["ground_truth"].shape == png.shape[:2] and masks["ground_truth"].dtype == np.uint8
    np.testing.assert_array_equal(masks["ground_truth"], masks["prediction"])  # the prediction is the label here
    assert set(np.unique(masks["ground_truth"])) == {0, 1, 2}
    filled = (masks["ground_truth"] > 0).sum()
    assert 0.005 < filled / masks["ground_truth"].size < 0.3
    # aligned with the figure: the predicted contours (lime) it drew run along the mask's edges
    from scipy import ndimage

    rgb = png[..., :3]
    lime = (rgb[..., 1] > 0.85) & (rgb[..., 2] < 0.2) & (np.abs(rgb[..., 0] - 0.49) < 0.15)
    edges = np.zeros(png.shape[:2], bool)
    for c in (1, 2):  # the contour of each class, the lesion's inside the liver
        edges |= (masks["prediction"] == c) ^ ndimage.binary_erosion(masks["prediction"] == c)
    lime &= np.arange(png.shape[0])[:, None] < 0.9 * png.shape[0]  # not the legend's lines at the bottom
    distance = ndimage.distance_transform_edt(~edges)[lime]
    assert lime.sum() > 200 and np.mean(distance <= 3) > 0.9


def test_a_missing_class_is_dice_0_and_named_in_concentration_csv(tmp_path):
    from seg.explain.export import CaseOverlay, dice_per_class, missing_classes, write_concentration_csv

    label = np.zeros((8, 8, 8), np.int16)
    label[2:6, 2:6, 2:6] = 1
    label[3, 3, 3] = 2
    liver_only = (label == 1).astype(np.int16)  # the lesion is not predicted
    dice = dice_per_class(liver_only, label, CLASSES)
    assert dice["liver"] == 1.0 and dice["lesion"] == 0.0
    assert missing_classes(liver_only, label, CLASSES) == {"lesion": "not predicted"}
    assert missing_classes(label, liver_only, CLASSES) == {"lesion": "not in the label"}
    nothing = np.zeros_like(label)
    assert math.isnan(dice_per_class(nothing, nothing, CLASSES)["lesion"])
    assert missing_classes(nothing, nothing, CLASSES) == {"liver": "in neither", "lesion": "in neither"}
    result = CaseOverlay("c1", tmp_path, dice=dice, missing=missing_classes(liver_only, label, CLASSES),
                         concentration={"gate_0": 2.0})
    write_concentration_csv(tmp_path / "concentration.csv", [result], CLASSES)
    with open(tmp_path / "concentration.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert row == {"case_id": "c1", "level": "gate_0", "concentration": "2", "energy_liver": "nan",
                   "energy_lesion": "nan", "dice_liver": "1", "dice_lesion": "0", "missing": "lesion: not predicted"}
    result.energy = {"gate_0": {"liver": 0.75, "lesion": 0.125}}
    write_concentration_csv(tmp_path / "concentration.csv", [result], CLASSES)
    with open(tmp_path / "concentration.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert (row["energy_liver"], row["energy_lesion"]) == ("0.75", "0.125")


def test_callback_exports_on_schedule_and_sets_the_modules_flag_per_volume():
    from types import SimpleNamespace

    from lightning.pytorch.trainer.states import TrainerFn
    from monai.transforms import Compose

    from seg.training.overlays import GateOverlays

    def trainer(epoch, fn=TrainerFn.FITTING, sanity=False):
        state = SimpleNamespace(fn=fn)
        datamodule = SimpleNamespace(val_transforms=Compose([]))
        return SimpleNamespace(current_epoch=epoch, state=state, sanity_checking=sanity, datamodule=datamodule)

    every_3 = GateOverlays(every_n_epochs=3)
    assert [every_3._due(trainer(e)) for e in range(6)] == [False, False, True, False, False, True]
    assert not every_3._due(trainer(2, sanity=True))
    assert every_3._due(trainer(0, fn=TrainerFn.VALIDATING))  # `seg validate`: always
    assert not any(GateOverlays(every_n_epochs=0)._due(trainer(e)) for e in range(3))
    with pytest.raises(ValueError):
        GateOverlays(every_n_epochs=-1)

    callback, module = GateOverlays(max_volumes=1, cbam=True), SimpleNamespace(export_gates=False, export_cbam=False)
    callback.on_validation_epoch_start(trainer(0), module)
    callback.on_validation_batch_start(trainer(0), module, {}, 0)
    assert module.export_gates and module.export_cbam
    callback.on_validation_batch_end(trainer(0), module, None, {}, 0)  # (no maps came back: nothing to export)
    assert not module.export_gates and not module.export_cbam
    callback._results.append(None)  # one volume exported: the limit is reached
    callback.on_validation_batch_start(trainer(0), module, {}, 1)
    assert not module.export_gates


# ---- a real training run ------------------------------------------------------------------------------------------
def seg(*args, env_extra=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "seg", *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=600)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    from seg.data.synthetic import write_dataset

    # oblique: rotated, LPS-like affines, so a map that ignores the geometry cannot match the scan's
    return write_dataset(tmp_path_factory.mktemp("data") / "synth", cases=6, test_cases=2, size=(32, 32, 24),
                         oblique=True)


@pytest.fixture(scope="module")
def run(tmp_path_factory, dataset) -> Path:
    """Two epochs of one batch each, two validation volumes, W&B offline with its staging area in the test's folder."""
    out = tmp_path_factory.mktemp("run")
    config = out / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "trainer": {"max_epochs": 2, "accelerator": "cpu", "default_root_dir": str(out), "limit_train_batches": 1},
        "model": {"channels": [8, 16, 32], "strides": [2, 2], "sw_batch_size": 2, "hd95": False},
        "data": {"root": str(dataset), "patch_size": [32, 32, 16], "batch_size": 1, "num_workers": 0,
                 "val_fraction": 0.34, "check": False},
    }))
    result = seg("fit", "--config", config,
                 env_extra={"WANDB_MODE": "offline", "WANDB_DATA_DIR": str(out / "wandb-data")})
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def val_cases(run: Path) -> list[str]:
    cases = json.loads((run / "split.json").read_text())["val"]
    assert len(cases) == 2
    return cases


def test_fit_writes_overlays_of_every_validation_volume_in_the_scans_geometry(run, dataset):
    epochs = sorted(p.name for p in (run / "overlays").iterdir())
    assert epochs == ["epoch=0", "epoch=1"]  # not the sanity check: that one has no epoch of its own
    for epoch in epochs:
        for case in val_cases(run):
            original = nib.load(dataset / "imagesTr" / f"{case}.nii.gz")
            assert not np.allclose(original.affine[:3, :3], np.diag(np.diag(original.affine[:3, :3])))  # oblique
            folder = run / "overlays" / epoch / case
            for level in LEVELS:
                gate = nib.load(folder / f"{level}.nii.gz")
                assert gate.shape == original.shape
                np.testing.assert_allclose(gate.affine, original.affine, atol=1e-4)
                assert gate.get_data_dtype() == np.float32
                values = gate.get_fdata()
                assert values.min() >= 0.0 and values.max() <= 1.0 and values.std() > 1e-4
            png = matplotlib.image.imread(folder / "overlay.png")
            assert png.shape[0] > 300 and png.shape[1] > 300
            assert png[..., :3].reshape(-1, 3).std(0).max() > 0.05  # not a single colour
            assert not list(folder.glob(".*"))


def test_concentration_csv_matches_the_written_maps(run, dataset):
    for epoch in ("epoch=0", "epoch=1"):
        with open(run / "overlays" / epoch / "concentration.csv") as f:
            rows = list(csv.DictReader(f))
        assert list(rows[0]) == ["case_id", "level", "concentration", "energy_liver", "energy_lesion", "dice_liver",
                                 "dice_lesion", "missing"]
        assert sorted((r["case_id"], r["level"]) for r in rows) == sorted(
            (c, lv) for c in val_cases(run) for lv in LEVELS)
        for row in rows:
            assert 0.0 <= float(row["dice_liver"]) <= 1.0
            # the label's geometry survives resampling there and back (the dataset's spacing is the target's)
            label = nib.load(dataset / "labelsTr" / f"{row['case_id']}.nii.gz")
            gate = nib.load(run / "overlays" / epoch / row["case_id"] / f"{row['level']}.nii.gz")
            expected = attention_concentration(gate.get_fdata(), np.asarray(label.dataobj),
                                               nib.affines.voxel_sizes(label.affine), 2.0)
            assert float(row["concentration"]) == pytest.approx(expected, rel=1e-4)
            shares = class_energy_share(gate.get_fdata(), np.asarray(label.dataobj),
                                        nib.affines.voxel_sizes(label.affine), CLASSES, 2.0)
            for name, share in shares.items():
                assert float(row[f"energy_{name}"]) == pytest.approx(share, rel=1e-4, nan_ok=True)


def test_wandb_offline_run_holds_each_volumes_full_figure_with_its_masks_and_the_table_inside_the_run(run):
    import wandb_log

    (run_dir,) = (run / "wandb").glob("offline-run-*")
    files = run_dir / "files"
    rows = wandb_log.history(run_dir)
    cases = val_cases(run)
    logged = [r for r in rows if "overlays/table/_type" in r]
    assert [r["epoch"] for r in logged] == [0, 1]
    for row in logged:
        for case in cases:
            image = {k.split("/", 2)[2]: v for k, v in row.items() if k.startswith(f"overlays/{case}/")}
            # the very figure written for this volume and epoch: all gate levels, three views
            figure = run / "overlays" / f"epoch={row['epoch']}" / case / "overlay.png"
            assert (files / image["path"]).read_bytes() == figure.read_bytes()
            height, width = matplotlib.image.imread(figure).shape[:2]
            assert (image["height"], image["width"]) == (height, width)
            assert image["caption"].startswith(f"{case}, epoch {row['epoch']}: Dice liver ")
            masks = {name: np.rint(matplotlib.image.imread(files / image[f"masks/{name}/path"]) * 255).astype(int)
                     for name in ("ground_truth", "prediction")}
            for name, mask in masks.items():
                assert mask.shape[:2] == (height, width)
                assert set(np.unique(mask)) <= {0, 1, 2}
            # the ground truth in all nine panels (3 views x the scan and 2 gate levels): liver in each third of
            # the figure's width, and in each view's row
            truth = masks["ground_truth"] == 1
            assert all(truth[:, i * width // 3:(i + 1) * width // 3].sum() > 50 for i in range(3))
            assert all(truth[i * height // 3:(i + 1) * height // 3].sum() > 50 for i in range(3))
        # the table: its own JSON in files/, and the artifact W&B stages with its images inside the run folder
        table = json.loads((files / row["overlays/table/path"]).read_text())
        assert table["columns"] == ["case_id", "dice_liver", "dice_lesion", "concentration_gate_0",
                                    "concentration_gate_1", "missing", "overlay"]
        assert sorted(r[0] for r in table["data"]) == sorted(cases)
        for r in table["data"]:
            assert all(v is None or 0 <= v <= 1 for v in r[1:3]) and all(v > 0 for v in r[3:5])
    staged = [json.loads(p.read_text()) for p in (run_dir / "artifacts").rglob("*") if p.is_file() and _is_json(p)]
    full = {json.dumps(t, sort_keys=True) for t in staged if isinstance(t, dict) and t.get("_type") == "table"}
    assert len(full) == 2  # one per epoch (W&B may stage a file twice)
    for table in map(json.loads, full):
        for r in table["data"]:
            assert r[-1]["_type"] == "image-file" and r[-1]["width"] > 300 and r[-1]["height"] > 300
    pngs = [p for p in (run_dir / "artifacts").rglob("*") if p.is_file() and p.read_bytes()[:4] == b"\x89PNG"]
    assert len(pngs) >= 2 * len(cases)  # the table's overlay images
    assert not (run / "wandb" / "artifacts").exists() and not (run / "wandb-data").exists()  # nothing beside it
    # per-class Dice and per-level concentration: numbers in the history at each validated epoch, W&B's charts
    scores = [r for r in rows if "overlays/concentration_gate_0" in r]
    assert [r["epoch"] for r in scores] == [0, 1]
    for r in scores:
        assert all(r[f"overlays/concentration_{lv}"] > 0 for lv in LEVELS)
        assert all(0 <= r[f"val/dice_{c}"] <= 1 for c in CLASSES)


def _is_json(path: Path) -> bool:
    try:
        json.loads(path.read_text())
        return True
    except (UnicodeDecodeError, ValueError):
        return False


# ---- seg overlays -------------------------------------------------------------------------------------------------
def test_seg_overlays_on_a_folder_writes_files_in_each_scans_geometry(run, dataset, tmp_path, capsys):
    from seg.cli import main

    scans = tmp_path / "scans"
    scans.mkdir()
    for path in (dataset / "imagesTs").iterdir():
        (scans / path.name).symlink_to(path)
    (scans / "broken.nii.gz").write_bytes(b"not a nifti")
    out = tmp_path / "out"
    code = main(["overlays", "--checkpoint", str(run / "checkpoints" / "last.ckpt"), "--input", str(scans),
                 "--output", str(out), "--labels", str(dataset / "labelsTs"), "--cbam"])
    assert code == 1  # one bad scan
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("seg overlays: error")]
    assert len(errors) == 1 and "broken.nii.gz" in errors[0]
    cases = sorted(p.name.removesuffix(".nii.gz") for p in (dataset / "imagesTs").iterdir())
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == cases
    for case in cases:
        original = nib.load(dataset / "imagesTs" / f"{case}.nii.gz")
        names = sorted(p.name for p in (out / case).iterdir())
        assert names == ["cbam_0.nii.gz", "cbam_1.nii.gz", "cbam_2.nii.gz", "gate_0.nii.gz", "gate_1.nii.gz",
                         "overlay.png"]
        for name in names[:-1]:
            volume = nib.load(out / case / name)
            assert volume.shape == original.shape
            np.testing.assert_allclose(volume.affine, original.affine, atol=1e-4)
            values = volume.get_fdata()
            assert 0.0 <= values.min() and values.max() <= 1.0 and values.std() > 1e-4
        png = matplotlib.image.imread(out / case / "overlay.png")
        assert png.shape[1] > png.shape[0] > 300  # 1 scan column + 5 map columns: wider than tall
    with open(out / "concentration.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(cases) * 5
    assert all(float(r["concentration"]) > 0 for r in rows)
