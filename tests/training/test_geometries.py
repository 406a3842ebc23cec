"""Train, validate with overlays, predict and draw on the geometries users bring: thin anisotropic MR, the thick
axis stored first, LPS and oblique affines, CT in HU with air around the body, two channels, and 2D.

Each geometry runs the real command line in this process (`seg.cli.main`): `seg fit` for one short epoch with
validation and overlay export, then `seg predict` and `seg overlays` on a held-out scan of the same geometry.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

import seg.explain.export as export_module
import seg.training.overlays as overlays_module
from seg.cli import main
from seg.data.synthetic import write_dataset

GEOMETRIES = {
    "thin": {"size": (96, 96, 16), "spacing": (0.8, 0.8, 4.0)},
    "thick_axis_first": {"size": (16, 96, 96), "spacing": (4.0, 0.8, 0.8), "orientation": "SAR"},
    "lps": {"size": (40, 40, 24), "spacing": (1.5, 1.5, 2.0), "orientation": "LPS"},
    "oblique": {"size": (40, 40, 24), "spacing": (1.5, 1.5, 2.0), "oblique": True},
    "ct": {"size": (96, 96, 24), "spacing": (0.8, 0.8, 3.0), "modality": "CT"},
    "two_channels": {"size": (40, 40, 24), "spacing": (1.5, 1.5, 2.0), "channels": 2},
    "two_channel_files": {"size": (40, 40, 24), "spacing": (1.5, 1.5, 2.0), "channels": 2, "nnunet": True},
    "2d": {"size": (96, 96, 16), "spacing": (0.8, 0.8, 4.0), "spatial_dims": 2},
}
VAL_CASE, TEST_CASE = "synth_003", "synth_004"


def _config(tmp_path: Path, root: Path, spatial_dims: int = 3, **trainer) -> Path:
    config = {
        "trainer": {"max_epochs": 1, "accelerator": "cpu", "limit_train_batches": 2, "check_val_every_n_epoch": 1,
                    "log_every_n_steps": 1, "enable_progress_bar": False, **trainer},
        "model": {"channels": [8, 16, 32], "strides": [2, 2], "sw_batch_size": 2, "sw_overlap": 0.25},
        "data": {"root": str(root), "spatial_dims": spatial_dims,
                 "patch_size": [32, 32] if spatial_dims == 2 else [32, 32, 16], "batch_size": 1,
                 "samples_per_volume": 1, "num_workers": 0, "val_cases": [VAL_CASE], "augment": False},
        "logging": "csv",
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _same_grid(path: Path, reference: Path) -> None:
    image, ref = nib.load(path), nib.load(reference)
    assert image.shape[:3] == ref.shape[:3]
    assert np.allclose(image.affine, ref.affine, atol=1e-4)


def _as_nnunet(root: Path) -> Path:
    """The 4D MSD dataset at `root` rewritten in nnU-Net v2's layout: one file per channel, `case_0000.nii.gz`."""
    out = root.parent / "nnunet"
    for split in ("Tr", "Ts"):
        (out / f"images{split}").mkdir(parents=True)
        (root / f"labels{split}").rename(out / f"labels{split}")
        for path in sorted((root / f"images{split}").glob("*.nii.gz")):
            image = nib.load(path)
            for c in range(image.shape[3]):
                channel = nib.Nifti1Image(np.asarray(image.dataobj)[..., c], image.affine, image.header)
                nib.save(channel, out / f"images{split}" / path.name.replace(".nii.gz", f"_{c:04d}.nii.gz"))
    meta = {"channel_names": {"0": "T1", "1": "T2"}, "labels": {"background": 0, "liver": 1, "lesion": 2},
            "numTraining": 4, "file_ending": ".nii.gz"}
    (out / "dataset.json").write_text(json.dumps(meta))
    return out


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Path]:
    out = {}
    for name, spec in GEOMETRIES.items():
        spec = {k: v for k, v in spec.items() if k not in ("spatial_dims", "nnunet")}
        out[name] = write_dataset(tmp_path_factory.mktemp(name) / "data", cases=4, test_cases=1, **spec)
        if GEOMETRIES[name].get("nnunet"):
            out[name] = _as_nnunet(out[name])
    return out


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_fit_validate_overlays_and_predict_in_the_scans_geometry(name, datasets, tmp_path, monkeypatch):
    root = datasets[name]
    titles = []
    render = export_module.render_overlay

    def spy(*args, **kwargs):  # the real figure, with the scan column's title noted
        titles.append(kwargs.get("image_title"))
        return render(*args, **kwargs)

    monkeypatch.setattr(export_module, "render_overlay", spy)
    run = tmp_path / "run"
    config = _config(tmp_path, root, GEOMETRIES[name].get("spatial_dims", 3))
    assert main(["fit", "--config", str(config), "--trainer.default_root_dir", str(run)]) == 0

    for checkpoint in ("last.ckpt", "best.ckpt"):
        assert torch.load(run / "checkpoints" / checkpoint, weights_only=True)["global_step"] == 2
    folder = run / "overlays" / "epoch=0" / VAL_CASE
    assert (folder / "overlay.png").stat().st_size > 10_000
    gates = sorted(folder.glob("gate_*.nii.gz"))
    assert [g.name for g in gates] == ["gate_0.nii.gz", "gate_1.nii.gz"]
    val_image = next((root / "imagesTr").glob(f"{VAL_CASE}*.nii.gz"))  # synth_003.nii.gz or synth_003_0000.nii.gz
    for gate in gates:  # in the scan's own grid, whatever its orientation and spacing
        _same_grid(gate, val_image)
        values = np.asarray(nib.load(gate).dataobj)
        assert 0.0 <= values.min() and values.max() <= 1.0
    assert titles == (["scan: channel 0 (T1) of 2"] if GEOMETRIES[name].get("channels") == 2 else ["scan"])

    scans = root / "imagesTs"
    predictions = tmp_path / "predictions"
    assert main(["predict", "--checkpoint", str(run / "checkpoints" / "best.ckpt"), "--input", str(scans),
                 "--output", str(predictions)]) == 0
    test_image = next(scans.glob(f"{TEST_CASE}*.nii.gz"))
    label = predictions / f"{TEST_CASE}.nii.gz"
    _same_grid(label, test_image)
    values = np.asarray(nib.load(label).dataobj)
    assert np.issubdtype(values.dtype, np.integer) and set(np.unique(values)) <= {0, 1, 2}
    if name == "ct":
        # air is cropped before the network: the corners of the scan come back as background
        preprocessing = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)["seg"]["preprocessing"]
        assert preprocessing["crop_threshold"] == [-500.0]
        assert values[0, 0, :].max() == 0 and values[-1, -1, :].max() == 0

    drawn = tmp_path / "drawn"
    assert main(["overlays", "--checkpoint", str(run / "checkpoints" / "best.ckpt"), "--input", str(scans),
                 "--output", str(drawn)]) == 0
    assert (drawn / TEST_CASE / "overlay.png").stat().st_size > 10_000
    _same_grid(drawn / TEST_CASE / "gate_1.nii.gz", test_image)
    assert titles[-1] == titles[0]  # `seg overlays` names the channel it shows as the callback does


