"""Synthetic phantoms: geometry, labels, the low-contrast lesion, determinism, and the dataset on disk."""

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from seg.data.layout import load_dataset
from seg.data.synthetic import make_affine, make_case, write_dataset
from seg.errors import DataError

SIZE = (24, 24, 20)
SPACING = (1.5, 1.5, 2.0)


def _case(seed, size=SIZE, spacing=SPACING, oblique=False):
    rng = np.random.default_rng([seed, 0])
    affine = make_affine(size, spacing, rng, oblique)
    return make_case(size, spacing, rng, affine)


def test_case_shapes_dtypes_and_both_labels():
    image, label = _case(0)
    assert image.shape == SIZE and label.shape == SIZE
    assert image.dtype == np.float32 and label.dtype == np.uint8
    assert np.isfinite(image).all() and image.min() >= 0
    counts = np.bincount(label.ravel(), minlength=3)
    assert len(counts) == 3  # only 0, 1, 2
    assert counts[1] > 10 * counts[2] > 0  # a large organ and a small lesion


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_lesion_contrast_to_liver_is_small_but_real(seed):
    image, label = _case(seed, size=(48, 48, 32))
    lesion = label == 2
    ring = ndimage.binary_dilation(lesion, iterations=2) & (label == 1)
    assert ring.sum() > lesion.sum()  # the lesion sits inside the liver, surrounded by it
    contrast = abs(image[lesion].mean() / image[ring].mean() - 1)
    assert 0.15 < contrast < 0.4  # fainter than the liver against the body, clearer than the liver's noise
    # while the liver itself stands out from the body around it
    outside = ndimage.binary_dilation(label > 0, iterations=3) & (label == 0)
    assert abs(image[label == 1].mean() / image[outside].mean() - 1) > 0.2


def test_anatomy_surrounded_by_air_with_bright_fat_rim():
    image, label = _case(0, size=(48, 48, 32))
    corner = image[:3, :3, :].mean()
    assert corner < 0.1 * image[label == 1].mean()  # air: noise only
    mid = image[:, 24, 16]
    body = np.flatnonzero(mid > 0.3 * image[label == 1].mean())
    rim = mid[body[0]:body[0] + 3].max()
    assert rim > 1.3 * image[label == 1].mean()  # subcutaneous fat brighter than liver


def test_same_seed_same_case_other_seed_other_case():
    a_image, a_label = _case(5)
    b_image, b_label = _case(5)
    c_image, c_label = _case(6)
    np.testing.assert_array_equal(a_image, b_image)
    np.testing.assert_array_equal(a_label, b_label)
    assert not np.array_equal(a_label, c_label)
    assert np.abs(a_image - c_image).mean() > 0.05 * a_image.mean()


def test_oblique_affine_is_rotated_and_flipped_with_the_spacing():
    affine = make_affine(SIZE, SPACING, np.random.default_rng(0), oblique=True)
    np.testing.assert_allclose(np.linalg.norm(affine[:3, :3], axis=0), SPACING)
    assert nib.aff2axcodes(affine) != ("R", "A", "S")
    off_diagonal = affine[:3, :3] - np.diag(np.diag(affine[:3, :3]))
    assert np.abs(off_diagonal).max() > 0.1  # rotated, not just flipped
    plain = make_affine(SIZE, SPACING)
    np.testing.assert_allclose(plain[:3, :3], np.diag(SPACING))
    np.testing.assert_allclose(plain @ [*(np.array(SIZE) - 1) / 2, 1], [0, 0, 0, 1])  # centred


def test_oblique_anatomy_is_upright_in_world_space():
    """The same draws on an oblique grid put the liver on the patient's right (+x in RAS) all the same."""
    size = (40, 40, 32)
    for oblique in (False, True):
        rng = np.random.default_rng([3, 0])
        affine = make_affine(size, SPACING, rng, oblique)
        _, label = make_case(size, SPACING, rng, affine)
        liver_world = affine @ [*np.argwhere(label == 1).mean(0), 1]
        centre_world = affine @ [*(np.array(size) - 1) / 2, 1]
        assert liver_world[0] - centre_world[0] > 5  # mm to the right of the centre


