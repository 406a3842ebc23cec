"""`seg review`: the page of a run folder and of a `seg predict` folder, its bad inputs, and the page in Chromium."""

from __future__ import annotations

import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import yaml

from seg.cli import main
from seg.explain.export import TABLE, CaseOverlay, overlay_table
from seg.explain.review import read_folder, write_review

EVIL_CASE = '<script>alert("case")</script>'
EVIL_CLASS = '"><img src=x onerror=alert(1)>'
CLASSES = ["liver", EVIL_CLASS]
# case -> (Dice of the two classes at epoch 0, at epoch 1): worst mean Dice last epoch first = c, evil, a, b
DICE = {"a": ((0.1, 0.2), (0.5, 0.6)), "b": ((0.9, 0.8), (0.9, 1.0)), "c": ((0.3, 0.3), (0.1, None)),
        EVIL_CASE: ((0.2, 0.2), (0.4, 0.3))}


def png(path: Path, seed: int, shape=(30, 40)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    matplotlib.image.imsave(path, np.random.default_rng(seed).random(shape), cmap="gray")


def make_run(root: Path) -> Path:
    """A run folder as `seg fit` leaves it, without training: two exported epochs, metrics, config with a plan."""
    root.mkdir(parents=True)
    (root / "checkpoints").mkdir()
    for epoch in (0, 1):
        folder = root / "overlays" / f"epoch={epoch}"
        results = []
        for i, (case, scores) in enumerate(sorted(DICE.items())):
            case_folder = folder / f"case{i}"  # `seg fit` names it by the case id; any name in the folder works
            png(case_folder / "overlay.png", 10 * epoch + i)
            dice = {c: (float("nan") if v is None else v) for c, v in zip(CLASSES, scores[epoch])}
            results.append(CaseOverlay(case, case_folder, dice=dice, missing={EVIL_CLASS: "not predicted"}
                                       if scores[epoch][1] is None else {},
                                       concentration={"gate_0": 2.0 + i, "gate_1": 1.5}))
        (folder / TABLE).write_text(json.dumps(overlay_table(epoch, CLASSES, results, failed=["broken"])))
    version = root / "csv" / "version_0"
    version.mkdir(parents=True)
    (version / "metrics.csv").write_text(
        "epoch,step,train/loss_step,train/loss_epoch,val/dice_mean,val/dice_liver,overlays/concentration_gate_0\n"
        "0,9,0.9,,,,\n0,10,,0.85,0.4,0.5,2.5\n1,19,0.7,,,,\n1,20,,0.65,0.6,0.7,3.0\n")
    config = {"trainer": {"max_epochs": 2}, "model": {"lr": 0.001},
              "data": {"patch_size": [32, 32, 16], "plan": {"data.patch_size": "the median scan <fits> the budget"}}}
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    return root


def make_predictions(root: Path) -> Path:
    """A `seg predict --preview` folder: report.json, summary.csv and previews."""
    root.mkdir(parents=True)
    cases = {
        "ok_case": {"classes": {"liver": {"voxels": 10, "components": 1}}, "flags": []},
        "far": {"classes": {"liver": {"voxels": 10, "components": 1}},
                "flags": ["spacing: S spacing 6 mm is 3x the training spacing 2 mm"]},
        "gone": {"classes": {"liver": {"voxels": 0, "components": 0}}, "flags": ["empty: no voxel predicted as 'liver'"]},
        "bits": {"classes": {"liver": {"voxels": 10, "components": 3}}, "flags": []},
    }
    (root / "report.json").write_text(json.dumps({"seg": {}, "cases": cases}))
    (root / "summary.csv").write_text("case,status,seconds,message\nok_case,ok,1,\nbroken,failed,0,cannot read it\n")
    for i, case in enumerate(cases):
        png(root / f"{case}_preview.png", i)
    return root


class Page(HTMLParser):
    """The cases of a page in document order (their data attributes) and every `<img>`'s src."""

    def __init__(self, text: str):
        super().__init__()
        self.cases: list[dict] = []
        self.images: list[str] = []
        self.body: dict = {}
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "li" and "case" in (attrs.get("class") or "").split():
            self.cases.append(attrs)
        elif tag == "img":
            self.images.append(attrs["src"])
        elif tag == "body":
            self.body = attrs


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ---- the run's page ------------------------------------------------------------------------------------------------
def test_run_page_lists_every_case_with_its_figures_scores_and_settings(tmp_path):
    run = make_run(tmp_path / "run")
    page = write_review(run)
    assert page.html == run / "review.html" and page.images == run / "review_files" and page.cases == 4
    text = page.html.read_text()
    parsed = Page(text)
    # every case, each figure of every epoch (the last one shown, the others a button away), the curves
    assert sorted(c["data-case"] for c in parsed.cases) == sorted(DICE)
    assert sorted(p.name for p in page.images.iterdir()) == sorted(
        [f"{i:04d}-{j:03d}.png" for i in range(4) for j in range(2)] + ["curves.png"])
    assert len(parsed.images) == 1 + 4 and parsed.images[0] == "review_files/curves.png"
    for i, case in enumerate(sorted(DICE)):
        # the page's copy is the run's own figure (a hard link or a copy)
        assert (page.images / f"{i:04d}-001.png").read_bytes() == \
            (run / "overlays" / "epoch=1" / f"case{i}" / "overlay.png").read_bytes()
        assert f'data-src="review_files/{i:04d}-000.png"' in text
    # the sort key is the last epoch's mean Dice over the classes that have one
    dice = {c["data-case"]: c["data-dice"] for c in parsed.cases}
    assert dice == {"a": "0.55", "b": "0.95", "c": "0.1", EVIL_CASE: "0.35"}
    assert parsed.cases[0]["data-dice"] and "data-default-sort=\"dice\"" in text
    # scores of both epochs, missing classes, the failed export, the plan's reason, the best epoch
    assert text.count("<table class=scores>") == 4 and "0.500" in text and "0.100" in text and "3.00" in text
    assert "not predicted" in text and "the overlay export of case broken failed" in text
    assert "the median scan &lt;fits&gt; the budget" in text and "[32, 32, 16]" in text
    assert "best validation mean Dice 0.600 at epoch 1" in text
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # no temporary name left


def test_case_ids_and_class_names_with_html_are_escaped(tmp_path):
    text = write_review(make_run(tmp_path / "run")).html.read_text()
    assert EVIL_CASE not in text and EVIL_CLASS not in text
    assert "&lt;script&gt;alert(&quot;case&quot;)&lt;/script&gt;" in text
    assert "&quot;&gt;&lt;img src=x onerror=alert(1)&gt;" in text
    # the only script element is the page's own; no tag was injected
    assert text.count("<script") == 1 and "<img src=x" not in text


def test_embedded_page_is_one_file_and_a_second_write_replaces_the_first(tmp_path):
    run = make_run(tmp_path / "run")
    write_review(run)
    before = listing(run)
    page = write_review(run, tmp_path / "out" / "one.html", embed=True)
    assert page.images is None and not (tmp_path / "out" / "one_files").exists()
    images = Page(page.html.read_text()).images
    assert len(images) == 5 and all(src.startswith("data:image/png;base64,") for src in images)
    assert listing(run) == before  # the run folder is untouched by a page written elsewhere
    (run / "review_files" / "stale.png").write_bytes(b"old")
    write_review(run)
    assert listing(run) == before  # the image folder is replaced, not merged


# ---- a predict folder ----------------------------------------------------------------------------------------------
def test_predict_page_shows_previews_with_flags_flagged_cases_first(tmp_path):
    folder = make_predictions(tmp_path / "pred")
    review = read_folder(folder)
    flags = {c.case_id: [kind for kind, _ in c.flags] for c in review.cases}
    assert flags == {"bits": ["fragmented"], "far": ["out of distribution"], "gone": ["empty"], "ok_case": []}
    text = write_review(folder).html.read_text()
    parsed = Page(text)
    assert 'data-default-sort="flags"' in text and "case broken failed: cannot read it" in text
    assert {c["data-case"]: c["data-flags"] for c in parsed.cases} == {"bits": "1", "far": "1", "gone": "1",
                                                                      "ok_case": "0"}
    assert len(parsed.images) == 4 and "in 3 separate pieces" in text
    assert '<span class="badge">out of distribution</span>' in text


# ---- bad input -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage, message", [
    ("no overlays", "holds no overlays/epoch=*/"),
    ("killed mid-validation", "epoch=1: has no table.json: the run was stopped during that validation"),
    ("not a run", "not a `seg fit` run folder"),
    ("figure gone", "lists the figure 'case0/overlay.png', which is not a file in its folder"),
])
def test_bad_folders_are_one_line_exit_1_and_nothing_written(tmp_path, capsys, damage, message):
    run = make_run(tmp_path / "run")
    if damage == "no overlays":
        shutil.rmtree(run / "overlays")
    elif damage == "killed mid-validation":  # the figures of some volumes, but not the table that ends the epoch
        (run / "overlays" / "epoch=1" / TABLE).unlink()
        shutil.rmtree(run / "overlays" / "epoch=1" / "case3")
    elif damage == "not a run":
        run = tmp_path / "photos"
        run.mkdir()
        png(run / "holiday.png", 0)
    else:
        (run / "overlays" / "epoch=0" / "case0" / "overlay.png").unlink()
    before = listing(tmp_path)
    assert main(["review", str(run)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("seg review: error: ") and message in err, err
    assert listing(tmp_path) == before


def test_the_fit_callback_warns_in_one_line_and_writes_nothing(tmp_path, caplog):
    from types import SimpleNamespace

    from seg.training.callbacks import ReviewPage
    from seg.training.overlays import GateOverlays

    trainer = SimpleNamespace(is_global_zero=True, default_root_dir=str(tmp_path))
    (tmp_path / "checkpoints").mkdir()  # a run without overlays (--overlays.every_n_epochs 0)
    ReviewPage().on_fit_end(trainer, None)
    (record,) = caplog.records
    assert record.levelname == "WARNING" and record.getMessage().startswith("review page not written: ")
    assert "holds no overlays" in record.getMessage() and listing(tmp_path) == ["checkpoints"]
    caplog.clear()
    trainer.callbacks = [GateOverlays(every_n_epochs=0)]  # overlays turned off: no page, and nothing to say
    ReviewPage().on_fit_end(trainer, None)
    assert not caplog.records and listing(tmp_path) == ["checkpoints"]


# ---- in a real browser ---------------------------------------------------------------------------------------------
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def chromium(*args: str) -> str:
    result = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                             "--virtual-time-budget=5000", "--enable-logging=stderr", *args], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    # the page's console: a script error or a resource the page's policy refused would show here
    assert "Uncaught" not in result.stderr and "Content Security Policy" not in result.stderr, result.stderr[-2000:]
    return result.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium): the page is "
                                             "not checked in a browser; its HTML is tested above")
