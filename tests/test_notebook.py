"""notebooks/explore_attention.ipynb runs top to bottom on tiny data, draws its figures and passes its own checks."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "explore_attention.ipynb"


def with_parameters(nb, **values):
    """Insert an assignment cell after the cell tagged "parameters", as papermill does."""
    index = next(i for i, cell in enumerate(nb.cells) if "parameters" in cell.get("metadata", {}).get("tags", []))
    source = "\n".join(f"{name} = {value!r}" for name, value in values.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(index + 1, cell)
    return nb


def outputs(nb):
    for cell in nb.cells:
        yield from cell.get("outputs", [])


def text_of(nb) -> str:
    parts = []
    for out in outputs(nb):
        if out.get("output_type") == "stream":
            parts.append(out.get("text", ""))
        elif "data" in out:
            parts.append(out["data"].get("text/plain", ""))
    return "".join(parts)


def test_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)
    assert sum("parameters" in cell.metadata.get("tags", []) for cell in code) == 1


def test_notebook_runs_on_tiny_data(tmp_path):
    nb = with_parameters(nbformat.read(NOTEBOOK, as_version=4), WORKDIR=str(tmp_path / "work"), TINY=True)
    # "python3" is ipykernel's own kernel: jupyter_client finds it in the running interpreter's environment
    # (installed kernelspec or ipykernel's built-in one) and starts it with this interpreter.
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=600,
                                     resources={"metadata": {"path": str(tmp_path)}})
    start = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - start
    if os.environ.get("SEG_NOTEBOOK_OUT"):  # keep the executed notebook for a look at its figures
        nbformat.write(nb, os.environ["SEG_NOTEBOOK_OUT"])

    errors = [out for out in outputs(nb) if out.get("output_type") == "error"]
    assert not errors, errors
    pngs = [out for out in outputs(nb) if "image/png" in out.get("data", {})]
    assert len(pngs) >= 7, f"expected at least 7 figures, got {len(pngs)}"

    text = text_of(nb)
    # Check 1: the gate multiplies the skip, and a shut gate cuts the skip off.
    masking = re.findall(r"max \|gated skip - skip \* alpha\| = (\S+), max \|alpha - returned gate_\d\| = (\S+)",
                         text)
    assert len(masking) == 2 and all(float(v) <= 1e-6 for pair in masking for v in pair)  # both gate levels
    assert float(re.search(r"shut gate .* changes it by (\S+)", text).group(1)) == 0.0
    # Check 2: values in [0, 1], not constant, concentration reported per map.
    assert "[check 2] all maps in [0, 1] on both grids and not constant" in text
    assert re.search(r"strongest gate focus: gate_\d at \d+\.\d\dx", text)
    # Check 3: shapes per level, and the gate maps on the scan's grid and affine.
    assert re.search(r"\[check 3\] gate_0 \(level 1\) \(1, 1, 16, 16, 8\)", text)
    assert "[check 3] logits, gates and CBAM maps on their expected grids" in text
    landed = re.findall(r"shape \(\d+, \d+, \d+\) == scan True, affine == scan True, NIfTI round trip True; "
                        r"same \d+ points in mm: r = (\S+),", text)
    assert len(landed) == 2 and all(float(r) > 0.9 for r in landed)
    # The comparison of the two checkpoints and the training it needed.
    assert re.search(r"gate_1 +\d+\.\d\dx +\d+\.\d\dx +[+-]\d+\.\d\d", text)
    assert "epoch 2: validation Dice" in text
    # Everything it wrote went under WORKDIR.
    assert (tmp_path / "work" / "run" / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "work" / "after_epoch_1.ckpt").is_file()
    print(f"notebook executed in {seconds:.0f} s")
