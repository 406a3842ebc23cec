import json

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import Invertd
from scipy.spatial.transform import Rotation

from seg.data.fingerprint import compute_fingerprint
from seg.data.layout import load_dataset
from seg.data.transforms import inference_transforms, make_preprocessing, train_transforms, val_transforms
from seg.errors import DataError


def save(path, array, affine=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), path)
    return path


def write_dataset(root, cases, modality=("MRI",), labels=("background", "left", "right")):
    """cases: {case_id: (list of channel arrays or one 4D array, label array, affine)}, MSD or nnU-Net channel files."""
    entries = []
    for case_id, (images, label, affine) in cases.items():
        if isinstance(images, list):
            for c, channel in enumerate(images):
                save(root / "imagesTr" / f"{case_id}_{c:04d}.nii.gz", channel, affine)
        else:
            save(root / "imagesTr" / f"{case_id}.nii.gz", images, affine)
        save(root / "labelsTr" / f"{case_id}.nii.gz", label, affine)
        entries.append({"image": f"./imagesTr/{case_id}.nii.gz", "label": f"./labelsTr/{case_id}.nii.gz"})
    meta = {"name": "t", "modality": {str(i): m for i, m in enumerate(modality)},
            "labels": {str(i): n for i, n in enumerate(labels)}, "training": entries}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def oblique_lps_affine():
    """Rotated by a few degrees, axes pointing L, P, S, anisotropic voxels (1.2 x 0.9 x 2.5 mm)."""
    affine = np.eye(4)
    affine[:3, :3] = Rotation.from_euler("xyz", [10, -7, 15], degrees=True).as_matrix() @ np.diag([-1.2, -0.9, 2.5])
    affine[:3, 3] = [30.0, -20.0, 10.0]
    return affine


def phantom(shape=(20, 24, 12), seed=0):
    rng = np.random.default_rng(seed)
    image = rng.normal(100, 20, shape).astype(np.float32)
    image[:2] = 0  # a zero border for crop_foreground to remove (and Invertd to put back)
    label = np.zeros(shape, np.float32)  # float on disk, as in some MSD cases
    label[6:12, 8:15, 4:8] = 1
    label[12:15, 8:15, 4:8] = 2
    return image, label


@pytest.mark.parametrize("spatial_dims,spacing,expected", [
    (3, None, [1.2, 0.9, 2.5]),  # the dataset's own (median) spacing: no resampling
    (3, [1.0, 1.0, 1.5], [1.0, 1.0, 1.5]),
    (2, [1.0, 1.0, 1.5], [1.0, 1.0, 2.5]),  # 2D: in-plane resampled, slices keep their thickness
])
def test_invertd_returns_prediction_to_the_original_grid(tmp_path, spatial_dims, spacing, expected):
    image, label = phantom()
    affine = oblique_lps_affine()
    root = write_dataset(tmp_path / "ds", {"a": (image, label, affine)})
    info = load_dataset(root)
    prep = make_preprocessing(info, compute_fingerprint(info), spatial_dims=spatial_dims,
                              patch_size=[8] * spatial_dims, spacing=spacing)
    transforms = val_transforms(prep)
    data = transforms({"image": str(info.cases[0].images[0]), "label": str(info.cases[0].label)})
    assert data["image"].shape[1:] != image.shape  # cropped (and resampled)
    assert np.allclose(np.linalg.norm(data["image"].affine[:3, :3], axis=0), expected, atol=1e-4)

    data["pred"] = data["label"].float()  # a perfect "prediction" in the preprocessed grid
    pred = Invertd("pred", transform=transforms, orig_keys="label", nearest_interp=True)(data)["pred"]
    assert tuple(pred.shape) == (1, *image.shape)
    assert np.allclose(pred.affine.numpy(), affine, atol=1e-4)
    restored = pred[0].numpy()
    if spacing is None:  # no resampling: every voxel lands back exactly
        assert np.array_equal(restored, label)
    for c in (1, 2):
        dice = 2 * ((restored == c) & (label == c)).sum() / ((restored == c).sum() + (label == c).sum())
        assert dice > 0.95


