"""DICOM SEG codes of each class: what a segment is (its category and type), as coded concepts.

A class's codes come from dataset.json's optional `"codes"` (or a codes file given to `seg fit --data.codes` or
`seg predict --dicom-codes`), keyed by label value:

    "codes": {"1": {"category": ["91723000", "SCT", "Anatomical Structure"], "type": ["10200004", "SCT", "Liver"]},
              "2": {"category": ["49755003", "SCT", "Morphologically Abnormal Structure"],
                    "type": ["108369006", "SCT", "Neoplasm"]}}

(a codes file holds that object alone, or a whole dataset.json). They travel in the checkpoint's preprocessing.
A class without codes gets `default_codes(name)`: SNOMED CT's code for a common organ or abnormality named in its
class name (pydicom's `codes.SCT` keywords), a lesion never coded as an anatomical structure; an unknown name is
Tissue / Tissue. Triples are `[code value, coding scheme designator, code meaning]`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

from seg.errors import DataError

# pydicom `codes.SCT` keywords: (category, type). Abnormal findings first: "liver tumour" is a neoplasm.
ABNORMAL = "MorphologicallyAbnormalStructure"
ANATOMY = "AnatomicalStructure"
_DEFAULTS = [
    (r"tumou?rs?|neoplasms?|cancers?|carcinomas?", (ABNORMAL, "Neoplasm")),
    (r"metastas[ie]s|mets?", (ABNORMAL, "Metastasis")),
    (r"lesions?", (ABNORMAL, "Lesion")),
    (r"cysts?", (ABNORMAL, "Cyst")),
    (r"nodules?", (ABNORMAL, "Nodule")),
    (r"mass(es)?", (ABNORMAL, "Mass")),
    (r"o?edema", (ABNORMAL, "Edema")),
    (r"necrosis|necrotic", (ABNORMAL, "Necrosis")),
    (r"ha?emorrhages?|bleeds?", (ABNORMAL, "Hemorrhage")),
    (r"myocardium|myo|mlv", (ANATOMY, "LeftVentricleMyocardium")),
    (r"left ventricle|lv|lvc", (ANATOMY, "LeftVentricle")),
    (r"right ventricle|rv", (ANATOMY, "RightVentricle")),
    (r"lateral ventricles?", (ANATOMY, "LateralVentricle")),
    (r"ventricles?", (ANATOMY, "Ventricle")),
    (r"hippocampus|hippocampi", (ANATOMY, "Hippocampus")),
    (r"livers?", (ANATOMY, "Liver")),
    (r"kidneys?", (ANATOMY, "Kidney")),
    (r"spleens?", (ANATOMY, "Spleen")),
    (r"lungs?", (ANATOMY, "Lung")),
    (r"heart", (ANATOMY, "Heart")),
    (r"pancreas", (ANATOMY, "Pancreas")),
    (r"prostate", (ANATOMY, "Prostate")),
    (r"brain", (ANATOMY, "Brain")),
    (r"stomach", (ANATOMY, "Stomach")),
    (r"gall ?bladder", (ANATOMY, "Gallbladder")),
    (r"(urinary )?bladder", (ANATOMY, "Bladder")),
    (r"colon", (ANATOMY, "Colon")),
    (r"o?esophagus", (ANATOMY, "Esophagus")),
    (r"aorta", (ANATOMY, "Aorta")),
    (r"vertebrae?", (ANATOMY, "Vertebra")),
    (r"bones?", (ANATOMY, "Bone")),
    (r"muscles?", ("Tissue", "Muscle")),
    (r"fat", ("Tissue", "AdiposeTissue")),
]
UNKNOWN = ("Tissue", "Tissue")


def default_keywords(name: str) -> tuple[str, str]:
    """(category, type) `codes.SCT` keywords for a class name: the first entry of `_DEFAULTS` whose words it holds."""
    words = " " + re.sub(r"[^a-z0-9]+", " ", name.lower()).strip() + " "
    for pattern, keywords in _DEFAULTS:
        if re.search(rf" ({pattern}) ", words):
            return keywords
    return UNKNOWN


def default_codes(name: str) -> dict[str, list[str]]:
    """`{"category": triple, "type": triple}` for a class name (pydicom's SNOMED CT codes)."""
    from pydicom.sr.codedict import codes

    return {key: [str(c.value), str(c.scheme_designator), str(c.meaning)]
            for key, c in zip(("category", "type"), (getattr(codes.SCT, k) for k in default_keywords(name)))}


def _triple(value, where: str, path: Path | None) -> list[str]:
    ok = (isinstance(value, (list, tuple)) and len(value) == 3 and all(isinstance(v, str) and v.strip() for v in value))
    if not ok:
        raise DataError(f"codes {where} must be [code value, coding scheme, code meaning] (three strings), got "
                        f"{json.dumps(value)[:80]}", path)
    if len(value[1]) > 16 or len(value[2]) > 64:
        raise DataError(f"codes {where}: the coding scheme is at most 16 characters and the meaning at most 64 "
                        "(DICOM SH and LO)", path)
    return [v.strip() for v in value]


def parse_codes(raw, labels: Mapping[int, str], path: Path | None) -> dict[str, dict[str, list[str]]]:
    """Check a `"codes"` object against the dataset's labels; returns it with string keys, or a `DataError`.

    Keys are foreground label values ("1", "2", ...); each value holds "category" and "type" triples.
    """
    if not isinstance(raw, dict):
        raise DataError(f"'codes' must map label values to {{\"category\": [...], \"type\": [...]}}, got "
                        f"{json.dumps(raw)[:80]}", path)
    out = {}
    for key, entry in raw.items():
        value = int(key) if str(key).strip().isdigit() else None
        if value is None or value == 0 or value not in labels:
            foreground = ", ".join(str(v) for v in sorted(labels) if v)
            raise DataError(f"codes key {key!r} is not a foreground label value ({foreground})", path)
        if not isinstance(entry, dict) or not {"category", "type"} <= set(entry):
            raise DataError(f"codes {key!r} needs \"category\" and \"type\" triples", path)
        out[str(value)] = {k: _triple(entry[k], f"{key!r} {k}", path) for k in ("category", "type")}
    return out


def read_codes_file(path: str | Path, labels: Mapping[int, str]) -> dict[str, dict[str, list[str]]]:
    """A codes file: the `"codes"` object alone, or a dataset.json holding one."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"cannot read the codes file: {err}", path) from None
    if isinstance(raw, dict) and "codes" in raw:
        raw = raw["codes"]
    return parse_codes(raw, labels, path)


def segment_codes(class_names: list[str], given: Mapping[str, Mapping] | None = None) -> list[dict[str, list[str]]]:
    """The codes of every foreground class (class c at index c - 1): the given ones, else the defaults."""
    given = given or {}
    return [dict(given[str(c)]) if str(c) in given else default_codes(name)
            for c, name in enumerate(class_names, start=1)]
