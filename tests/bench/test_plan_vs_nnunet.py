"""bench/plan_vs_nnunet.py: it parses, converts a dataset to nnU-Net v2's raw layout correctly and maps nnU-Net's
axes back to R, A, S. Needs neither nnunetv2 nor a network."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from seg.data.synthetic import write_dataset


@pytest.fixture(scope="module")
def bench(bench_script):
    return bench_script("plan_vs_nnunet")


def test_the_script_parses_its_options(bench):
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--help"])
    assert exit_.value.code == 0


def test_one_channel_dataset_becomes_symlinks_and_a_v2_dataset_json(bench, tmp_path):
    root = write_dataset(tmp_path / "thin", cases=3, size=(12, 10, 8), spacing=(0.8, 0.8, 4.0))
    folder = bench.to_nnunet(root, tmp_path / "raw", 902, "ThinMR")
    assert folder == tmp_path / "raw" / "Dataset902_ThinMR"
    ids = sorted(p.name[: -len(".nii.gz")] for p in (root / "labelsTr").glob("*.nii.gz"))
    assert sorted(p.name for p in (folder / "imagesTr").iterdir()) == [f"{i}_0000.nii.gz" for i in ids]
    assert sorted(p.name for p in (folder / "labelsTr").iterdir()) == [f"{i}.nii.gz" for i in ids]
    for i in ids:
        image, label = folder / "imagesTr" / f"{i}_0000.nii.gz", folder / "labelsTr" / f"{i}.nii.gz"
        assert image.is_symlink() and image.resolve() == (root / "imagesTr" / f"{i}.nii.gz").resolve()
        assert label.is_symlink() and label.resolve() == (root / "labelsTr" / f"{i}.nii.gz").resolve()
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "MRI"}
    assert meta["labels"] == {"background": 0, "liver": 1, "lesion": 2}
    assert meta["numTraining"] == 3
    assert meta["file_ending"] == ".nii.gz"
    # seg reads the converted folder as the same dataset (nnU-Net v2 layout)
    from seg.data.layout import load_dataset

    info = load_dataset(folder)
    assert [c.case_id for c in info.cases] == ids and info.labels == {0: "background", 1: "liver", 2: "lesion"}


def test_two_channel_4d_files_are_split_into_one_file_per_channel(bench, tmp_path):
    root = write_dataset(tmp_path / "t1t2", cases=2, size=(12, 10, 8), spacing=(1.5, 1.5, 2.0), channels=2)
    folder = bench.to_nnunet(root, tmp_path / "raw", 904, "TwoChannelMR")
    meta = json.loads((folder / "dataset.json").read_text())
    assert len(meta["channel_names"]) == 2 and meta["numTraining"] == 2
    for source in sorted((root / "imagesTr").glob("*.nii.gz")):
        case = source.name[: -len(".nii.gz")]
        original = nib.load(source)
        for c in range(2):
            part = folder / "imagesTr" / f"{case}_{c:04d}.nii.gz"
            assert part.exists() and not part.is_symlink()
            image = nib.load(part)
            assert image.shape == original.shape[:3]
            np.testing.assert_allclose(image.affine, original.affine)
            np.testing.assert_array_equal(np.asanyarray(image.dataobj), np.asanyarray(original.dataobj)[..., c])
        assert not (folder / "imagesTr" / f"{case}_0002.nii.gz").exists()
        assert (folder / "labelsTr" / f"{case}.nii.gz").is_symlink()


def test_ct_modality_reaches_channel_names(bench, tmp_path):
    root = write_dataset(tmp_path / "ct", cases=1, size=(12, 12, 8), spacing=(0.8, 0.8, 3.0), modality="CT")
    meta = json.loads((bench.to_nnunet(root, tmp_path / "raw", 903, "CT") / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "CT"}  # nnU-Net picks CTNormalization from the name "CT"


def test_converting_twice_replaces_the_links(bench, tmp_path):
    root = write_dataset(tmp_path / "d", cases=1, size=(8, 8, 8), spacing=(1.0, 1.0, 1.0))
    bench.to_nnunet(root, tmp_path / "raw", 901, "D")
    folder = bench.to_nnunet(root, tmp_path / "raw", 901, "D")
    assert len(list((folder / "imagesTr").iterdir())) == 1


@pytest.mark.parametrize("orientation, expected", [("RAS", [2, 1, 0]), ("LPS", [2, 1, 0]), ("SAR", [0, 1, 2]),
                                                   ("ASL", [0, 2, 1])])
def test_simpleitk_array_axes_map_to_ras_through_the_affine(bench, orientation, expected):
    from seg.data.synthetic import make_affine

    # SimpleITK's array is (k, j, i) of the file; file axis i of an "SAR" file runs along S, so array axis 2 -> S
    assert bench.ras_of_array_axes(make_affine((8, 8, 8), (1, 1, 1), orientation=orientation)) == expected


def test_nnunet_plans_are_read_along_ras(bench):
    # a thin RAS dataset: SimpleITK arrays are (S, A, R); transpose_forward [0, 1, 2] keeps S first
    plans = {"transpose_forward": [0, 1, 2], "configurations": {
        "2d": {"patch_size": [128, 96], "spacing": [0.8, 0.7], "median_image_size_in_voxels": [120, 90],
               "batch_size": 40, "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False],
               "architecture": {"arch_kwargs": {"features_per_stage": [32, 64], "strides": [[1, 1], [2, 2]]}}},
        "3d_fullres": {"patch_size": [16, 128, 96], "spacing": [4.0, 0.8, 0.7],
                       "median_image_size_in_voxels": [16, 120, 90], "batch_size": 2,
                       "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False],
                       "architecture": {"arch_kwargs": {"features_per_stage": [32, 64, 128],
                                                        "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2]]}}},
        "3d_cascade_fullres": {"inherits_from": "3d_fullres"}}}
    rows = {r["config"]: r for r in bench.nnunet_summaries(plans, [2, 1, 0])}
    assert set(rows) == {"2d", "3d_fullres"}
    assert rows["3d_fullres"]["spacing"] == [0.7, 0.8, 4.0]
    assert rows["3d_fullres"]["patch"] == [96, 128, 16]
    assert rows["3d_fullres"]["strides"] == [[2, 2], [2, 2], [1, 2]]
    assert rows["3d_fullres"]["num_downsamplings"] == 2
    assert rows["2d"]["patch"] == [96, 128, None] and rows["2d"]["spacing"] == [0.7, 0.8, None]
    assert rows["2d"]["strides"] == [[2], [2], None]


def test_nnunet_transpose_forward_is_undone(bench):
    # a thin dataset stored thick axis first ("SAR" files): SimpleITK arrays are (R, A, S), nnU-Net transposes
    # with [2, 0, 1] so that S comes first, and plans (S, R, A)
    plans = {"transpose_forward": [2, 0, 1], "configurations": {
        "3d_fullres": {"patch_size": [16, 96, 112], "spacing": [4.0, 0.8, 0.7],
                       "median_image_size_in_voxels": [16, 96, 112], "batch_size": 2,
                       "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [True],
                       "architecture": {"arch_kwargs": {"features_per_stage": [32, 64],
                                                        "strides": [[1, 1, 1], [1, 2, 2]]}}}}}
    (row,) = bench.nnunet_summaries(plans, [0, 1, 2])
    assert row["spacing"] == [0.8, 0.7, 4.0] and row["patch"] == [96, 112, 16]
    assert row["strides"] == [[2], [2], [1]]
    assert row["normalization"] == "ZScoreNormalization (inside the nonzero mask)"
