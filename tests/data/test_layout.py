"""Dataset layouts: MSD, nnU-Net v2 (channel files, no training list), plain folders, and paths that escape."""

import json
from pathlib import Path

import pytest

from seg.data.layout import Case, group_channel_files, inside_root, load_dataset
from seg.errors import DataError


def _touch(root: Path, *names: str) -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")  # the layout reader never opens the files


def _json(root: Path, meta: dict) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps(meta))


def test_msd_layout(tmp_path):
    root = tmp_path / "Task04_Hippocampus"
    _touch(root, "imagesTr/hippo_003.nii.gz", "labelsTr/hippo_003.nii.gz", "imagesTr/hippo_001.nii.gz",
           "labelsTr/hippo_001.nii.gz", "imagesTs/hippo_002.nii.gz")
    _json(root, {
        "name": "Hippocampus", "modality": {"0": "MRI"},
        "labels": {"0": "background", "1": "Anterior", "2": "Posterior"},
        "training": [{"image": "./imagesTr/hippo_003.nii.gz", "label": "./labelsTr/hippo_003.nii.gz"},
                     {"image": "./imagesTr/hippo_001.nii.gz", "label": "./labelsTr/hippo_001.nii.gz"}],
        "test": ["./imagesTs/hippo_002.nii.gz"],
    })
    info = load_dataset(root)
    assert info.name == "Hippocampus"
    assert info.cases == [  # sorted by case id
        Case("hippo_001", (root / "imagesTr/hippo_001.nii.gz",), root / "labelsTr/hippo_001.nii.gz"),
        Case("hippo_003", (root / "imagesTr/hippo_003.nii.gz",), root / "labelsTr/hippo_003.nii.gz"),
    ]
    assert info.labels == {0: "background", 1: "Anterior", 2: "Posterior"}
    assert info.num_classes == 3 and info.class_names == ["Anterior", "Posterior"]
    assert info.modalities == ["MRI"] and info.in_channels == 1
    assert info.test_images == [Case("hippo_002", (root / "imagesTs/hippo_002.nii.gz",))]


def test_msd_multimodal_entry_resolves_to_channel_files(tmp_path):
    root = tmp_path / "ds"
    _touch(root, "imagesTr/brain_001_0000.nii.gz", "imagesTr/brain_001_0001.nii.gz", "labelsTr/brain_001.nii.gz",
           "imagesTs/brain_009_0000.nii.gz", "imagesTs/brain_009_0001.nii.gz")
    _json(root, {"modality": {"0": "T1", "1": "FLAIR"}, "labels": {"0": "background", "1": "tumour"},
                 "training": [{"image": "./imagesTr/brain_001.nii.gz", "label": "./labelsTr/brain_001.nii.gz"}],
                 "test": ["./imagesTs/brain_009.nii.gz"]})
    info = load_dataset(root)
    [case] = info.cases
    assert case.images == (root / "imagesTr/brain_001_0000.nii.gz", root / "imagesTr/brain_001_0001.nii.gz")
    assert info.in_channels == 2
    [test] = info.test_images
    assert test.case_id == "brain_009"  # the case, not its first channel file
    assert len(test.images) == 2


def test_nnunet_v2_layout(tmp_path):
    root = tmp_path / "Dataset002_Heart"
    _touch(root, "imagesTr/la_003_0000.nii.gz", "imagesTr/la_003_0001.nii.gz", "labelsTr/la_003.nii.gz",
           "imagesTr/la_004_0000.nii.gz", "imagesTr/la_004_0001.nii.gz", "labelsTr/la_004.nii.gz",
           "imagesTs/la_010_0000.nii.gz", "imagesTs/la_010_0001.nii.gz")
    _json(root, {"channel_names": {"1": "T2", "0": "T1"}, "labels": {"background": 0, "x": 1},
                 "numTraining": 2, "file_ending": ".nii.gz"})
    info = load_dataset(root)
    assert info.labels == {0: "background", 1: "x"}
    assert info.modalities == ["T1", "T2"]  # ordered by channel number, not by key order in the file
    assert [c.case_id for c in info.cases] == ["la_003", "la_004"]
    assert info.cases[0].images == (root / "imagesTr/la_003_0000.nii.gz", root / "imagesTr/la_003_0001.nii.gz")
    assert info.cases[0].label == root / "labelsTr/la_003.nii.gz"
    assert [c.case_id for c in info.test_images] == ["la_010"]  # imagesTs found without a test list


