"""`seg.hardware.cpu_bf16_units`: which native bf16 instructions the CPU has, from torch's probes."""

import pytest
import torch

from seg import hardware


def _probes(monkeypatch, **answers):
    for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        answer = answers.get(name, False)
        if answer is None:
            monkeypatch.delattr(torch.cpu, name, raising=False)
        elif isinstance(answer, Exception):
            def fail(error=answer):
                raise error
            monkeypatch.setattr(torch.cpu, name, fail, raising=False)
        else:
            monkeypatch.setattr(torch.cpu, name, lambda value=answer: value, raising=False)


@pytest.mark.parametrize("amx, avx512_bf16, expected", [
    (True, True, "amx"),  # AMX CPUs also have AVX-512 BF16; the tiles are what oneDNN uses
    (False, True, "avx512_bf16"),
    (False, False, None),
    (None, None, None),  # a torch without the probes: assume emulated bf16
    (RuntimeError("cpuinfo"), True, "avx512_bf16"),  # a failing probe counts as absent
])
def test_the_units_come_from_the_probes(monkeypatch, amx, avx512_bf16, expected):
    _probes(monkeypatch, _is_amx_tile_supported=amx, _is_avx512_bf16_supported=avx512_bf16)
    assert hardware.cpu_bf16_units() == expected


def test_every_unit_has_speedups_for_both_dimensionalities():
    assert set(hardware.BF16_STEP_SPEEDUP) == set(hardware.BF16_FORWARD_SPEEDUP) == {"amx", "avx512_bf16"}
    assert all(set(s) == {2, 3} and min(s.values()) > 1 for s in hardware.BF16_STEP_SPEEDUP.values())
