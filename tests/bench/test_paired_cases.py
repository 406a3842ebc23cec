"""bench/paired_cases.py: two seg evaluate per_case.csv files compared case by case."""

import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
HEADER = "case,status,dice_A,hd95_A,nsd_A,missing_A,dice_B,hd95_B,nsd_B,missing_B,prediction,label,message\n"


@pytest.fixture(scope="module")
def paired(bench_script):
    return bench_script("paired_cases")


def _write(path: Path, rows: list[str]) -> Path:
    path.write_text(HEADER + "".join(r + "\n" for r in rows))
    return path


@pytest.fixture
def files(tmp_path):
    base = _write(tmp_path / "base.csv", [
        "c1,ok,0.80,1,0.9,,0.70,1,0.9,,c1.nii.gz,c1.nii.gz,",
        "c2,ok,0.90,1,0.9,,0.60,1,0.9,,c2.nii.gz,c2.nii.gz,",
        "c3,ok,0.85,1,0.9,,,,,both,c3.nii.gz,c3.nii.gz,",  # B absent from label and prediction: no Dice
        "c4,ok,0.50,1,0.9,,0.50,1,0.9,,c4.nii.gz,c4.nii.gz,",
    ])
    new = _write(tmp_path / "new.csv", [
        "c1,ok,0.82,1,0.9,,0.72,1,0.9,,c1.nii.gz,c1.nii.gz,",
        "c2,ok,0.90,1,0.9,,0.00,,,prediction,c2.nii.gz,c2.nii.gz,",  # B missing from the prediction: Dice 0
        "c3,ok,0.87,1,0.9,,,,,both,c3.nii.gz,c3.nii.gz,",
        "c4,failed,,,,,,,,,,c4.nii.gz,unreadable",  # not scored in the new run: left out of every row
    ])
    return base, new


def test_differences_are_per_case_and_a_missing_class_counts_as_zero(paired, files):
    rows = {r["class"]: r for r in paired.compare(*map(paired.read_per_case, files))}
    assert rows["A"]["cases"] == 3 and rows["A"]["difference"] == pytest.approx((0.02 + 0.0 + 0.02) / 3)
    assert (rows["A"]["better"], rows["A"]["worse"]) == (2, 0)
    assert rows["B"]["cases"] == 2  # c3 has no B Dice in either run, c4 failed
    assert rows["B"]["new"] == pytest.approx(0.36) and rows["B"]["difference"] == pytest.approx((0.02 - 0.60) / 2)
    assert (rows["B"]["better"], rows["B"]["worse"]) == (1, 1)
    # the mean per case over the classes both runs scored: c1 +0.02, c2 -0.30, c3 (A only) +0.02
    diffs = [0.02, -0.30, 0.02]
    assert rows["mean"]["cases"] == 3 and rows["mean"]["difference"] == pytest.approx(sum(diffs) / 3)
    sd = math.sqrt(sum((d - sum(diffs) / 3) ** 2 for d in diffs) / 2)
    assert rows["mean"]["half_width"] == pytest.approx(4.3027 * sd / math.sqrt(3), rel=1e-4)  # t, 2 df


def test_the_command_prints_a_markdown_table(files):
    out = subprocess.run([sys.executable, str(BENCH / "paired_cases.py"), *map(str, files), "--names", "2x2", "4x1"],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0] == "| class | cases | 2x2 | 4x1 | 4x1 - 2x2 (95% interval) | better / worse |"
    assert out[2].startswith("| A | 3 | 0.8500 | 0.8633 | +0.0133 ± ")
    assert out[-1].startswith("| mean | 3 |")


def test_files_of_other_classes_are_refused(paired, tmp_path, files):
    other = tmp_path / "other.csv"
    other.write_text("case,status,dice_X,prediction,label,message\nc1,ok,0.5,c1.nii.gz,c1.nii.gz,\n")
    with pytest.raises(SystemExit, match="other classes"):
        paired.compare(paired.read_per_case(files[0]), paired.read_per_case(other))
