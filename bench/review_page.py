"""The review page of a run (`seg review`): its size on disk, the time to write it, and its load time in Chromium.

For RUN (a `seg fit` folder): writes the page `--repeats` times with its image folder and once with `--embed`,
reports the best write time, the page's and the image folder's bytes, and the time headless Chromium takes to load
the page and every image (`--dump-dom` of the page, less that of an empty page: Chromium's own start), and counts
the overlay figures in the run's MLflow store when it has one (`OUT/mlruns/`).

usage: python bench/review_page.py RUN [--repeats 3]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from seg.explain.review import write_review


def best_of(repeats: int, fn) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def chromium_seconds(url: str, repeats: int) -> float:
    command = [shutil.which("chromium"), "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", url]
    return best_of(repeats, lambda: subprocess.run(command, capture_output=True, check=True, timeout=300))[0]


def mlflow_figures(run: Path) -> int | None:
    if not (run / "mlruns" / "mlflow.db").is_file():
        return None
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{(run / 'mlruns' / 'mlflow.db').resolve()}")

    def walk(run_id, path=None):
        for item in client.list_artifacts(run_id, path):
            yield from walk(run_id, item.path) if item.is_dir else [item.path]

    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    return sum(p.endswith("overlay.png") for r in runs for p in walk(r.info.run_id))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        seconds, page = best_of(args.repeats, lambda: write_review(args.run, Path(tmp) / "review.html"))
        embed_seconds, embedded = best_of(1, lambda: write_review(args.run, Path(tmp) / "one.html", embed=True))
        figures = sum(1 for _ in args.run.glob("overlays/epoch=*/*/overlay.png"))
        print(f"{page.cases} cases, {figures} overlay figures on disk")
        print(f"page + review_files/: {page.megabytes:.1f} MB ({page.html.stat().st_size / 1e3:.0f} kB of HTML), "
              f"written in {seconds:.2f} s (best of {args.repeats})")
        print(f"--embed: {embedded.megabytes:.1f} MB in one file, written in {embed_seconds:.2f} s")
        if shutil.which("chromium"):
            empty = Path(tmp) / "empty.html"
            empty.write_text("<!doctype html><title>x</title>")
            base = chromium_seconds(empty.as_uri(), args.repeats)
            for label, html in (("page", page.html), ("--embed page", embedded.html)):
                load = chromium_seconds(html.as_uri(), args.repeats) - base
                print(f"Chromium load of the {label} with its images: {load:.2f} s (beyond {base:.2f} s to start)")
    count = mlflow_figures(args.run)
    if count is not None:
        print(f"MLflow store: {count} overlay figures")


if __name__ == "__main__":
    main()