def test_write_dataset_layout_files_and_affine(tmp_path):
    root = write_dataset(tmp_path / "synth", cases=3, test_cases=2, size=SIZE, spacing=SPACING, oblique=True,
                         seed=1)
    info = load_dataset(root)
    assert [c.case_id for c in info.cases] == ["synth_000", "synth_001", "synth_002"]
    assert info.labels == {0: "background", 1: "liver", 2: "lesion"}
    assert info.modalities == ["MRI"]
    assert [c.case_id for c in info.test_images] == ["synth_003", "synth_004"]
    assert sorted(p.name for p in (root / "labelsTs").iterdir()) == ["synth_003.nii.gz", "synth_004.nii.gz"]
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["training"][0] == {"image": "./imagesTr/synth_000.nii.gz", "label": "./labelsTr/synth_000.nii.gz"}
    assert meta["numTraining"] == 3 and meta["numTest"] == 2

    image = nib.load(info.cases[0].images[0])
    label = nib.load(info.cases[0].label)
    assert image.shape == SIZE and image.get_data_dtype() == np.float32
    assert label.get_data_dtype() == np.uint8
    np.testing.assert_allclose(image.header.get_zooms(), SPACING, rtol=1e-6)
    np.testing.assert_allclose(image.affine, label.affine)
    assert not np.allclose(image.affine[:3, :3], np.diag(SPACING))
    np.testing.assert_allclose(image.get_qform(), image.get_sform(), atol=1e-4)
    assert set(np.unique(np.asarray(label.dataobj))) == {0, 1, 2}
    # the file holds what make_case renders for that case
    rng = np.random.default_rng([1, 0])
    affine = make_affine(SIZE, SPACING, rng, True)
    expected_image, expected_label = make_case(SIZE, SPACING, rng, affine)
    np.testing.assert_allclose(image.affine, affine, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(label.dataobj), expected_label)
    np.testing.assert_allclose(image.get_fdata(dtype=np.float32), expected_image)


def test_cases_do_not_depend_on_how_many_are_written(tmp_path):
    small = write_dataset(tmp_path / "a", cases=1, size=SIZE, seed=4)
    large = write_dataset(tmp_path / "b", cases=3, size=SIZE, seed=4)
    first = [nib.load(root / "imagesTr" / "synth_000.nii.gz").get_fdata() for root in (small, large)]
    np.testing.assert_array_equal(*first)
    other = nib.load(large / "imagesTr" / "synth_001.nii.gz").get_fdata()
    assert not np.array_equal(first[0], other)


def test_overwrites_a_previous_synth_dataset_but_nothing_else(tmp_path):
    root = write_dataset(tmp_path / "synth", cases=2, size=SIZE)
    write_dataset(root, cases=1, size=SIZE)
    assert len(load_dataset(root).cases) == 1
    assert not (root / "imagesTr" / "synth_001.nii.gz").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["synth"]  # no staging or old folders left behind

    other = tmp_path / "precious"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not written by `seg synth`"):
        write_dataset(other, cases=1, size=SIZE)
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


def test_failure_leaves_nothing_behind(tmp_path, monkeypatch):
    import seg.data.synthetic as synthetic

    calls = []

    def failing_save(array, affine, path):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full")
        return nib.save(nib.Nifti1Image(array, affine), path)

    monkeypatch.setattr(synthetic, "_save_nifti", failing_save)
    with pytest.raises(OSError, match="disk full"):
        write_dataset(tmp_path / "synth", cases=3, size=SIZE)
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="spacing"):
        write_dataset(tmp_path / "x", cases=1, size=SIZE, spacing=(1.0, 0.0, 1.0))
    with pytest.raises(DataError, match="size"):
        write_dataset(tmp_path / "x", cases=1, size=(4, 24, 24))
    with pytest.raises(DataError, match="training case"):
        write_dataset(tmp_path / "x", cases=0, size=SIZE)


