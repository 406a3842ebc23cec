import json
import os
import shutil

import pytest
import torch
from lightning.pytorch import Trainer

from seg.data import NiftiDataModule
from seg.data.fingerprint import fingerprint_path
from seg.data.split import split_cases
from seg.data.synthetic import write_dataset
from seg.data.transforms import inference_transforms, label_cast
from seg.errors import DataError

SIZE = (24, 24, 16)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """6 training and 2 test cases (labels 0/1/2), oblique LPS-like affines, 1.5 x 1.5 x 2 mm."""
    return write_dataset(tmp_path_factory.mktemp("data") / "synth", cases=6, test_cases=2, size=SIZE, oblique=True)


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg"


def make(root, **kwargs):
    kwargs = {"patch_size": [16, 16, 8], "num_workers": 0, "batch_size": 2, "samples_per_volume": 3, **kwargs}
    return NiftiDataModule(str(root), **kwargs)


def test_model_facts_come_from_the_layout_alone(synth, cache_home):
    dm = make(synth)
    assert (dm.in_channels, dm.num_classes, dm.class_names) == (1, 3, ["liver", "lesion"])
    assert not cache_home.exists()  # nothing measured yet
    assert dm.hparams.patch_size == [16, 16, 8] and dm.hparams.root == str(synth)


def test_3d_batches(synth):
    dm = make(synth)
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (6, 1, 16, 16, 8) and batch["image"].dtype == torch.float32
    assert batch["label"].shape == (6, 1, 16, 16, 8) and batch["label"].dtype == torch.int64
    assert len(batch["case_id"]) == 6 and all(c.startswith("synth_") for c in batch["case_id"])
    assert set(batch["case_id"]) <= set(dm.split.train)
    val = next(iter(dm.val_dataloader()))
    assert val["image"].shape[:2] == (1, 1) and val["image"].ndim == 5
    assert val["label"].shape == (1, 1, *val["image"].shape[2:])
    assert val["case_id"][0] in dm.split.val
    assert set(val["label"].unique().tolist()) <= {0, 1, 2}


def test_2d_batches_are_slices_and_validation_stays_3d(synth):
    dm = make(synth, spatial_dims=2, patch_size=[16, 12], samples_per_volume=4)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (8, 1, 16, 12) and batch["label"].shape == (8, 1, 16, 12)
    assert batch["label"].dtype == torch.int64
    assert dm.preprocessing["spacing"][2] == 0.0  # slices keep their own thickness
    val = next(iter(dm.val_dataloader()))
    assert val["image"].ndim == 5 and val["image"].shape[-1] == SIZE[2]


def test_loader_with_worker_processes(synth):
    dm = make(synth, num_workers=1)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert loader.persistent_workers and not loader.pin_memory
    batches = list(loader)
    # 5 training cases, 2 volumes (6 patches) per batch
    assert [len(b["case_id"]) for b in batches] == [6, 6, 3] and batches[0]["image"].shape == (6, 1, 16, 16, 8)
    assert sorted({c for b in batches for c in b["case_id"]}) == dm.split.train


def test_preprocessing_is_json_and_rebuilds_the_validation_transform(synth):
    dm = make(synth)
    dm.setup("validate")
    prep = json.loads(json.dumps(dm.preprocessing))
    assert prep == dm.preprocessing
    assert prep["spacing"] == [1.5, 1.5, 2.0] and prep["orientation"] == "RAS"
    assert prep["normalization"] == [{"scheme": "zscore", "nonzero": True}]
    assert prep["labels"] == {"0": "background", "1": "liver", "2": "lesion"}
    assert prep["class_names"] == ["liver", "lesion"] and prep["num_classes"] == 3 and prep["in_channels"] == 1
    assert prep["modalities"] == ["MRI"] and prep["patch_size"] == [16, 16, 8] and prep["crop_foreground"] is True

    case = next(c for c in dm.info.cases if c.case_id == dm.split.val[0])
    item = {"image": str(case.images[0]), "label": str(case.label)}
    rebuilt = label_cast()(inference_transforms(prep, keys=("image", "label"))(item))
    cached = dm.val_dataset[0]
    assert cached["case_id"] == case.case_id
    for key in ("image", "label"):
        assert torch.equal(rebuilt[key].as_tensor(), cached[key].as_tensor())
        assert torch.equal(rebuilt[key].affine, cached[key].affine)


