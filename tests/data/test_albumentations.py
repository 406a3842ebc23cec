import albumentations as A
import cv2
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose

from seg.data.albumentations_transform import Albumentationsd, default_augmentations


def sample(spatial=(24, 20), channels=2, seed=0):
    """A z-scored-looking image (negative values included) with a label map whose values live in the image."""
    g = torch.Generator().manual_seed(seed)
    label = torch.zeros((1, *spatial), dtype=torch.int64)
    label[(0, *(slice(n // 4, n // 2) for n in spatial))] = 1
    label[(0, *(slice(n // 2, 3 * n // 4) for n in spatial))] = 2
    image = torch.randn((channels, *spatial), generator=g) * 0.1 + label.float() * 2 - 1
    affine = torch.diag(torch.tensor([1.5, 1.5, 2.0, 1.0], dtype=torch.float64))
    return {"image": MetaTensor(image, affine=affine), "label": MetaTensor(label, affine=affine), "case_id": "x"}


@pytest.mark.parametrize("spatial", [(24, 20), (16, 12, 8)])
def test_keeps_type_shape_dtype_meta_and_changes_values(spatial):
    data = sample(spatial)
    volume = len(spatial) == 3
    t = Albumentationsd(("image", "label"), default_augmentations(spatial=not volume, volume=volume))
    t.set_random_state(0)
    changed = 0
    for _ in range(20):
        out = t(data)
        for key in ("image", "label"):
            assert isinstance(out[key], MetaTensor)
            assert out[key].shape == data[key].shape and out[key].dtype == data[key].dtype
            assert torch.equal(out[key].affine, data[key].affine)
        assert set(out["label"].unique().tolist()) <= {0, 1, 2}
        assert out["case_id"] == "x"
        changed += not torch.allclose(out["image"], data["image"])
    assert changed >= 5  # each transform fires with p 0.1-0.25; over 20 draws some always do


def test_intensities_keep_their_scale():
    """albumentations clips float images to [0, 1]; the wrapper maps each channel there and back."""
    data = sample()
    out = Albumentationsd(("image",), A.RandomGamma(gamma_limit=(150, 150), p=1))(data)
    image, before = out["image"], data["image"]
    assert not torch.allclose(image, before)
    for c in range(2):  # gamma fixes the ends of the range: min and max survive, nothing is clipped to [0, 1]
        assert image[c].min().item() == pytest.approx(before[c].min().item(), abs=1e-5)
        assert image[c].max().item() == pytest.approx(before[c].max().item(), abs=1e-5)
    assert image.min() < -0.5


@pytest.mark.parametrize("spatial", [(24, 20), (16, 12, 8)])
def test_label_follows_the_image(spatial):
    data = sample(spatial, channels=1)
    data["image"] = MetaTensor(data["label"].float() * 10)  # image and label carry the same picture
    rotate = A.Affine(rotate=(90, 90), interpolation=cv2.INTER_NEAREST, border_mode=cv2.BORDER_CONSTANT, p=1)
    out = Albumentationsd(("image", "label"), rotate)(data)
    assert not torch.equal(out["label"], data["label"])  # it moved
    assert torch.equal(out["image"].round().long(), out["label"] * 10)  # and both moved the same way
    if len(spatial) == 3:  # a volume: each axial slice turned as that slice alone would have
        for z in range(spatial[2]):
            alone = {"image": data["image"][..., z], "label": data["label"][..., z]}
            assert torch.equal(out["label"][..., z], Albumentationsd(("image", "label"), rotate)(alone)["label"])


def test_reproducible_with_a_seed_inside_a_monai_compose():
    data = sample()

    def run(seed):
        chain = Compose([Albumentationsd(("image", "label"), default_augmentations())])
        chain.set_random_state(seed=seed)
        return torch.stack([chain(data)["image"].as_tensor() for _ in range(10)])

    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


def test_image_without_label():
    data = sample()
    del data["label"]
    out = Albumentationsd(("image", "label"), default_augmentations())(data)
    assert "label" not in out and out["image"].shape == data["image"].shape
