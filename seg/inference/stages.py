"""The three stages of a `predict_folder` run, overlapped, and its report.json rewritten as cases finish.

A thread loads and preprocesses the next scan while the model predicts the current one (small scans a group of
`sw_batch_size` at a time), and a thread inverts and writes the previous one (`Stages`); `ReportLog` keeps the
results so far.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from seg.errors import escape, one_line
from seg.inference.cases import CaseResult
from seg.inference.predictor import LoadedScan
from seg.inference.report import write_report

# Predictions waiting to be written: one keeps the writer busy and memory near one scan's worth per stage.
# Scans are loaded one ahead of the model, or a whole group ahead while they are small enough to be predicted
# together (`Predictor.infer_batch`, groups of the model's `sw_batch_size`).
WRITE_QUEUE = 1
# report.json is rewritten as cases finish (a killed run keeps what it did), at most every this many seconds,
# or 20 times the last write's duration when that is longer (a folder of thousands of cases).
REPORT_INTERVAL = 2.0


class ReportLog:
    """The results of a run so far (case id -> `CaseResult`), and report.json rewritten as cases finish."""

    def __init__(self, by_case: dict[str, CaseResult], path: Path, preprocessing: dict, meta: dict, report):
        self.by_case, self.path, self.preprocessing, self.meta, self.report = by_case, path, preprocessing, meta, report
        self.at, self.took, self.failed = time.monotonic(), 0.0, False  # the last progressive write

    def save(self, durable: bool) -> None:
        by_case = self.by_case
        write_report({c: by_case[c].report for c in sorted(by_case) if by_case[c].report}, self.path,
                     self.preprocessing, self.meta, durable)

    def record(self, case_id: str, result: CaseResult) -> None:
        """A case is done: its row, and report.json rewritten when the last rewrite is old enough."""
        self.by_case[case_id] = result
        now = time.monotonic()
        if self.failed or now - self.at < max(REPORT_INTERVAL, 20 * self.took):
            return
        try:  # not durable (fsync): a killed process's writes survive; the final report is durable
            self.save(durable=False)
        except (OSError, ValueError) as err:  # the final write says it once more, and stops the run there
            self.failed = True
            self.report(one_line(f"{escape(str(self.path))}: cannot write the report so far ({err}); going on"))
        self.at, self.took = time.monotonic(), time.monotonic() - now


class Stages:
    """The three stages of a run, overlapped: `loader` loads ahead, the model predicts (small scans a group of
    `sw_batch_size` at a time), `writer` inverts and writes behind; each finished case goes to `log` and `bar`.
    `run` is the `seg.inference.folder.FolderRun` doing each case's steps."""

    def __init__(self, run, log: ReportLog, bar, task, loader: ThreadPoolExecutor,
                 writer: ThreadPoolExecutor):
        self.run, self.log, self.bar, self.task, self.loader, self.writer = run, log, bar, task, loader, writer
        self.group_size = max(1, run.predictor.engine.sw_batch_size)
        self.writes: deque[tuple[str, list[Path], Future]] = deque()

    def predict_all(self, todo: list[tuple[str, list[Path]]]) -> None:
        """Every case of `todo` (case id, input files) loaded, predicted and written."""
        run, predictor = self.run, self.run.predictor
        group: list[LoadedScan] = []
        try:
            for case_id, paths, scan, error in self.loaded(todo):
                if error is not None:
                    self.record(case_id, run.failed(case_id, paths, error))
                elif not predictor.fits_one_window(scan):
                    self.predict(group)
                    self.predict([scan])
                else:
                    group.append(scan)
                    if len(group) == self.group_size:
                        self.predict(group)
                del scan
            self.predict(group)
            self.collect(0)
        finally:
            group.clear()

    def record(self, case_id: str, result: CaseResult) -> None:
        self.log.record(case_id, result)
        self.bar.advance(self.task)

    def loaded(self, todo):
        """(case_id, paths, scan or None, error or None) in order, loading ahead in the background."""
        queue: deque = deque()
        upcoming = iter(todo)

        def top_up(depth: int) -> None:
            while len(queue) < depth and (case := next(upcoming, None)) is not None:
                queue.append((case, self.loader.submit(self.run.load, *case)))

        top_up(1)
        while queue:
            (case_id, paths), future = queue.popleft()
            try:
                scan, error = future.result(), None
            except Exception as err:
                scan, error = None, err
            del future
            # small scans go to the model a group at a time: keep a group loading; big ones one ahead
            top_up(self.group_size if scan is not None and self.run.predictor.fits_one_window(scan) else 1)
            yield case_id, paths, scan, error

    def collect(self, block_until: int) -> None:
        """Record the finished writes until at most `block_until` are pending."""
        while len(self.writes) > block_until:
            case_id, paths, future = self.writes.popleft()
            try:
                result = future.result()
            except Exception as err:  # raised outside `finish`'s own handling: still this case's alone
                result = self.run.failed(case_id, paths, err)
            self.record(case_id, result)

    def predict(self, group: list[LoadedScan]) -> None:
        """Predict a group and queue its writes; a group that fails is predicted scan by scan to find the culprit."""
        if not group:
            return
        self.bar.update(self.task, description=one_line(", ".join(scan.case_id for scan in group)))
        try:
            outputs, seconds = self.run.infer(group)
        except Exception as err:
            if len(group) > 1:  # find the scan to blame, and predict the others
                for scan in group:
                    self.predict([scan])
            else:
                self.record(group[0].case_id, self.run.failed(group[0].case_id, group[0].paths, err))
            group.clear()
            return
        self.collect(WRITE_QUEUE - 1)
        for scan, out in zip(group, outputs):
            self.writes.append((scan.case_id, scan.paths,
                                self.writer.submit(self.run.finish, scan, out, scan.seconds + seconds)))
        group.clear()
