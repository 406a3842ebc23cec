"""check-data: every check triggered by a crafted bad case, through the API and the real command line."""

import gzip
import json
import re
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from seg.cli import main
from seg.data.checks import Problem, check_dataset, check_or_raise
from seg.data.synthetic import write_dataset
from seg.errors import DataError

SIZE = (16, 16, 12)

# case -> (file it is reported on, words the message must contain); every other case is clean.
BROKEN = {
    "synth_001": ("imagesTr", "truncated or corrupt gzip stream"),
    "synth_002": ("labelsTr", "file is empty (0 bytes)"),
    "synth_003": ("imagesTr", "file not found"),
    "synth_004": ("labelsTr",
                  "label shape (16, 16, 10) differs from the image's (16, 16, 12) (imagesTr/synth_004.nii.gz)"),
    "synth_005": ("labelsTr", "label affine differs from the image's (imagesTr/synth_005.nii.gz) by up to 2 mm"),
    "synth_006": ("labelsTr", "label values [7] are not declared"),
    "synth_007": ("imagesTr", "image has 1 NaN voxel"),
    "synth_008": ("imagesTr", "image has 2 infinite voxels"),
    "synth_009": ("imagesTr", "image has 2 channels (shape (16, 16, 12, 2)) but dataset.json declares 1 modality"),
    "synth_010": ("imagesTr", "image is 2D (16, 16); expected a 3D volume"),
    "synth_011": ("imagesTr", "voxel spacing 1.5 x 0 x 2 mm is not positive"),
    "synth_012": ("labelsTr", "label has 3 voxels with non-integer values (e.g. 0.5)"),
    "synth_013": ("labelsTr", "label is 4D (16, 16, 12, 1); expected a 3D map"),
    "synth_014": ("imagesTr", "cannot read the NIfTI header"),  # gzip of something else
    "synth_015": ("labelsTr", "label has 1 NaN voxel"),
    "synth_016": ("imagesTr", "voxel spacing 1.5 x 1.5 x 80 mm is implausible"),
    "synth_017": ("labelsTr", "truncated or corrupt gzip stream: BadGzipFile: Not a gzipped file"),
}


def _load(path):
    image = nib.load(path)
    return np.asanyarray(image.dataobj), image.affine


def _save(path, data, affine):
    nib.save(nib.Nifti1Image(data, affine), path)


def _save_sform_only(path, data, affine):
    """For affines a qform cannot hold (a zero column): nibabel then reads the sform back."""
    image = nib.Nifti1Image(data, None)
    image.set_sform(affine, code=1)
    nib.save(image, path)


