"""DICOM SEG codes per class: from dataset.json (or a codes file) through the checkpoint's preprocessing into the
SEG's SegmentSequence; defaults that never call a lesion an anatomical structure; dciodvfy finds no error."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from seg.data.codes import default_codes, default_keywords, read_codes_file
from seg.data.layout import load_dataset
from seg.data.synthetic import write_dataset
from seg.errors import CheckpointError, DataError
from seg.inference import dicom_seg
from seg.inference.checkpoint import check_preprocessing
from test_dicom import write_series
from test_predict import centred_affine

CODES = {"1": {"category": ["91723000", "SCT", "Anatomical Structure"], "type": ["10200004", "SCT", "Liver"]},
         "2": {"category": ["49755003", "SCT", "Morphologically Abnormal Structure"],
               "type": ["4147007", "SCT", "Mass"]}}


@pytest.mark.parametrize("name, expected", [
    ("liver", ("AnatomicalStructure", "Liver")), ("Left_Kidney", ("AnatomicalStructure", "Kidney")),
    ("lesion", ("MorphologicallyAbnormalStructure", "Lesion")),
    ("liver tumour", ("MorphologicallyAbnormalStructure", "Neoplasm")),
    ("tumor", ("MorphologicallyAbnormalStructure", "Neoplasm")), ("cyst", ("MorphologicallyAbnormalStructure", "Cyst")),
    ("lung nodule", ("MorphologicallyAbnormalStructure", "Nodule")), ("MYO", ("AnatomicalStructure",
                                                                               "LeftVentricleMyocardium")),
    ("RV", ("AnatomicalStructure", "RightVentricle")), ("hippocampus", ("AnatomicalStructure", "Hippocampus")),
    ("anterior", ("Tissue", "Tissue")), ("class_3", ("Tissue", "Tissue")), ("deliverable", ("Tissue", "Tissue")),
])
def test_default_codes_by_class_name(name, expected):
    assert default_keywords(name) == expected
    assert default_codes("lesion")["category"] == ["49755003", "SCT", "Morphologically Abnormal Structure"]


def _dataset(tmp_path: Path, codes) -> Path:
    root = write_dataset(tmp_path / "data", cases=2, size=(16, 16, 8))
    meta = json.loads((root / "dataset.json").read_text())
    meta["codes"] = codes
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_dataset_json_codes_are_read_and_checked(tmp_path):
    assert load_dataset(_dataset(tmp_path / "a", CODES)).codes == CODES
    for bad, message in (({"3": CODES["1"]}, "codes key '3' is not a foreground label value (1, 2)"),
                         ({"1": {"type": CODES["1"]["type"]}}, "needs \"category\" and \"type\""),
                         ({"1": {**CODES["1"], "type": ["1", "SCT"]}}, "three strings")):
        root = _dataset(tmp_path / str(len(message)), bad)
        with pytest.raises(DataError, match="dataset.json: codes") as err:
            load_dataset(root)
        assert message in str(err.value)


def test_codes_file_and_checkpoint_preprocessing(tmp_path):
    labels = {0: "background", 1: "liver", 2: "lesion"}
    (tmp_path / "codes.json").write_text(json.dumps(CODES))
    assert read_codes_file(tmp_path / "codes.json", labels) == CODES
    from seg.data.datamodule import NiftiDataModule

    root = _dataset(tmp_path, {"1": CODES["1"]})
    assert NiftiDataModule(root).preprocessing["codes"] == {"1": CODES["1"]}  # dataset.json's, into the checkpoint
    module = NiftiDataModule(root, codes=str(tmp_path / "codes.json"))  # seg fit --data.codes FILE
    pre = module.preprocessing
    assert pre["codes"] == CODES
    check_preprocessing(pre, {}, tmp_path / "x.ckpt")
    pre["codes"] = {"1": {"category": "Tissue"}}
    with pytest.raises(CheckpointError, match="x.ckpt: checkpoint's preprocessing: codes '1' needs"):
        check_preprocessing(pre, {}, tmp_path / "x.ckpt")


def test_seg_codes_come_from_dataset_json_and_dciodvfy_finds_no_error(tmp_path):
    shape = (24, 20, 6)
    affine = centred_affine(np.diag([-2.0, -2.0, 3.0]), shape)
    image = np.full(shape, 100.0, np.float32)
    files = write_series(tmp_path / "scans", image, affine, modality="CT")
    label = np.zeros(shape, np.uint8)
    label[4:12, 4:12, 1:4], label[14:18, 10:16, 2:5], label[2:4, 14:18, 3] = 1, 2, 3
    codes = load_dataset(_dataset(tmp_path, {"1": CODES["1"], "2": CODES["2"]})).codes
    out = tmp_path / "seg.dcm"
    dicom_seg.write_segmentation(label, affine, files, ["liver", "lesion", "tumour"], out,
                             {"name": "seg", "version": "1", "checkpoint": "best.ckpt"}, codes=codes)
    segments = pydicom.dcmread(out).SegmentSequence
    coded = [[(c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning)
              for c in (s.SegmentedPropertyCategoryCodeSequence[0], s.SegmentedPropertyTypeCodeSequence[0])]
             for s in segments]
    assert coded[0] == [tuple(CODES["1"]["category"]), tuple(CODES["1"]["type"])]  # from dataset.json
    assert coded[1] == [tuple(CODES["2"]["category"]), tuple(CODES["2"]["type"])]
    assert coded[2] == [("49755003", "SCT", "Morphologically Abnormal Structure"), ("108369006", "SCT", "Neoplasm")]
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (Debian's dicom3tools) is not installed")
    done = subprocess.run(["dciodvfy", str(out)], capture_output=True, text=True, timeout=120)
    errors = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error")]
    assert errors == [], "\n".join(errors)
