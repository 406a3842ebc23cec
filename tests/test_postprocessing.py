"""Connected-component postprocessing: chosen on labelled predictions only where it raises Dice, then applied."""

from __future__ import annotations

import json

import numpy as np
import pytest

from seg.errors import DataError
from seg.postprocessing import apply_postprocessing, choose_postprocessing, load_postprocessing, measure

AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])  # 8 mm^3 = 0.008 ml a voxel


def case(speck: bool, seed: int):
    """Label: a liver block (class 1) and a lesion made of two separate blocks (class 2).

    The prediction gets both right, less a few voxels, plus (with `speck`) a stray 2-voxel liver speck.
    """
    label = np.zeros((30, 30, 30), np.uint8)
    label[3:15, 3:15, 3:15] = 1
    label[20:24, 20:24, 20:24] = 2
    label[20:23, 3:6, 20:23] = 2
    prediction = label.copy()
    prediction[3 + seed, 3:15, 3] = 0
    if speck:
        prediction[27:29, 27, 27] = 1
    return prediction, label


def test_a_planted_speck_is_removed_and_a_harmful_step_skipped():
    cases = [case(speck=i < 3, seed=i) for i in range(4)]
    plan = choose_postprocessing([measure(p, l, AFFINE, [1, 2]) for p, l in cases], {1: "liver", 2: "lesion"})
    liver, lesion = plan["classes"]["1"], plan["classes"]["2"]
    assert liver["step"] in ("largest_component", "remove_small") and liver["dice_after"] > liver["dice_before"]
    # the lesion's second block is real: keeping the largest component alone would lower its Dice
    assert lesion["step"] is None and lesion["tried"]["largest_component"] < lesion["dice_before"]
    assert lesion["dice_after"] == lesion["dice_before"] == pytest.approx(1.0)

    prediction, label = case(speck=True, seed=0)
    cleaned = apply_postprocessing(prediction.copy(), AFFINE, plan)
    assert cleaned[27:29, 27, 27].tolist() == [0, 0]  # the speck is background now
    assert np.array_equal(cleaned[:25, :25, :25], prediction[:25, :25, :25])
    assert np.array_equal(cleaned == 2, label == 2)


def test_remove_small_uses_millilitres():
    label = np.zeros((10, 10, 10), np.uint8)
    label[0:2, 0:2, 0:2] = 1  # 8 voxels = 0.064 ml
    label[5, 5, 5] = 1  # 1 voxel = 0.008 ml
    plan = {"format": 1, "classes": {"1": {"step": "remove_small", "min_ml": 0.01}}}
    out = apply_postprocessing(label.copy(), AFFINE, plan)
    assert out.sum() == 8 and out[5, 5, 5] == 0
    # the same threshold on 1 mm voxels (0.001 ml): both components are below it
    assert apply_postprocessing(label.copy(), np.eye(4), plan).sum() == 0


def test_bad_postprocessing_files_are_one_line(tmp_path):
    path = tmp_path / "pp.json"
    for content, expected in (("{", "cannot read"), ('{"format": 1, "classes": {"1": {"step": "erode"}}}', "unknown"),
                              ('{"format": 1, "classes": {"1": {"step": "remove_small"}}}', "min_ml"),
                              ('{"format": 1, "classes": {"7": {"step": null}}}', "does not predict")):
        path.write_text(content)
        with pytest.raises(DataError, match=expected) as err:
            load_postprocessing(path, [1, 2])
        assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)
    path.write_text(json.dumps({"format": 1, "classes": {"1": {"step": "largest_component"}}}))
    assert load_postprocessing(path, [1, 2])["classes"]["1"]["step"] == "largest_component"


@pytest.mark.parametrize("classes, expected", [
    ('{"²": {"step": null}}', "class entry '²'"),
    ('{"1' + "0" * 5000 + '": {"step": null}}', "class entry '10000"),
    ('{"1": {"step": "remove_small", "min_ml": 1e308}}', "from 0 to 1e+06; got 1e+308"),
    ('{"1": {"step": "remove_small", "min_ml": 1' + "0" * 400 + '}}', "from 0 to 1e+06; got 10000"),
    ('{"1": {"step": "remove_small", "min_ml": -1}}', "got -1"),
    ('{"1": {"step": "remove_small", "min_ml": NaN}}', "NaN is not a JSON number"),
    ('{"1": {"step": "remove_small", "min_ml": 1e400}}', "beyond a float"),
    ('{"1": {"step": "remove_small", "min_ml": ' + "[" * 2000 + "]" * 2000 + '}}', "nested deeper than"),
])
def test_hostile_postprocessing_values_are_one_line_naming_the_file(tmp_path, classes, expected):
    path = tmp_path / "pp.json"
    path.write_text('{"format": 1, "classes": ' + classes + "}")
    with pytest.raises(DataError) as err:
        load_postprocessing(path, [1, 2])
    message = str(err.value)
    assert message.startswith(f"{path}: ") and expected in message and "\n" not in message and len(message) < 300


def test_a_fifo_is_refused_without_being_opened(tmp_path):
    import os
    import threading

    fifo = tmp_path / "pp.json"
    os.mkfifo(fifo)  # opening it for reading waits for a writer forever

    def unblock():  # a reader that opened it anyway gets an empty file after 5 s, not a hung suite
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:  # no reader: the FIFO was never opened
            pass

    timer = threading.Timer(5, unblock)
    timer.start()
    try:
        with pytest.raises(DataError, match="not a regular file"):
            load_postprocessing(fifo, [1, 2])
    finally:
        timer.cancel()