@pytest.fixture(scope="module")
def broken_root(tmp_path_factory):
    """A synthetic dataset of 18 cases, all but the first broken in one way each."""
    root = write_dataset(tmp_path_factory.mktemp("broken") / "ds", cases=18, size=SIZE)
    image = lambda case: root / "imagesTr" / f"{case}.nii.gz"  # noqa: E731
    label = lambda case: root / "labelsTr" / f"{case}.nii.gz"  # noqa: E731

    raw = image("synth_001").read_bytes()
    image("synth_001").write_bytes(raw[: len(raw) // 2])
    label("synth_002").write_bytes(b"")
    image("synth_003").unlink()
    data, affine = _load(label("synth_004"))
    _save(label("synth_004"), data[:, :, :10], affine)
    data, affine = _load(label("synth_005"))
    shifted = affine.copy()
    shifted[0, 3] += 2.0
    _save(label("synth_005"), data, shifted)
    data, affine = _load(label("synth_006"))
    data[0, 0, 0] = 7
    _save(label("synth_006"), data, affine)
    data, affine = _load(image("synth_007"))
    data[1, 2, 3] = np.nan
    _save(image("synth_007"), data, affine)
    data, affine = _load(image("synth_008"))
    data[1, 2, 3], data[4, 5, 6] = np.inf, -np.inf
    _save(image("synth_008"), data, affine)
    data, affine = _load(image("synth_009"))
    _save(image("synth_009"), np.stack([data, data], axis=-1), affine)
    data, affine = _load(image("synth_010"))
    _save(image("synth_010"), data[:, :, 5], affine)
    for path in (image("synth_011"), label("synth_011")):
        data, affine = _load(path)
        flat = affine.copy()
        flat[:3, 1] = 0.0
        _save_sform_only(path, data, flat)
    data, affine = _load(label("synth_012"))
    data = data.astype(np.float32)
    data[:3, 0, 0] = 0.5
    _save(label("synth_012"), data, affine)
    data, affine = _load(label("synth_013"))
    _save(label("synth_013"), data[..., None], affine)
    image("synth_014").write_bytes(gzip.compress(b"this is not a NIfTI file" * 20))
    label("synth_017").write_bytes(b"plain bytes, no gzip header" * 20)
    data, affine = _load(label("synth_015"))
    data = data.astype(np.float32)
    data[0, 0, 0] = np.nan
    _save(label("synth_015"), data, affine)
    for path in (image("synth_016"), label("synth_016")):
        data, affine = _load(path)
        tall = affine.copy()
        tall[:3, 2] *= 40.0
        _save(path, data, tall)
    return root


def _dataset_with_json(root, text):
    root = write_dataset(root, cases=1, size=SIZE)
    (root / "dataset.json").write_text(text)
    return root


@pytest.fixture(scope="module")
def roots(broken_root, tmp_path_factory):
    """The datasets the real command runs on: broken cases, clean, unparseable json, a path out of the root."""
    base = tmp_path_factory.mktemp("roots")
    escaping = {"labels": {"0": "background", "1": "liver"}, "modality": {"0": "MRI"},
                "training": [{"image": "./imagesTr/synth_000.nii.gz", "label": "../../etc/passwd.nii.gz"}]}
    return {
        "broken": broken_root,
        "clean": write_dataset(base / "clean", cases=2, test_cases=1, size=SIZE, oblique=True),
        "malformed": _dataset_with_json(base / "malformed", '{"labels": {"0": "background"}, "training": ['),
        "escaping": _dataset_with_json(base / "escaping", json.dumps(escaping)),
    }


@pytest.fixture(scope="module")
def command(roots):
    """`python -m seg check-data ROOT` on each dataset, run side by side (each start imports the package)."""
    running = {name: subprocess.Popen([sys.executable, "-m", "seg", "check-data", str(root)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for name, root in roots.items()}
    results = {}
    for name, process in running.items():
        stdout, stderr = process.communicate(timeout=300)
        results[name] = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    return results


def test_each_broken_case_gives_exactly_its_problem(broken_root):
    problems = check_dataset(broken_root)
    by_case = {}
    for problem in problems:
        by_case.setdefault(problem.case_id, []).append(problem)
    assert sorted(by_case) == sorted(BROKEN)  # synth_000 is clean, and nothing is reported twice
    for case, (folder, words) in BROKEN.items():
        [problem] = by_case[case]
        assert problem.path == str(broken_root / folder / f"{case}.nii.gz")
        assert words in problem.message, (case, problem.message)
        assert str(problem) == f"{case}: {problem.path}: {problem.message}"


def test_threads_give_the_same_report(broken_root):
    assert check_dataset(broken_root, workers=3) == check_dataset(broken_root)


def test_command_names_every_problem_and_exits_1(broken_root, command):
    result = command["broken"]
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stdout.splitlines()
    for case, (folder, words) in BROKEN.items():
        path = broken_root / folder / f"{case}.nii.gz"
        matching = [line for line in lines if line.startswith(f"{case}: {path}: ")]
        assert len(matching) == 1 and words in matching[0], (case, matching)
    assert lines[-1] == f"checked 18 cases: {len(BROKEN)} problems in {len(BROKEN)} cases"
    assert not any(line.startswith("synth_000") for line in lines)


def test_clean_dataset_passes(roots, command):
    root = roots["clean"]
    assert check_dataset(root) == []
    info = check_or_raise(root)
    assert [c.case_id for c in info.cases] == ["synth_000", "synth_001"]
    result = command["clean"]
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "checked 3 cases: all good"
    assert result.stderr == ""  # no progress bar when stderr is not a terminal


def test_test_images_are_checked_too(tmp_path):
    root = write_dataset(tmp_path / "ds", cases=1, test_cases=1, size=SIZE)
    test_image = root / "imagesTs" / "synth_001.nii.gz"
    data, affine = _load(test_image)
    data[0, 0, 0] = np.nan
    _save(test_image, data, affine)
    assert [str(p) for p in check_dataset(root)] == [f"synth_001: {test_image}: image has 1 NaN voxel"]


def test_check_or_raise_quotes_the_first_problems(broken_root):
    with pytest.raises(DataError) as caught:
        check_or_raise(broken_root)
    message = str(caught.value)
    assert message.startswith(f"{broken_root}: checked 18 cases: {len(BROKEN)} problems in {len(BROKEN)} cases: ")
    assert "synth_001: " in message and "synth_003: " in message and "synth_005" not in message
    assert f"and {len(BROKEN) - 3} more" in message and "seg check-data" in message
    assert "\n" not in message


def test_malformed_dataset_json_is_a_problem_not_a_traceback(roots, command):
    root = roots["malformed"]
    [problem] = check_dataset(root)
    assert problem.case_id == "dataset" and problem.path == str(root / "dataset.json")
    assert problem.message.startswith("cannot read dataset.json")
    result = command["malformed"]
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stdout.splitlines()[0].startswith(f"dataset: {root / 'dataset.json'}: cannot read dataset.json")
    assert result.stdout.splitlines()[-1] == "checked 0 cases: 1 problem in the dataset as a whole"


def test_path_escaping_the_root_is_refused(roots, command):
    root = roots["escaping"]
    [problem] = check_dataset(root)
    assert problem.case_id == "dataset" and problem.path == str(root / "dataset.json")
    assert "'../../etc/passwd.nii.gz' escapes the dataset folder" in problem.message
    result = command["escaping"]
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stdout.splitlines()[0] == f"dataset: {root / 'dataset.json'}: {problem.message}"


def test_anisotropy_and_unused_label_are_notes_not_problems(tmp_path, capsys):
    root = write_dataset(tmp_path / "ds", cases=2, size=SIZE, spacing=(0.5, 0.5, 8.0))
    meta = json.loads((root / "dataset.json").read_text())
    meta["labels"]["3"] = "metastasis"
    (root / "dataset.json").write_text(json.dumps(meta))
    notes: list[Problem] = []
    assert check_dataset(root, notes=notes) == []
    assert [n.message for n in notes] == ["strongly anisotropic voxels 0.5 x 0.5 x 8 mm"] * 2 + [
        "label 3 (metastasis) appears in no case"]
    assert main(["check-data", str(root)]) == 0  # the command in-process: notes are printed, not failures
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "checked 2 cases: all good"
    assert out[0].startswith("note: synth_000: ") and out[2].startswith("note: dataset: ")


def test_multichannel_files_must_agree_and_match_modalities(tmp_path):
    """nnU-Net layout: one file per channel; their count and grids are checked."""
    root = tmp_path / "nnunet"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    rng = np.random.default_rng(0)
    for case in ("a", "b"):
        for channel in range(2):
            _save(root / "imagesTr" / f"{case}_{channel:04d}.nii.gz", rng.random(SIZE).astype(np.float32), affine)
        _save(root / "labelsTr" / f"{case}.nii.gz", np.zeros(SIZE, np.uint8) + 1, affine)
    moved = affine.copy()
    moved[2, 3] = 0.5
    _save(root / "imagesTr" / "b_0001.nii.gz", rng.random(SIZE).astype(np.float32), moved)
    meta = {"channel_names": {"0": "T1", "1": "T2", "2": "FLAIR"}, "labels": {"background": 0, "tumour": 1},
            "numTraining": 2, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta))
    messages = [str(p) for p in check_dataset(root)]
    assert messages[0] == (f"a: {root / 'imagesTr' / 'a_0000.nii.gz'}: 2 channel files but dataset.json "
                           "declares 3 modalities ['T1', 'T2', 'FLAIR']")
    assert messages[1].startswith("b: ") and "b_0000.nii.gz: 2 channel files" in messages[1]
    assert re.fullmatch(r"b: .*b_0001\.nii\.gz: channel file affine differs from the image's "
                        r"\(imagesTr/b_0000\.nii\.gz\) "
                        r"by up to 0\.5 mm.*", messages[2])
    assert len(messages) == 3


def test_gzip_with_bad_crc_is_caught(tmp_path):
    """Damage in the middle of the stream (not just a cut) must also be reported, not raised."""
    root = write_dataset(tmp_path / "ds", cases=1, size=SIZE)
    path = root / "imagesTr" / "synth_000.nii.gz"
    raw = bytearray(gzip.decompress(path.read_bytes()))
    good = gzip.compress(bytes(raw))
    damaged = bytearray(good)
    damaged[-6] ^= 0xFF  # inside the CRC32 trailer: nibabel alone reads the voxels without complaint
    path.write_bytes(bytes(damaged))
    assert nib.load(path).get_fdata().shape == SIZE
    [problem] = check_dataset(root)
    assert problem.case_id == "synth_000" and "truncated or corrupt gzip stream" in problem.message
    assert "CRC" in problem.message


def test_truncated_uncompressed_nifti(tmp_path):
    root = write_dataset(tmp_path / "ds", cases=1, size=SIZE)
    data, affine = _load(root / "labelsTr" / "synth_000.nii.gz")
    (root / "labelsTr" / "synth_000.nii.gz").unlink()
    plain = root / "labelsTr" / "synth_000.nii"
    _save(plain, data, affine)
    plain.write_bytes(plain.read_bytes()[:-100])
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"][0]["label"] = "./labelsTr/synth_000.nii"
    (root / "dataset.json").write_text(json.dumps(meta))
    [problem] = check_dataset(root)
    # the size guard sees it from the header and the file size, before reading
    assert problem.path == str(plain) and "the file holds 2.9 KiB of voxel data" in problem.message
    assert "truncated" in problem.message