def test_channel_files_and_4d_files_give_channels(tmp_path):
    image, label = phantom((12, 12, 8))
    two = [image, 3 * image]  # zero where channel 0 is zero
    root = write_dataset(tmp_path / "nnunet", {"a": (two, label, np.eye(4))}, modality=("T2", "ADC"))
    info = load_dataset(root)
    assert info.cases[0].images[0].name == "a_0000.nii.gz" and len(info.cases[0].images) == 2
    prep = make_preprocessing(info, compute_fingerprint(info), patch_size=[8, 8, 8])
    out = val_transforms(prep)({"image": [str(p) for p in info.cases[0].images], "label": str(info.cases[0].label)})
    assert out["image"].shape == (2, 10, 12, 8)  # the 2 zero slices cropped
    # each channel normalised on its own: both come out identical although their scales differ
    assert torch.allclose(out["image"][0], out["image"][1], atol=1e-4)

    root4 = write_dataset(tmp_path / "msd4d", {"a": (np.stack(two, -1), label, np.eye(4))}, modality=("T2", "ADC"))
    info4 = load_dataset(root4)
    out4 = val_transforms(prep)({"image": str(info4.cases[0].images[0]), "label": str(info4.cases[0].label)})
    assert torch.equal(out4["image"], out["image"])


def test_ct_normalisation_clips_then_scales(tmp_path):
    shape = (10, 10, 10)
    image = np.full(shape, -1000.0, np.float32)
    image[3:7, 3:7, 3:7] = np.linspace(0, 200, 64).reshape(4, 4, 4)
    label = np.zeros(shape, np.uint8)
    label[3:7, 3:7, 3:7] = 1
    root = write_dataset(tmp_path / "ct", {"a": (image, label, np.eye(4))}, modality=("CT",),
                         labels=("background", "organ"))
    info = load_dataset(root)
    fingerprint = compute_fingerprint(info, intensities=True)
    stats = fingerprint["intensity"][0]
    assert stats["mean"] == pytest.approx(100.0) and 0 < stats["percentile_00_5"] < 2
    prep = make_preprocessing(info, fingerprint, patch_size=[8, 8, 8], ct_window=[-100, 300])
    assert prep["normalization"] == [{"scheme": "ct", "clip": [-100.0, 300.0], "mean": stats["mean"],
                                      "std": stats["std"]}]
    assert prep["crop_threshold"] == [-500.0]
    # the air around the body (-1000 HU, which crop-to-nonzero kept) is cropped: only the 4^3 body is left
    cropped = inference_transforms(prep)({"image": str(info.cases[0].images[0])})["image"]
    assert cropped.shape == (1, 4, 4, 4)
    out = inference_transforms({**prep, "crop_foreground": False})({"image": str(info.cases[0].images[0])})["image"]
    std = stats["std"]
    assert out.min().item() == pytest.approx((-100 - 100) / std, rel=1e-5)  # air clipped to the window
    assert out[0, 5, 5, 5].item() == pytest.approx((image[5, 5, 5] - 100) / std, rel=1e-4)
    assert torch.equal(cropped[0], out[0, 3:7, 3:7, 3:7])