def test_page_in_chromium_loads_every_image_and_sorts_by_the_url(tmp_path):
    run = make_run(tmp_path / "run")
    url = write_review(run).html.as_uri()
    worst_first = Page(chromium("--dump-dom", url))
    assert worst_first.body["data-sort"] == "dice"
    assert [c["data-case"] for c in worst_first.cases] == ["c", EVIL_CASE, "a", "b"]
    assert worst_first.body["data-images"] == worst_first.body["data-images-loaded"] == "5"  # curves + 4 figures
    best_first = Page(chromium("--dump-dom", url + "#sort=-dice"))
    assert [c["data-case"] for c in best_first.cases] == ["b", "a", EVIL_CASE, "c"]
    by_id = Page(chromium("--dump-dom", url + "#sort=case"))
    assert [c["data-case"] for c in by_id.cases] == sorted(DICE)
    shot = tmp_path / "page.png"
    chromium("--window-size=1200,900", f"--screenshot={shot}", url)
    picture = matplotlib.image.imread(shot)
    assert picture.shape[:2] == (900, 1200) and picture[..., :3].std() > 0.05  # drawn, not blank
    flagged = Page(chromium("--dump-dom", write_review(make_predictions(tmp_path / "pred")).html.as_uri()))
    assert [c["data-case"] for c in flagged.cases] == ["bits", "far", "gone", "ok_case"]
    assert flagged.body["data-images"] == flagged.body["data-images-loaded"] == "4"
