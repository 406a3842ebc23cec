"""`seg plan`: the same dataset gives the same plan; thin, isotropic, CT, 2-channel and small datasets get what
their geometry asks for; each plan trains and validates as written; a broken dataset is not planned."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from seg.cli import main
from seg.data.plan import (detect_groups, max_time, plan_dataset, plan_patch, plan_strides, render_yaml,
                           target_spacing)
from seg.data.synthetic import write_dataset

DATASETS = {
    "thin": {"size": (64, 64, 20), "spacing": (0.7, 0.7, 5.0)},
    "isotropic": {"size": (40, 40, 40), "spacing": (1.0, 1.0, 1.0)},
    "ct": {"size": (64, 64, 24), "spacing": (0.8, 0.8, 3.0), "modality": "CT"},
    "two_channels": {"size": (40, 40, 32), "spacing": (1.5, 1.5, 2.0), "channels": 2},
    "small": {"size": (24, 20, 12), "spacing": (1.0, 1.0, 1.0)},
}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Path]:
    return {name: write_dataset(tmp_path_factory.mktemp(name) / "data", cases=5, **spec)
            for name, spec in DATASETS.items()}


def _values(decisions) -> dict:
    return {d.key: d.value for d in decisions}


def test_the_written_plan_reads_back_with_the_planned_types(datasets):
    decisions = plan_dataset(datasets["ct"], minutes=10)
    written = yaml.safe_load(render_yaml(decisions, datasets["ct"]))
    for d in decisions:
        section, key = d.key.split(".", 1)
        assert written[section][key] == d.value and type(written[section][key]) is type(d.value), d.key
    assert isinstance(written["model"]["weight_decay"], float)  # 3e-05 written as 3.0e-05


def test_the_same_dataset_gives_the_same_plan(datasets):
    first = render_yaml(plan_dataset(datasets["thin"], minutes=10), datasets["thin"])
    assert first == render_yaml(plan_dataset(datasets["thin"], minutes=10), datasets["thin"])


def test_thin_data_get_no_stride_along_the_thick_axis_at_the_first_levels(datasets):
    # on a CPU thin data are planned 2D (slices 7.1x thicker than the in-plane spacing); on a GPU, or asked, 3D
    decisions = plan_dataset(datasets["thin"], minutes=10)
    cpu, reasons = _values(decisions), {d.key: d.reason for d in decisions}
    assert cpu["data.spatial_dims"] == 2 and cpu["data.spacing"] == [0.7, 0.7, 0.0]
    assert reasons["data.spatial_dims"].startswith("2D: on a CPU, slices 7.1x thicker")
    assert cpu["model.strides"] == [[2, 2]] * len(cpu["model.strides"])
    assert _values(plan_dataset(datasets["thin"], device="gpu"))["data.spatial_dims"] == 3
    plan = _values(plan_dataset(datasets["thin"], minutes=10, dims="3d"))
    assert plan["data.spatial_dims"] == 3 and plan["data.spacing"] == [0.7, 0.7, 5.0]
    strides = plan["model.strides"]
    assert strides[0] == [2, 2, 1] and strides[1] == [2, 2, 1]  # 0.7 mm in-plane must reach 2.8 mm first
    assert all(s[0] == s[1] == 2 for s in strides)
    assert plan["data.patch_size"][2] == 20 or plan["data.patch_size"][2] % np.prod([s[2] for s in strides]) == 0


def test_isotropic_data_get_isotropic_strides_and_the_median_spacing(datasets):
    plan = _values(plan_dataset(datasets["isotropic"], minutes=10))
    assert plan["data.spacing"] == [1.0, 1.0, 1.0]
    assert all(s == [2, 2, 2] for s in plan["model.strides"])
    assert plan["data.patch_size"] == [40, 40, 40]  # the whole median scan fits the CPU budget


def test_ct_gets_ct_normalisation_and_two_channels_two_inputs(datasets):
    from seg.data import NiftiDataModule

    ct = _values(plan_dataset(datasets["ct"], minutes=10))
    assert "CT: CT clip to the foreground 0.5-99.5 percentiles" in next(
        d.reason for d in plan_dataset(datasets["ct"], minutes=10) if d.key == "data.normalization")
    module = NiftiDataModule(str(datasets["ct"]), patch_size=ct["data.patch_size"], spacing=ct["data.spacing"],
                             spatial_dims=ct["data.spatial_dims"])
    assert module.preprocessing["normalization"][0]["scheme"] == "ct"
    assert module.preprocessing["crop_threshold"] == [-500.0]
    two = _values(plan_dataset(datasets["two_channels"], minutes=10))
    assert NiftiDataModule(str(datasets["two_channels"]), patch_size=two["data.patch_size"]).in_channels == 2


def test_a_dataset_smaller_than_a_patch_gets_a_patch_clipped_to_it(datasets):
    plan = _values(plan_dataset(datasets["small"], minutes=10))
    multiple = np.prod(np.asarray(plan["model.strides"]), axis=0)
    # the scan itself, padded at most to the next multiple of the strides
    assert all(p < s + m for p, s, m in zip(plan["data.patch_size"], (24, 20, 12), multiple))
    assert all(p % m == 0 for p, m in zip(plan["data.patch_size"], multiple))


@pytest.mark.parametrize("units, named", [("amx", "AMX"), ("avx512_bf16", "AVX-512 BF16"), (None, "no native bf16")])
def test_a_cpu_plan_trains_in_bf16_where_the_cpu_has_native_bf16(datasets, monkeypatch, units, named):
    from seg import hardware

    monkeypatch.setattr(hardware, "cpu_bf16_units", lambda: units)
    decisions = {d.key: d for d in plan_dataset(datasets["isotropic"], minutes=10)}
    assert decisions["trainer.precision"].value == ("bf16-mixed" if units else "32-true")
    assert named in decisions["trainer.precision"].reason
    # GPU plans are bf16 whatever the planning CPU has
    assert _values(plan_dataset(datasets["isotropic"], device="gpu"))["trainer.precision"] == "bf16-mixed"


def test_rules_in_isolation():
    spacing, why = target_spacing(np.array([[1.5, 1.5, 10.0]] * 9 + [[1.5, 1.5, 5.0]] * 3))
    assert spacing == [1.5, 1.5, 5.0] and "10th percentile" in why  # thin-slice cases keep their detail
    assert target_spacing(np.array([[0.8, 0.8, 1.0]] * 4))[0] == [0.8, 0.8, 1.0]
    assert plan_strides([40, 56, 40], [1, 1, 1], 4) == [[2, 2, 2]] * 3  # stops at 5 x 7 x 5
    patch, strides = plan_patch([219, 249, 18], [1.48, 1.48, 5.0], 128_000, 4)
    assert np.prod(patch) <= 128_000 * 1.25 and patch[2] >= 16
    # a median that is a multiple of the strides up to float rounding is not padded by a whole multiple
    assert plan_patch([96.00000000000001, 96.00000000000001, 16.0], [0.8, 0.8, 4.0], 10**7, 5)[0] == [96, 96, 16]
    assert plan_patch([48, 48, 32], [0.8, 0.8, 3.0], 128_000, 4) == ([48, 48, 32], [[2, 2, 1], [2, 2, 2], [2, 2, 2]])
    assert detect_groups(["patient001_frame01", "patient001_frame12", "patient002_frame01"])
    assert detect_groups(["hippocampus_001", "hippocampus_003"]) is None


@pytest.mark.parametrize("minutes, text", [(60, "00:01:00:00"), (1.5, "00:00:01:30"), (90.5, "00:01:30:30"),
                                           (25 * 60 + 1, "01:01:01:00")])
def test_a_budget_in_minutes_is_a_max_time_lightning_reads_back_to_the_second(minutes, text):
    from lightning.pytorch.callbacks import Timer

    assert max_time(minutes) == text
    assert Timer(duration=text)._duration == minutes * 60


@pytest.mark.parametrize("name", list(DATASETS))
def test_each_plan_trains_one_short_epoch_and_validates(name, datasets, tmp_path):
    config = tmp_path / "plan.yaml"
    assert main(["plan", str(datasets[name]), "--output", str(config), "--minutes", "5"]) == 0
    written = yaml.safe_load(config.read_text())
    assert written["data"]["plan"]["model.strides"].startswith("halve an axis")  # the reasons travel
    run = tmp_path / "run"
    assert main(["fit", "--config", str(config), "--trainer.default_root_dir", str(run), "--trainer.max_epochs", "1",
                 "--trainer.max_time", "null", "--trainer.limit_train_batches", "1",
                 "--trainer.check_val_every_n_epoch", "1", "--data.num_workers", "0", "--logging", "csv",
                 "--trainer.enable_progress_bar", "false", "--overlays.every_n_epochs", "0"]) == 0
    best = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)
    assert best["hyper_parameters"]["strides"] == written["model"]["strides"]
    assert best["seg"]["preprocessing"]["plan"]["data.patch_size"] == written["data"]["plan"]["data.patch_size"]


def test_fit_without_a_config_plans_first(datasets, tmp_path):
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "seg", "fit", "--data.root", str(datasets["small"]), "--trainer.default_root_dir",
         str(run), "--trainer.max_epochs", "1", "--trainer.max_time", "null", "--trainer.limit_train_batches", "1",
         "--trainer.check_val_every_n_epoch", "1", "--data.num_workers", "0", "--logging", "csv",
         "--trainer.enable_progress_bar", "false"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "no --config given: planned" in result.stderr and "  model.strides = " in result.stderr
    plan = yaml.safe_load((run / "plan.yaml").read_text())
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["hyper_parameters"]["channels"] == plan["model"]["channels"]


def test_a_dataset_check_data_rejects_is_not_planned(datasets, tmp_path, capsys):
    broken = tmp_path / "broken"
    write_dataset(broken, cases=3, size=(16, 16, 8))
    label = broken / "labelsTr" / "synth_001.nii.gz"
    image = nib.load(label)
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj)[:8], image.affine), label)  # a label on another grid
    (broken / "imagesTr" / "synth_002.nii.gz").write_bytes(b"not a nifti")
    output = tmp_path / "plan.yaml"
    assert main(["plan", str(broken), "--output", str(output)]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert any("synth_001" in line for line in lines) and any("synth_002" in line for line in lines)
    assert all(line.startswith("seg plan: ") for line in lines)
    assert not output.exists()
    json.dumps(lines)  # plain text


def test_the_network_and_augmentation_grow_with_the_budget_and_the_reasons_say_why(datasets, monkeypatch):
    from seg import hardware
    from seg.data import plan

    monkeypatch.setattr(hardware, "cpu_bf16_units", lambda: None)  # the same estimate on every CPU

    def planned(minutes):
        return {d.key: d for d in plan_dataset(datasets["isotropic"], minutes=minutes)}

    short, day, week = planned(1), planned(24 * 60), planned(7 * 24 * 60)
    widths = [p["model.channels"].value[0] for p in (short, planned(30), planned(120), day, week)]
    assert widths == sorted(widths) and widths[0] == 16 and widths[-1] == 32
    assert "the narrowest" in short["model.channels"].reason and "the widest" in week["model.channels"].reason
    assert str(plan.MIN_STEPS_FOR_WIDTH) in week["model.channels"].reason
    assert short["data.augmentation"].value == "light" and short["data.flip_axes"].value in ([], [0])
    assert "0.857" in short["data.flip_axes"].reason  # the measured cost of mirroring every axis in a short run
    assert short["trainer.max_time"].reason.startswith("1 minute of training;")
    assert day["trainer.max_time"].reason.startswith("1440 minutes of training;")
    assert "steps" in short["data.augmentation"].reason
    assert week["data.augmentation"].value == "strong" and week["data.flip_axes"].value == [0, 1, 2]
    gpu = _values(plan_dataset(datasets["isotropic"], device="gpu"))
    assert gpu["data.augmentation"] == "strong" and gpu["model.channels"][0] == 32 and gpu["model.deep_supervision"]


def test_a_long_run_exports_a_bounded_number_of_gate_overlay_sets(datasets, monkeypatch):
    from seg import hardware
    from seg.data import plan

    monkeypatch.setattr(hardware, "cpu_bf16_units", lambda: None)
    # the hippocampus CPU hour (about 22 epochs): overlays at every validation
    assert plan.plan_overlays(1, 22).value == 1 and "every validation" in plan.plan_overlays(1, 22).reason
    assert plan.plan_overlays(3, 22).value == 3  # never more often than validation
    for minutes in (10, 60, 7 * 24 * 60):  # five 40^3 cases: one step an epoch, hundreds of epochs an hour
        planned = {d.key: d for d in plan_dataset(datasets["isotropic"], minutes=minutes)}
        epochs = int(planned["trainer.max_time"].reason.split("about ")[1].split(" epochs")[0])
        every = planned["overlays.every_n_epochs"].value
        assert epochs / every <= plan.MAX_OVERLAY_EXPORTS < epochs / (every - 1), minutes
        assert f"every {every} epochs" in planned["overlays.every_n_epochs"].reason
    gpu = _values(plan_dataset(datasets["isotropic"], device="gpu"))  # 1000 epochs
    assert gpu["overlays.every_n_epochs"] == 1000 // plan.MAX_OVERLAY_EXPORTS >= gpu["trainer.check_val_every_n_epoch"]


def test_a_3d_patch_holding_the_whole_scan_takes_one_patch_from_each_of_twice_the_volumes(datasets, monkeypatch):
    from seg import hardware
    from seg.data import plan

    monkeypatch.setattr(hardware, "cpu_bf16_units", lambda: None)
    whole = {d.key: d for d in plan_dataset(datasets["isotropic"], minutes=60)}  # 40^3 voxels in a 128k budget
    assert whole["data.patch_size"].value == [40, 40, 40]
    assert "(40x40x40) already a multiple of the strides" in whole["data.patch_size"].reason  # neither cut nor padded
    assert (whole["data.batch_size"].value, whole["data.samples_per_volume"].value) == (4, 1)
    assert "0.886" in whole["data.samples_per_volume"].reason and "4 patches" in whole["data.batch_size"].reason
    # a budget smaller than the scan: the patch is cut from it, and a volume's patches differ
    monkeypatch.setitem(plan.CPU_PATCH_VOXELS, 3, 20_000)
    cut = {d.key: d for d in plan_dataset(datasets["isotropic"], minutes=60)}
    assert np.prod(cut["data.patch_size"].value) < 40**3 and "shrunk" in cut["data.patch_size"].reason
    assert (cut["data.batch_size"].value, cut["data.samples_per_volume"].value) == (2, 2)
    assert "loading costs more than a patch" in cut["data.samples_per_volume"].reason
    # the same 4 patches a step either way: the step-time estimate behind the width is unchanged
    assert "a step of 4" in whole["data.patch_size"].reason and "a step of 4" in cut["data.patch_size"].reason


def test_mirroring_skips_left_right_when_a_label_names_a_side(tmp_path, monkeypatch):
    from seg import hardware
    from seg.data.plan import lateral_labels

    monkeypatch.setattr(hardware, "cpu_bf16_units", lambda: None)
    assert lateral_labels(["left kidney", "Kidney_R", "r-hippocampus", "liver", "RV", "Anterior"]) == [
        "left kidney", "Kidney_R", "r-hippocampus"]
    data = write_dataset(tmp_path / "data", cases=5, size=(40, 40, 40), spacing=(1.0, 1.0, 1.0))
    meta = json.loads((data / "dataset.json").read_text())
    meta["labels"] = {"0": "background", "1": "kidney_left", "2": "kidney_right"}
    (data / "dataset.json").write_text(json.dumps(meta))
    decisions = {d.key: d for d in plan_dataset(data, device="gpu")}
    assert decisions["data.flip_axes"].value == [1, 2] and "kidney_left" in decisions["data.flip_axes"].reason


def test_class_separation_is_measured_in_world_millimetres_through_each_affine(tmp_path):
    from seg.data.fingerprint import class_separation
    from seg.data.layout import Case, DatasetInfo

    cases = []
    for i, affine in enumerate((np.diag([2.0, 1.0, 3.0, 1.0]), np.diag([-2.0, -1.0, 3.0, 1.0]))):  # RAS, then LPS
        label = np.zeros((20, 30, 10), np.uint8)
        label[2:5, 10:13, 1:3] = 1  # centroid voxel (3, 11, 1.5)
        label[12:15, 10:13, 6:8] = 2  # centroid voxel (13, 11, 6.5): 10 voxels along x, 5 along z
        path = tmp_path / f"case{i}.nii.gz"
        nib.save(nib.Nifti1Image(label, affine), path)
        cases.append(Case(f"case{i}", (path,), path))
    info = DatasetInfo(tmp_path, cases, {0: "background", 1: "a", 2: "b"}, ["MRI"])
    assert class_separation(info) == [20.0, 0.0, 15.0]  # 10 voxels of 2 mm left-right, 5 of 3 mm up
    one = DatasetInfo(tmp_path, cases[:1], {0: "background", 1: "a", 2: "b"}, ["MRI"])
    label = np.zeros((20, 30, 10), np.uint8)
    label[2:5, 10:13, 1:3] = 1
    nib.save(nib.Nifti1Image(label, np.eye(4)), cases[0].label)
    assert class_separation(one) is None  # no case holds two classes


def test_a_short_run_mirrors_left_right_only_where_the_classes_keep_their_arrangement(datasets, monkeypatch):
    from dataclasses import replace

    from seg import hardware
    from seg.data import plan

    monkeypatch.setattr(hardware, "cpu_bf16_units", lambda: None)
    facts = plan.dataset_facts(datasets["isotropic"], minutes=10)  # 1 mm voxels

    def mirroring(separation, lateral=()):
        return plan.short_run_mirroring(replace(facts, class_separation=separation), list(lateral))

    hippocampus = mirroring([1.9, 18.3, 7.8])  # anterior in front of posterior, side by side with itself
    assert hippocampus.value == [0] and plan.LEFT_RIGHT_GAIN in hippocampus.reason
    assert "1.9 mm apart left-right, 18.3 mm front to back" in hippocampus.reason
    heart = mirroring([33.2, 21.1, 6.7])  # the right ventricle beside the left one
    assert heart.value == [] and "swap their arrangement" in heart.reason and "0.857" in heart.reason
    assert mirroring([1.5, 0.4, 0.2]).value == [0]  # concentric classes: within 2 voxels left-right
    assert mirroring([3.0, 2.0, 1.0]).value == []
    assert mirroring(None).value == [0] and "one class" in mirroring(None).reason
    named = mirroring([1.9, 18.3, 7.8], ["hippocampus_left"])
    assert named.value == [] and "hippocampus_left" in named.reason
    # the plan takes it from the dataset's fingerprint; a long run still mirrors every axis
    measured = plan.dataset_facts
    monkeypatch.setattr(plan, "dataset_facts",
                        lambda *a, **k: replace(measured(*a, **k), class_separation=[33.2, 21.1, 6.7]))
    assert _values(plan.plan_dataset(datasets["isotropic"], minutes=10))["data.flip_axes"] == []
    assert _values(plan.plan_dataset(datasets["isotropic"], minutes=7 * 24 * 60))["data.flip_axes"] == [0, 1, 2]


def test_a_2d_cpu_plan_cuts_many_small_patches_with_deep_supervision_and_a_gpu_plan_whole_slices(tmp_path, monkeypatch):
    # cine-MR-like: slices 5.3x thicker than the in-plane spacing, so 2D; each slice larger than the CPU's patch
    from seg import hardware

    monkeypatch.setattr(hardware, "cpu_bf16_units", lambda: None)
    root = write_dataset(tmp_path / "cine", cases=3, size=(208, 240, 8), spacing=(1.5, 1.5, 8.0))
    cpu = {d.key: d for d in plan_dataset(root, minutes=15)}
    assert cpu["data.spatial_dims"].value == 2
    patch = cpu["data.patch_size"].value
    assert patch[0] < 208 and patch[1] < 240 and 128 * 128 <= np.prod(patch) <= 1.25 * 128 * 128
    assert (cpu["data.batch_size"].value, cpu["data.samples_per_volume"].value) == (8, 4)
    assert "32 patches" in cpu["data.batch_size"].reason and "a step of 32" in cpu["data.patch_size"].reason
    # the epoch estimate follows the batch: 3 cases, 1 held out for validation -> 1 step of 8 volumes an epoch
    assert cpu["trainer.log_every_n_steps"].value == 1
    gpu = _values(plan_dataset(root, device="gpu", dims="2d"))
    assert gpu["data.patch_size"][0] >= 208 and gpu["data.patch_size"][1] >= 240  # the whole slice, padded
    assert (gpu["data.batch_size"], gpu["data.samples_per_volume"]) == (2, 4)
    cpu_values = _values(cpu.values())
    assert cpu_values["model.deep_supervision"] is True and gpu["model.deep_supervision"] is True
    assert "0.83" in cpu["model.deep_supervision"].reason  # the measurement it rests on
    # 3D on a CPU keeps it off, and says the measurement why
    iso = {d.key: d for d in plan_dataset(write_dataset(
        tmp_path / "iso", cases=3, size=(32, 32, 32), spacing=(1.0, 1.0, 1.0)), minutes=15)}
    assert iso["model.deep_supervision"].value is False and "0.8825" in iso["model.deep_supervision"].reason