def test_split_json_written_and_val_cases_honoured(synth, tmp_path):
    dm = make(synth, val_cases=["synth_001", "synth_004"])
    dm.trainer = Trainer(default_root_dir=tmp_path / "run", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", devices=1)
    dm.setup("fit")
    written = json.loads((tmp_path / "run" / "split.json").read_text())
    assert written == {"train": ["synth_000", "synth_002", "synth_003", "synth_005"],
                       "val": ["synth_001", "synth_004"], "seed": 0, "fold": None}
    assert sorted({i["case_id"] for i in dm.val_dataset.dataset.data}) == ["synth_001", "synth_004"]


def test_fold_split(synth):
    dm = make(synth, fold=1, num_folds=3, seed=5)
    dm.setup("fit")
    ids = [f"synth_{i:03d}" for i in range(6)]
    assert dm.split == split_cases(ids, fold=1, num_folds=3, seed=5) and len(dm.split.val) == 2


def test_test_loader_uses_labelled_test_cases_else_validation(synth, tmp_path):
    dm = make(synth)
    dm.setup("test")
    assert [b["case_id"][0] for b in dm.test_dataloader()] == ["synth_006", "synth_007"]

    bare = tmp_path / "bare"
    shutil.copytree(synth, bare, ignore=shutil.ignore_patterns("*Ts"))
    dm = make(bare)
    dm.setup("test")
    assert [b["case_id"][0] for b in dm.test_dataloader()] == dm.split.val


def test_fingerprint_cached_in_xdg_then_reread(synth, cache_home):
    dm = make(synth)
    dm.prepare_data()
    path = fingerprint_path(dm.info)
    assert path.parent == cache_home / "seg" / "fingerprints" and path.exists()
    fingerprint = json.loads(path.read_text())
    fingerprint["spacing"] = [3.0, 3.0, 3.0]  # the cached file is what later processes use
    path.write_text(json.dumps(fingerprint))
    assert make(synth).preprocessing["spacing"] == [3.0, 3.0, 3.0]
    assert make(synth, spacing=[2.0, 2.0, 2.0]).preprocessing["spacing"] == [2.0, 2.0, 2.0]


def test_cache_dir_uses_persistent_dataset(synth, tmp_path):
    cache = tmp_path / "cache"
    dm = make(synth, cache_dir=str(cache))
    dm.prepare_data()
    dm.setup("fit")
    assert type(dm.val_dataset.dataset).__name__ == "PersistentDataset"
    next(iter(dm.val_dataloader()))
    assert list(cache.glob("fingerprint-*.json")) and list(cache.glob("*/*.pt"))


def test_edited_dataset_gets_a_new_fingerprint(synth, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(synth, copy)
    dm = make(copy)
    before = fingerprint_path(dm.info)
    label = dm.info.cases[0].label
    os.utime(label, ns=(label.stat().st_atime_ns, label.stat().st_mtime_ns + 10**9))
    assert fingerprint_path(dm.info) != before


def test_unreadable_case_is_a_data_error_naming_the_file(synth, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(synth, broken)
    bad = broken / "imagesTr" / "synth_002.nii.gz"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])  # truncated download: the header reads, the voxels do not
    dm = make(broken, val_cases=["synth_002"], check=False)
    with pytest.raises(DataError, match="cannot read this scan") as caught:
        dm.setup("validate")  # caching the validation cases loads them
    assert caught.value.path == str(bad)


@pytest.mark.parametrize("kwargs", [{"patch_size": [16, 16]}, {"spatial_dims": 4}, {"normalization": "minmax"},
                                    {"flip_axes": [3]}, {"ct_window": [100, -100]}, {"foreground_ratio": 1.5},
                                    {"class_ratios": [1, 1]}, {"class_ratios": [1, -1, 1]}])
def test_bad_settings_are_data_errors(synth, kwargs):
    with pytest.raises(DataError):
        make(synth, **kwargs)