def test_a_failing_overlay_export_is_logged_and_training_goes_on(datasets, tmp_path, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("the drawing broke")

    monkeypatch.setattr(overlays_module, "export_case", broken)
    run = tmp_path / "run"
    config = _config(tmp_path, datasets["thin"], max_epochs=2)
    with caplog.at_level(logging.ERROR, logger="seg.training.overlays"):
        assert main(["fit", "--config", str(config), "--trainer.default_root_dir", str(run)]) == 0
    failures = [r.getMessage() for r in caplog.records if "export of case" in r.getMessage()]
    assert len(failures) == 2  # one line per validation, naming the case and the error
    assert all(f"'{VAL_CASE}'" in line and "RuntimeError: the drawing broke" in line for line in failures)
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1
    best = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)
    assert best["global_step"] in (2, 4)  # validation scored the epochs although their overlays failed


def test_strides_that_shrink_a_thin_axis_are_refused_in_one_line(datasets, tmp_path, capsys):
    config = _config(tmp_path, datasets["thin"])
    code = main(["fit", "--config", str(config), "--trainer.default_root_dir", str(tmp_path / "run"),
                 "--model.channels", "[8, 16, 32, 64]", "--model.strides", "[2, 2, 2]"])
    assert code == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("seg fit: error: --model.strides [[2,2,2],[2,2,2],[2,2,2]] shrink axis 2 (S-I)")
    # the plan's rule (seg.models.topology.plan_strides): the 4 mm axis waits for the in-plane axes to catch up
    assert "use --model.strides '[[2,2,1],[2,2,1],[2,2,2]]'" in error
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before any training
