"""`seg review FOLDER`: one static HTML page to review a `seg fit` run or a `seg predict` output, no server needed.

A run folder gives its settings (`config.yaml`, the plan's reason for each value), its learning curves (the metrics
CSV every run writes under `csv/`) and, per validation volume, the overlay figure of every exported epoch with its
Dice per class, gate concentration and missing classes (`overlays/epoch=<E>/table.json`), worst Dice first. A
`seg predict` folder gives each case's preview (`--preview`) with its report's flags (`report.json`), flagged cases
first. Reading only: nothing here needs Lightning or a network.

The page is `review.html` with its images in `review_files/` beside it (copy both: they open from a USB stick), or
with `--embed` one file holding its images. Three stages: `read_folder` (every check; raises `SegError` before
anything is written), `seg.explain.review_html.render`, and `write_review` (images, then the page, atomically).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import csv
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from seg.errors import SegError
from seg.explain.export import TABLE
from seg.inference.report import REPORT
from seg.io import atomic_path

REVIEW = "review.html"
# Report flags grouped as a reviewer reads them; a class in several pieces is found from the report's components.
OUT_OF_DISTRIBUTION = ("spacing", "intensity", "modality")


@dataclass
class Scores:
    """One case at one exported epoch: Dice per class, concentration per map, missing classes (one line)."""

    epoch: int
    dice: dict[str, float | None]
    concentration: dict[str, float | None]
    missing: str = ""


@dataclass
class Case:
    """One case of the page: its figures (label, image file) in display order, its scores per epoch, its flags.

    `dice` is the mean Dice of the last exported epoch (the sort key; None when unknown).
    """

    case_id: str
    figures: list[tuple[str, Path]] = field(default_factory=list)
    scores: list[Scores] = field(default_factory=list)
    flags: list[tuple[str, str]] = field(default_factory=list)  # (kind, the report's line)

    @property
    def dice(self) -> float | None:
        values = [v for v in (self.scores[-1].dice.values() if self.scores else ()) if v is not None]
        return sum(values) / len(values) if values else None


@dataclass
class Review:
    """What the page shows: a run (`kind` "run") or a `seg predict` output ("predict")."""

    kind: str
    folder: Path
    cases: list[Case]
    class_names: list[str] = field(default_factory=list)
    levels: list[str] = field(default_factory=list)
    settings: str | None = None  # the config YAML's text
    plan: list[tuple[str, str, str]] = field(default_factory=list)  # (key, value, reason)
    metrics: list[dict[str, float]] = field(default_factory=list)  # the metrics CSV's rows, numbers only
    notes: list[str] = field(default_factory=list)  # lines shown at the top (failed exports, failed cases)


@dataclass
class Page:
    """A written page: the HTML file, its image folder (None when embedded), its cases and size in bytes."""

    html: Path
    images: Path | None
    cases: int
    bytes: int

    @property
    def megabytes(self) -> float:
        return self.bytes / 1e6


# ---- reading -----------------------------------------------------------------------------------------------------
def read_folder(folder: str | os.PathLike) -> Review:
    """The review of a run folder or a `seg predict` output folder; a `SegError` naming the problem otherwise."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SegError("no such folder", folder)
    if any((folder / name).exists() for name in ("overlays", "checkpoints", "split.json")):
        return read_run(folder)
    if (folder / REPORT).is_file():
        return read_predictions(folder)
    raise SegError("not a `seg fit` run folder (overlays/, checkpoints/, split.json) nor a `seg predict` output "
                   f"({REPORT}): nothing to review", folder)


def _json(path: Path) -> dict:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise SegError(f"cannot be read as JSON ({err})", path) from None
    if not isinstance(document, dict):
        raise SegError("is not a JSON object", path)
    return document


def _epoch(path: Path) -> int | None:
    value = path.name.removeprefix("epoch=")
    return int(value) if path.is_dir() and path.name.startswith("epoch=") and value.isdigit() else None


