"""bench/ablation.py's summary: intervals over seeds, differences paired by seed, concentrations averaged."""

import math

import pytest


@pytest.fixture(scope="module")
def ablation(bench_script):
    return bench_script("ablation")


def _row(variant, seed, dice, **extra):
    return {"variant": variant, "seed": seed, "steps": 100 + seed, "seconds_per_step": 1.0, "parameters": 10,
            "dice_anterior": dice, "dice_posterior": dice, "dice_mean": dice, **extra}


def test_interval_is_the_t_interval(ablation):
    mean, half = ablation.interval([0.80, 0.82, 0.84])
    assert mean == pytest.approx(0.82)
    assert half == pytest.approx(4.3027 * 0.02 / math.sqrt(3), rel=1e-4)  # t quantile, 2 degrees of freedom
    assert math.isnan(ablation.interval([0.8])[1])


def test_differences_are_paired_by_seed(ablation):
    # seed 1 ran on a slower machine: every variant is 0.05 lower, and the pairing takes that out
    rows = [_row("plain", 0, 0.85), _row("gates", 0, 0.86), _row("plain", 1, 0.80), _row("gates", 1, 0.81),
            _row("plain", 2, 0.83), _row("gates", 2, 0.84),
            _row("cbam", 0, 0.84)]  # one seed only: paired with seed 0's plain
    table = {e["variant"]: e for e in ablation.summarise(rows)}
    assert table["gates"]["dice_mean_minus_plain"] == "+0.0100 ± 0.0000 (3 seeds)"
    assert table["cbam"]["dice_mean_minus_plain"].startswith("-0.0100 ± nan (1 seeds)")
    assert "dice_mean_minus_plain" not in table["plain"]
    assert table["gates"]["dice_mean"].startswith("0.8367 ± ")  # the unpaired interval keeps the machine spread
    assert table["gates"]["seeds"] == 3 and table["gates"]["steps"] == 101


def test_concentrations_and_controls_are_averaged_over_the_seeds_that_have_them(ablation):
    rows = [_row("gates", 0, 0.8, concentration={"gate_0": 1.0, "gate_1": 2.0},
                 concentration_untrained={"gate_0": 1.0, "gate_1": 0.98}),
            _row("gates", 1, 0.8, concentration={"gate_0": 2.0, "gate_1": 4.0},
                 concentration_untrained={"gate_0": 1.02, "gate_1": 1.0}),
            _row("gates", 2, 0.8, concentration={"gate_0": 3.0, "gate_1": 6.0})]
    entry = ablation.summarise(rows)[0]
    assert entry["concentration_gate_1"] == "4.00 (3 seeds)"
    assert entry["concentration_untrained_gate_0"] == "1.01 (2 seeds)"
    assert "concentration_randomised_gate_0" not in entry


def test_acdc_rows_summarise_every_class_and_the_gate_energy_per_class(ablation):
    def acdc_row(variant, seed, lv, myo, rv, **extra):
        return {"variant": variant, "seed": seed, "steps": 300, "seconds_per_step": 3.0, "parameters": 10,
                "dice_LV": lv, "dice_MYO": myo, "dice_RV": rv, "dice_mean": (lv + myo + rv) / 3, **extra}

    rows = [acdc_row("plain", 0, 0.9, 0.8, 0.8), acdc_row("plain", 1, 0.9, 0.8, 0.8),
            acdc_row("both", 0, 0.9, 0.83, 0.8, energy={"gate_0": {"LV": 0.2, "MYO": 0.3}},
                     energy_randomised={"gate_0": {"LV": 0.05, "MYO": 0.05}}),
            acdc_row("both", 1, 0.9, 0.86, 0.8, energy={"gate_0": {"LV": 0.4, "MYO": 0.5}})]
    table = {e["variant"]: e for e in ablation.summarise(rows)}
    assert table["both"]["dice_MYO"].startswith("0.8450 ± ") and table["both"]["dice_RV"].startswith("0.8000 ± ")
    assert table["both"]["dice_mean_minus_plain"].startswith("+0.0150 ± ")
    assert table["both"]["energy_gate_0_LV"] == "0.300 (2 seeds)"
    assert table["both"]["energy_gate_0_MYO"] == "0.400 (2 seeds)"
    assert table["both"]["energy_randomised_gate_0_MYO"] == "0.050 (1 seeds)"
    assert not any(k.startswith("energy") for k in table["plain"])


def test_gate_scores_average_each_level_and_class_leaving_absent_classes_out(ablation, tmp_path):
    csv_path = tmp_path / "concentration.csv"
    csv_path.write_text(
        "case_id,level,concentration,energy_LV,energy_RV,dice_LV,dice_RV,missing\n"
        "a,gate_0,2.0,0.5,0.1,0.9,0.8,\n"
        "b,gate_0,4.0,0.3,nan,0.9,nan,RV: in neither\n"
        "a,gate_1,1.0,0.2,0.2,0.9,0.8,\n"
        "a,cbam_0,9.0,0.9,0.9,0.9,0.8,\n")
    concentration, energy = ablation.read_gate_scores(csv_path)
    assert concentration == {"gate_0": 3.0, "gate_1": 1.0}  # CBAM's maps are not gates
    assert energy == {"gate_0": {"LV": 0.4, "RV": 0.1}, "gate_1": {"LV": 0.2, "RV": 0.2}}