def test_folder_without_dataset_json(tmp_path):
    root = tmp_path / "plain"
    _touch(root, "imagesTr/b.nii", "labelsTr/b.nii", "imagesTr/a.nii.gz", "labelsTr/a.nii.gz", "imagesTr/c.nii.gz",
           "imagesTr/notes.txt")
    info = load_dataset(root)
    assert [c.case_id for c in info.cases] == ["a", "b", "c"]
    assert info.cases[1].label == root / "labelsTr/b.nii"
    assert info.cases[2].label == root / "labelsTr/c.nii.gz"  # missing: named so check-data can say so
    assert info.labels == {0: "background", 1: "foreground"} and info.name == "plain"


def test_empty_folder_and_missing_folder(tmp_path):
    with pytest.raises(DataError, match="no dataset.json and no NIfTI files"):
        load_dataset(tmp_path)
    with pytest.raises(DataError, match="dataset folder not found"):
        load_dataset(tmp_path / "nope")


@pytest.mark.parametrize("entry", [
    {"image": "../outside/x.nii.gz", "label": "./labelsTr/x.nii.gz"},
    {"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/../../x.nii.gz"},
    {"image": "/etc/x.nii.gz", "label": "./labelsTr/x.nii.gz"},
])
def test_paths_escaping_the_root_are_refused(tmp_path, entry):
    root = tmp_path / "ds"
    _touch(root, "imagesTr/x.nii.gz", "labelsTr/x.nii.gz")
    _json(root, {"labels": {"0": "background", "1": "x"}, "training": [entry]})
    with pytest.raises(DataError, match="escapes the dataset folder|is absolute") as caught:
        load_dataset(root)
    assert caught.value.path == str(root / "dataset.json")


def test_test_entry_escaping_the_root_is_refused(tmp_path):
    root = tmp_path / "ds"
    _touch(root, "imagesTr/x.nii.gz", "labelsTr/x.nii.gz")
    _json(root, {"labels": {"0": "background", "1": "x"}, "test": ["./imagesTs/../../y.nii.gz"],
                 "training": [{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}]})
    with pytest.raises(DataError, match="escapes the dataset folder"):
        load_dataset(root)


def test_inside_root_accepts_normalised_paths(tmp_path):
    assert inside_root(tmp_path, "./imagesTr/../imagesTr/a.nii.gz") == tmp_path / "imagesTr" / "a.nii.gz"
    with pytest.raises(DataError, match="escapes"):
        inside_root(tmp_path, "imagesTr/../../a.nii.gz")
    with pytest.raises(DataError, match="empty or non-text"):
        inside_root(tmp_path, "")


@pytest.mark.parametrize("meta, message", [
    ({"training": []}, "has no 'labels'"),
    ({"labels": {"0": "background"}, "training": []}, "lists no training cases"),
    ({"labels": {"background": 0, "tumour": [1, 2]}}, "region"),
    ({"labels": {"0": "background", "-1": "x"}, "training": []}, "must be >= 0"),
    ({"labels": {"0": "background"}, "training": [{"image": "./imagesTr/x.nii.gz"}]}, "must have 'image' and"),
    ({"labels": {"0": "background"}, "training": "all"}, "must be a list"),
    ({"labels": {"0": "background"}, "modality": {"zero": "CT"}, "training": []}, "channel numbers"),
    ({"labels": {"0": "background", "1": "x"}, "test": [17],
      "training": [{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}]}, "test entry 0"),
    ([1, 2], "must hold a JSON object"),
])
def test_bad_dataset_json(tmp_path, meta, message):
    root = tmp_path / "ds"
    _touch(root, "imagesTr/x.nii.gz", "labelsTr/x.nii.gz")
    _json(root, meta)
    with pytest.raises(DataError, match=message):
        load_dataset(root)


def test_duplicate_cases_and_unparseable_json(tmp_path):
    root = tmp_path / "ds"
    entry = {"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}
    _json(root, {"labels": {"0": "background", "1": "x"}, "training": [entry, entry]})
    with pytest.raises(DataError, match=r"lists case\(s\) \['x'\] more than once"):
        load_dataset(root)
    (root / "dataset.json").write_text('{"labels": ')
    with pytest.raises(DataError, match="cannot read dataset.json"):
        load_dataset(root)


def test_group_channel_files(tmp_path):
    files = [tmp_path / n for n in ("b_0001.nii.gz", "a.nii.gz", "b_0000.nii.gz", "readme.md")]
    assert group_channel_files(files) == {"a": [tmp_path / "a.nii.gz"],
                                          "b": [tmp_path / "b_0000.nii.gz", tmp_path / "b_0001.nii.gz"]}
    with pytest.raises(DataError, match=r"case 'c' has channel files \[0, 2\]"):
        group_channel_files([tmp_path / "c_0000.nii.gz", tmp_path / "c_0002.nii.gz"])