def read_run(folder: Path) -> Review:
    """Every exported epoch's table (`overlays/epoch=<E>/table.json`), the settings and the metrics of a run."""
    epochs = sorted((e, p) for p in (folder / "overlays").glob("epoch=*") if (e := _epoch(p)) is not None)
    if not epochs:
        raise SegError("holds no overlays/epoch=*/ (the run exported no gate overlays: "
                       "--overlays.every_n_epochs 0, or it stopped before its first validation)", folder)
    review = Review("run", folder, [])
    cases: dict[str, Case] = {}
    for epoch, path in epochs:
        table_path = path / TABLE
        if not table_path.is_file():
            raise SegError(f"has no {TABLE}: the run was stopped during that validation; resume it "
                           "(`seg fit ... --ckpt_path last`) or delete that folder to review the epochs before it",
                           path)
        table = _json(table_path)
        columns, rows = table.get("columns"), table.get("data")
        if not isinstance(columns, list) or not isinstance(rows, list) or columns[:1] != ["case_id"]:
            raise SegError("is not an overlay table (columns starting with case_id, data)", table_path)
        review.class_names = [str(c) for c in table.get("class_names") or []]
        review.levels = [str(lv) for lv in table.get("levels") or []]
        for case_id in table.get("failed") or []:
            review.notes.append(f"epoch {epoch}: the overlay export of case {case_id} failed")
        for row in rows:
            if not isinstance(row, list) or len(row) != len(columns):
                raise SegError(f"has a row that does not match its {len(columns)} columns", table_path)
            values = dict(zip(columns, row))
            case = cases.setdefault(str(values["case_id"]), Case(str(values["case_id"])))
            case.scores.append(Scores(epoch, {c: _number(values.get(f"dice_{c}")) for c in review.class_names},
                                      {lv: _number(values.get(f"concentration_{lv}")) for lv in review.levels},
                                      str(values.get("missing") or "")))
            if values.get("overlay"):
                figure = (path / str(values["overlay"])).resolve()
                if path.resolve() not in figure.parents or not figure.is_file():
                    raise SegError(f"lists the figure {values['overlay']!r}, which is not a file in its folder",
                                   table_path)
                case.figures.append((f"epoch {epoch}", figure))
    review.cases = list(cases.values())
    review.settings, config = read_settings(folder)
    review.plan = plan_lines(config)
    review.metrics = read_metrics(folder)
    return review