def _blob_case(tmp_path, shape=(32, 32, 32)):
    image = np.random.default_rng(0).normal(0, 1, shape).astype(np.float32) + 5
    label = np.zeros(shape, np.uint8)
    centre = tuple(slice(n // 2 - 2, n // 2 + 2) for n in shape)
    label[centre] = 1  # a small blob in the middle, far from the borders of the 32^3 case
    return {"image": str(save(tmp_path / "img.nii.gz", image)), "label": str(save(tmp_path / "lab.nii.gz", label))}


def _prep(spatial_dims, patch):
    return {"spatial_dims": spatial_dims, "orientation": "RAS",
            "spacing": [1.0, 1.0, 1.0 if spatial_dims == 3 else 0.0],
            "normalization": [{"scheme": "zscore", "nonzero": True}], "patch_size": patch, "crop_foreground": True}


def test_foreground_centred_share_matches_foreground_ratio(tmp_path):
    item = _blob_case(tmp_path)
    transforms = train_transforms(_prep(3, [8, 8, 8]), samples_per_volume=50, foreground_ratio=1 / 3, augment=False)
    transforms.set_random_state(seed=0)
    centres = [s["label"][0, 4, 4, 4].item() for _ in range(6) for s in transforms(item)]
    assert len(centres) == 300
    assert np.mean(np.array(centres) > 0) == pytest.approx(1 / 3, abs=0.07)
    # and the ratio is a real knob: mostly background patches at 0.1
    low = train_transforms(_prep(3, [8, 8, 8]), samples_per_volume=100, foreground_ratio=0.1, augment=False)
    low.set_random_state(seed=0)
    assert np.mean([s["label"][0, 4, 4, 4].item() > 0 for s in low(item)]) < 0.2


def test_class_sampling_centres_patches_on_a_small_class_as_often_as_on_a_large_one(tmp_path):
    shape = (32, 32, 32)
    image = np.random.default_rng(0).normal(0, 1, shape).astype(np.float32) + 5
    label = np.zeros(shape, np.uint8)
    label[8:24, 8:24, 8:24] = 1  # an organ of 4096 voxels
    label[15:17, 15:17, 15:17] = 2  # a lesion of 8 voxels inside it
    item = {"image": str(save(tmp_path / "img.nii.gz", image)), "label": str(save(tmp_path / "lab.nii.gz", label))}
    prep = {**_prep(3, [8, 8, 8]), "num_classes": 3}

    def centres(**kwargs):
        transforms = train_transforms(prep, samples_per_volume=100, augment=False, **kwargs)
        transforms.set_random_state(seed=0)
        return np.array([s["label"][0, 4, 4, 4].item() for _ in range(3) for s in transforms(item)])

    by_class = centres(foreground_ratio=0.5)  # the default: sampling="classes"
    assert np.mean(by_class == 0) == pytest.approx(0.5, abs=0.07)
    assert np.mean(by_class == 2) == pytest.approx(0.25, abs=0.07)  # half the foreground share
    assert np.mean(centres(class_ratios=[1, 1, 2]) == 2) == pytest.approx(0.5, abs=0.07)
    # any labelled voxel: the lesion gets its share of the foreground voxels, about 0.1 % of the patches
    assert np.mean(centres(foreground_ratio=0.5, sampling="posneg") == 2) < 0.02
    with pytest.raises(ValueError, match="class_ratios"):
        train_transforms(prep, class_ratios=[1, 1])


@pytest.mark.parametrize("spatial_dims,patch", [(3, [8, 12, 6]), (2, [12, 10])])
@pytest.mark.parametrize("albumentations", [False, True])
def test_training_patches_have_the_patch_size(tmp_path, spatial_dims, patch, albumentations):
    item = _blob_case(tmp_path, shape=(20, 10, 6))  # smaller than the patch along y: padded
    transforms = train_transforms(_prep(spatial_dims, patch), samples_per_volume=3, flip_axes=[0, 1],
                                  augment=True, albumentations=albumentations)
    transforms.set_random_state(seed=1)
    for _ in range(3):
        samples = transforms(item)
        assert len(samples) == 3
        for s in samples:
            assert tuple(s["image"].shape) == (1, *patch) and s["image"].dtype == torch.float32
            assert tuple(s["label"].shape) == (1, *patch) and s["label"].dtype == torch.int64
            assert set(s["label"].unique().tolist()) <= {0, 1}


def test_training_is_reproducible_with_a_seed(tmp_path):
    item = _blob_case(tmp_path)

    def draw(seed):
        t = train_transforms(_prep(2, [12, 12]), samples_per_volume=4, augment=True, albumentations=True)
        t.set_random_state(seed=seed)
        return torch.stack([s["image"].as_tensor() for _ in range(3) for s in t(item)])

    assert torch.equal(draw(5), draw(5))
    assert not torch.equal(draw(5), draw(6))


def test_unreadable_scan_is_a_data_error_naming_the_file(tmp_path):
    item = _blob_case(tmp_path)
    (tmp_path / "img.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(Exception) as caught:
        inference_transforms(_prep(3, [8, 8, 8]), keys=("image", "label"))(item)
    error = caught.value
    while error is not None and not isinstance(error, DataError):  # MONAI's Compose wraps it in a RuntimeError
        error = error.__cause__
    assert isinstance(error, DataError) and error.path == item["image"]


@pytest.mark.parametrize("nonzero", [True, False])
def test_in_place_zscore_matches_monai(nonzero):
    from monai.transforms import NormalizeIntensity

    from seg.data.transforms import zscore_

    torch.manual_seed(0)
    image = torch.randn(20, 30, 40) * 300 + 100
    image[:4] = 0  # a zero background
    expected = NormalizeIntensity(nonzero=nonzero, channel_wise=True)(image.clone()[None])[0]
    got = zscore_(image.clone(), nonzero)
    assert torch.allclose(got, expected, atol=1e-5)
    assert (got[:4] == 0).all() == nonzero
    assert torch.equal(zscore_(torch.zeros(3, 3, 3), True), torch.zeros(3, 3, 3))  # nothing to normalise
    assert torch.equal(zscore_(torch.full((3, 3, 3), 7.0), False), torch.zeros(3, 3, 3))  # std 0 counts as 1


def test_in_place_ct_normalisation_matches_monai():
    from monai.transforms import ScaleIntensityRange

    from seg.data.transforms import ct_normalize_

    image = torch.linspace(-1200, 1500, 6000).reshape(10, 20, 30)
    low, high, mean, std = -100.0, 250.0, 40.0, 60.0
    expected = ScaleIntensityRange(low, high, (low - mean) / std, (high - mean) / std, clip=True)(image.clone())
    got = ct_normalize_(image.clone(), low, high, mean, std)
    assert torch.allclose(got, expected, atol=1e-5)
    assert got.min() == pytest.approx((low - mean) / std) and got.max() == pytest.approx((high - mean) / std)


def test_nan_in_one_channel_file_is_a_data_error_naming_that_file(tmp_path):
    good = np.random.default_rng(0).random((6, 7, 8)).astype(np.float32)
    bad = good.copy()
    bad[1, 2, 3] = np.inf
    files = [save(tmp_path / "case_0000.nii.gz", good), save(tmp_path / "case_0001.nii.gz", bad)]
    preprocessing = {"orientation": "RAS", "spacing": [0, 0, 0], "crop_foreground": False,
                     "normalization": [{"scheme": "zscore", "nonzero": False}] * 2}
    with pytest.raises(RuntimeError) as err:  # MONAI's Compose wraps what its steps raise
        inference_transforms(preprocessing)({"image": [str(f) for f in files]})
    cause = err.value.__cause__
    assert isinstance(cause, DataError) and "1 of 336 voxels are NaN or infinite" in str(cause)
    assert str(files[1]) in str(cause) and str(files[0]) not in str(cause)


def test_body_mask_crops_air_and_ignores_a_bright_speck_in_it():
    from seg.data.transforms import BodyMask

    image = torch.full((1, 60, 50, 20), -1000.0)
    image[0, 10:40, 15:35, 2:18] = 40.0  # the body
    image[0, 58, 1, 19] = 300.0  # one bright voxel in the air (noise, a streak)
    mask = BodyMask([-500.0])(image)
    assert mask.shape == (1, 60, 50, 20) and mask.dtype == torch.bool
    where = torch.nonzero(mask[0])
    assert where.min(0).values.tolist() == [10, 15, 2] and where.max(0).values.tolist() == [39, 34, 17]
    # an MR channel (no threshold) keeps crop-to-nonzero exactly
    mr = torch.zeros((1, 8, 8, 8))
    mr[0, 2:5, 3:6, 1:7] = 5.0
    assert torch.equal(BodyMask([None])(mr), mr != 0)


def test_ct_crop_is_inverted_back_onto_the_scans_grid(tmp_path):
    from monai.transforms import Invertd

    shape = (24, 20, 12)
    image = np.full(shape, -1000.0, np.float32)
    image[4:20, 5:15, 2:10] = 50.0
    label = np.zeros(shape, np.uint8)
    label[8:12, 8:12, 4:8] = 1
    root = write_dataset(tmp_path / "ct", {"a": (image, label, np.diag([0.8, 0.8, 3.0, 1.0]))}, modality=("CT",),
                         labels=("background", "organ"))
    info = load_dataset(root)
    prep = make_preprocessing(info, compute_fingerprint(info, intensities=True), patch_size=[8, 8, 8])
    transforms = inference_transforms(prep, keys=("image", "label"))
    out = transforms({"image": str(info.cases[0].images[0]), "label": str(info.cases[0].label)})
    assert out["image"].shape == (1, 16, 10, 8)  # the body's box, no air
    back = Invertd("label", transform=transforms, orig_keys="image", nearest_interp=True)(out)["label"]
    assert back.shape == (1, *shape) and np.array_equal(back[0].numpy(), label)