def test_seg_synth_command(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "seg", "synth", "--output", str(out), "--cases", "2", "--test-cases", "1",
         "--size", "16", "16", "12", "--spacing", "2", "2", "3", "--oblique", "--seed", "7"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "wrote 2 training + 1 test cases" in result.stdout and str(out) in result.stdout
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["generator"] == {"tool": "seg synth", "phantom": 3, "seed": 7, "size": [16, 16, 12],
                                 "spacing": [2.0, 2.0, 3.0], "oblique": True, "orientation": "RAS", "modality": "MRI",
                                 "channels": 1}
    assert nib.load(out / "imagesTs" / "synth_002.nii.gz").shape == (16, 16, 12)


def test_ct_phantom_is_in_hounsfield_units_with_air_around_the_body():
    rng = np.random.default_rng([0, 0])
    image, label = make_case((40, 40, 16), (1.0, 1.0, 3.0), rng, make_affine((40, 40, 16), (1.0, 1.0, 3.0)), "CT")
    assert image.dtype == np.int16 and image.min() >= -1024 and image.max() <= 3071
    assert abs(float(image[0, 0, :].mean()) + 1000) < 30  # the corners are air
    liver, lesion = image[label == 1].astype(float), image[label == 2].astype(float)
    assert 70 < liver.mean() < 130  # an enhanced liver
    assert liver.mean() - lesion.mean() > 15 or lesion.mean() - liver.mean() > 15  # a lesion that CT can show


def test_two_channel_phantom_draws_one_anatomy_in_two_contrasts():
    rng = np.random.default_rng([3, 0])
    size = (32, 32, 20)
    image, label = make_case(size, SPACING, rng, make_affine(size, SPACING), channels=2)
    alone, label_alone = make_case(size, SPACING, np.random.default_rng([3, 0]), make_affine(size, SPACING))
    assert image.shape == (*size, 2) and np.array_equal(label, label_alone)
    assert np.array_equal(image[..., 0], alone)  # channel 0 is the one-channel phantom
    t1, t2 = image[..., 0], image[..., 1]
    # liver is brighter than spleen-like tissue on T1 and darker on T2: the contrasts differ, not just the scale
    assert np.corrcoef(t1[label == 1], t2[label == 1])[0, 1] < 0.99
    assert t2[label == 1].mean() / t2[label == 0].mean() != pytest.approx(t1[label == 1].mean() / t1[label == 0].mean(),
                                                                          rel=0.05)


@pytest.mark.parametrize("codes", ["LPS", "SAR", "AIL"])
def test_orientation_codes_set_the_affine_axes(codes):
    size, spacing = (16, 20, 24), (4.0, 0.8, 0.9)
    affine = make_affine(size, spacing, orientation=codes)
    assert nib.aff2axcodes(affine) == tuple(codes)
    assert np.allclose(nib.affines.voxel_sizes(affine), spacing)
    with pytest.raises(DataError, match="orientation"):
        make_affine(size, spacing, orientation="RRS")


def test_write_dataset_ct_and_two_channels(tmp_path):
    ct = write_dataset(tmp_path / "ct", cases=1, size=(16, 16, 8), modality="CT")
    assert load_dataset(ct).modalities == ["CT"]
    assert nib.load(ct / "imagesTr" / "synth_000.nii.gz").get_data_dtype() == np.int16
    mr = write_dataset(tmp_path / "mr2", cases=1, size=(16, 16, 8), channels=2, orientation="LPS")
    assert load_dataset(mr).modalities == ["T1", "T2"]
    image = nib.load(mr / "imagesTr" / "synth_000.nii.gz")
    assert image.shape == (16, 16, 8, 2) and nib.aff2axcodes(image.affine) == ("L", "P", "S")
    with pytest.raises(DataError, match="channels"):
        write_dataset(tmp_path / "bad", cases=1, size=(16, 16, 8), modality="CT", channels=2)