def _number(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def _versions(folder: Path, name: str) -> list[Path]:
    """`csv/version_<N>/<name>` of a run, oldest first (a resumed run adds a version)."""
    found = [p for p in (folder / "csv").glob(f"version_*/{name}") if p.parent.name[8:].isdigit()]
    return sorted(found, key=lambda p: int(p.parent.name[8:]))


def read_settings(folder: Path) -> tuple[str | None, dict]:
    """The run's config YAML (`config.yaml` beside the run, or the metrics logger's copy, or `plan.yaml`):
    its text and its content (empty when unreadable)."""
    candidates = [folder / "config.yaml", *reversed(_versions(folder, "config.yaml")), folder / "plan.yaml"]
    for path in candidates:
        if path.is_file():
            text = path.read_text(encoding="utf-8", errors="replace")
            try:
                config = yaml.safe_load(text)
            except yaml.YAMLError:
                config = None
            return text, config if isinstance(config, dict) else {}
    return None, {}


def plan_lines(config: dict) -> list[tuple[str, str, str]]:
    """`seg plan`'s decisions kept in the config (`data.plan`: key -> reason), with the value the run used."""
    plan = (config.get("data") or {}).get("plan") if isinstance(config.get("data"), dict) else None
    lines = []
    for key, reason in (plan.items() if isinstance(plan, dict) else ()):
        value: object = config
        for part in str(key).split("."):
            value = value.get(part) if isinstance(value, dict) else None
        lines.append((str(key), json.dumps(value), str(reason)))
    return lines


def read_metrics(folder: Path) -> list[dict[str, float]]:
    """Every row of the run's metrics CSVs (`csv/version_*/metrics.csv`, in order), numbers only."""
    rows = []
    for path in _versions(folder, "metrics.csv"):
        with contextlib.suppress(OSError, csv.Error, UnicodeDecodeError), open(path, newline="") as f:
            for row in csv.DictReader(f):
                numbers = {k: v for k, v in ((k, _number(v)) for k, v in row.items() if k) if v is not None}
                if numbers:
                    rows.append(numbers)
    return rows


def read_predictions(folder: Path) -> Review:
    """Each case of a `seg predict` output: its preview and its report's flags; failed cases from summary.csv."""
    reports = _json(folder / REPORT).get("cases")
    if not isinstance(reports, dict):
        raise SegError("has no \"cases\" object: not a `seg predict` report", folder / REPORT)
    review = Review("predict", folder, [])
    for case_id, report in sorted(reports.items()):
        case = Case(str(case_id))
        report = report if isinstance(report, dict) else {}
        for line in report.get("flags") or []:
            kind = str(line).split(":", 1)[0]
            case.flags.append(("out of distribution" if kind in OUT_OF_DISTRIBUTION else kind, str(line)))
        for name, stats in (report.get("classes") or {}).items():
            pieces = stats.get("components", 0) if isinstance(stats, dict) else 0
            if isinstance(pieces, int) and pieces > 1:
                case.flags.append(("fragmented", f"fragmented: '{name}' is in {pieces} separate pieces"))
        preview = folder / f"{case.case_id}_preview.png"
        if "/" not in case.case_id and preview.is_file():
            case.figures.append(("preview", preview))
        review.cases.append(case)
        review.class_names = review.class_names or [str(n) for n in report.get("classes") or {}]
    if not any(c.figures for c in review.cases):
        review.notes.append("no previews in this folder: run `seg predict` with --preview to see each case")
    summary = folder / "summary.csv"
    with contextlib.suppress(OSError, csv.Error, UnicodeDecodeError), open(summary, newline="") as f:
        for row in csv.DictReader(f):
            if row.get("status") == "failed":
                review.notes.append(f"case {row.get('case')} failed: {row.get('message')}")
    return review


# ---- writing -----------------------------------------------------------------------------------------------------
def _link_or_copy(source: Path, target: Path) -> None:
    """`source` at `target`: a hard link (no copy) where the file system allows, else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def write_review(folder: str | os.PathLike, output: str | os.PathLike | None = None, embed: bool = False) -> Page:
    """Read `folder` (`read_folder`) and write its page to `output` (default `<folder>/review.html`).

    The images go to `<output stem>_files/` beside the page, written under a temporary name and swapped in, then
    the page is renamed into place; with `embed` they are inside the page. A `SegError` leaves nothing written.
    """
    from seg.explain.review_html import curves_png, render

    review = read_folder(folder)
    output = Path(output) if output is not None else Path(folder) / REVIEW
    images = output.with_name(f"{output.stem}_files")
    staging = images.with_name(f".tmp-{os.getpid()}-{images.name}")

    def place(name: str, path: Path | None, data: bytes | None = None) -> str:
        """The page's reference to one image: a data URI, or its name in the image folder (linked or written)."""
        if embed:
            return "data:image/png;base64," + base64.b64encode(data or path.read_bytes()).decode()
        if data is not None:
            (staging / name).write_bytes(data)
        else:
            _link_or_copy(path, staging / name)
        return f"{images.name}/{name}"

    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        if not embed:
            staging.mkdir()
        curves = curves_png(review.metrics)
        sources = {path: place(f"{i:04d}-{j:03d}.png", path) for i, case in enumerate(review.cases)
                   for j, (_, path) in enumerate(case.figures)}
        text = render(review, sources, place("curves.png", None, curves) if curves else None)
        with atomic_path(output) as tmp:
            tmp.write_text(text, encoding="utf-8")
            if not embed:  # the image folder is swapped in just before the page
                old = images.with_name(f".old-{os.getpid()}-{images.name}")
                if images.exists():
                    os.replace(images, old)
                os.replace(staging, images)
                shutil.rmtree(old, ignore_errors=True)
    except OSError as err:
        raise SegError(f"cannot write the review page ({err.strerror or err})", err.filename or output) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    size = output.stat().st_size + (sum(p.stat().st_size for p in images.iterdir()) if not embed else 0)
    return Page(output, None if embed else images, len(review.cases), size)


# ---- seg review --------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    text = __doc__.split("\n\n", 1)[0].split(": ", 1)[1]
    parser.description = text[0].upper() + text[1:]
    parser.add_argument("folder", type=Path, help="a `seg fit` run folder or a `seg predict` output folder")
    parser.add_argument("--output", type=Path, default=None, help=f"the page to write (default FOLDER/{REVIEW}); "
                        "its images go to <name>_files/ beside it")
    parser.add_argument("--embed", action="store_true",
                        help="put the images inside the page: one file, but about twice the size and much slower "
                             "to open (a 20-volume run of 3 exported epochs: 47 MB, 20 s in Chromium instead of 0.3 s)")


def run(args: argparse.Namespace) -> int:
    page = write_review(args.folder, args.output, args.embed)
    where = f" and {page.images}/" if page.images else ""
    print(f"seg review: {page.html}{where}: {page.cases} cases, {page.megabytes:.1f} MB; open it in a browser")
    return 0
