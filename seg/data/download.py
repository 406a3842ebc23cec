"""Download a Medical Segmentation Decathlon task, checksum-verified, with MONAI's own downloader.

The URLs and md5 sums are MONAI's (`monai.apps.DecathlonDataset.resource` / `.md5`), so they stay in step
with the MONAI release installed. The archive is fetched and md5-checked by `monai.apps.download_url`
(into a temporary file first) and unpacked by `monai.apps.extractall` (which refuses links and paths that
leave the folder), into a hidden folder beside the target that is renamed into place only when complete.
We call those two rather than `monai.apps.download_and_extract`, which is the same two calls after a HEAD
request through `requests` that only looks up the file name: that request fails on `file://` URLs (an
archive copied onto an offline machine) and tells nothing for the Decathlon's S3 archives.

    seg download --task Task04_Hippocampus --output data/
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import tarfile
import tempfile
import zipfile
from pathlib import Path
from urllib.error import URLError
from urllib.parse import urlparse

from monai.apps import DecathlonDataset, download_url, extractall
from monai.apps.utils import HashCheckError

from seg.errors import DataError


def msd_source(task: str) -> tuple[str, str]:
    """The official archive URL and its md5 for a Decathlon task name such as `Task04_Hippocampus`."""
    if task not in DecathlonDataset.resource:
        raise DataError(f"unknown Decathlon task '{task}'; choose one of {', '.join(DecathlonDataset.resource)}")
    return DecathlonDataset.resource[task], DecathlonDataset.md5[task]


def download_msd(task: str, output_dir, url: str | None = None, md5: str | None = None, progress: bool = True,
                 keep_archive: bool = False) -> Path:
    """Download, verify and extract one Decathlon task into `output_dir/<task>`.

    Args:
        task: the task's folder name, e.g. `Task04_Hippocampus`.
        output_dir: where the task folder goes (created if missing).
        url: another source for the archive (a mirror, or a local `file://` archive); default the official one.
        md5: the archive's md5; default the official one. Needed with `url` for a task MONAI does not list.
        progress: MONAI's download progress bar.
        keep_archive: keep `output_dir/<task>.tar` beside the folder (a later run re-verifies and reuses it).
            A verified archive is also kept when extracting it fails, so that a full disk costs no new download.

    Returns:
        The extracted dataset folder. A folder already there with its dataset.json is returned as it is.
    """
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", task):
        raise DataError(f"task must be a folder name like Task04_Hippocampus, got '{task}'")
    if url is None or md5 is None:
        official_url, official_md5 = msd_source(task)
        url, md5 = url or official_url, md5 or official_md5
    output_dir = Path(output_dir)
    target = output_dir / task
    if (target / "dataset.json").is_file():
        return target
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise DataError("exists but has no dataset.json (an interrupted copy?); remove it and download again", target)
    output_dir.mkdir(parents=True, exist_ok=True)

    suffix = "".join(Path(urlparse(url).path).suffixes[-2:]) or ".tar"  # ".tar", ".tar.gz" or ".zip"
    archive = output_dir / f"{task}{suffix}"
    had_archive = archive.exists()
    staging = Path(tempfile.mkdtemp(prefix=f".{task}.", suffix=".partial", dir=output_dir))
    try:
        try:
            download_url(url, filepath=archive, hash_val=md5, hash_type="md5", progress=progress)
        except HashCheckError:
            if had_archive:
                raise DataError(f"archive does not match the {task} md5 {md5}; delete it and run again",
                                archive) from None
            raise DataError(f"download from {url} does not match the {task} md5 {md5} (corrupt or not that "
                            "release); nothing was kept, run again", archive) from None
        except (URLError, OSError, RuntimeError, ValueError) as err:
            raise DataError(f"download from {url} failed: {err}", archive) from None
        try:
            extractall(archive, output_dir=staging)  # already verified: no second md5 pass over the archive
        except (OSError, ValueError, NotImplementedError, tarfile.TarError, zipfile.BadZipFile) as err:
            raise DataError(f"cannot extract the archive: {err}; delete it and run again", archive) from None
        extracted = staging / task
        if not (extracted / "dataset.json").is_file():
            found = sorted(p.name for p in staging.iterdir())
            raise DataError(f"archive has no {task}/dataset.json (it holds {found[:5]}); is it the right archive?",
                            archive)
        if target.is_dir():
            target.rmdir()  # empty, checked above
        os.rename(extracted, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if not keep_archive:
        archive.unlink(missing_ok=True)
    return target


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", required=True,
                        help=f"Decathlon task: {', '.join(DecathlonDataset.resource)}")
    parser.add_argument("--output", required=True, type=Path, help="folder to put the task folder in, e.g. data/")
    parser.add_argument("--url", help="download from this URL instead (a mirror; file:// for a local archive)")
    parser.add_argument("--md5", help="md5 of the archive at --url (default: the official task's)")
    parser.add_argument("--keep-archive", action="store_true", help="keep the .tar beside the extracted folder")


def run(args: argparse.Namespace) -> int:
    target = args.output / args.task
    existed = (target / "dataset.json").is_file()
    target = download_msd(args.task, args.output, url=args.url, md5=args.md5, keep_archive=args.keep_archive)
    if existed:
        print(f"{target} is already there (run `seg check-data {target}` to verify it)")
    else:
        print(f"downloaded and verified {args.task} into {target}")
    return 0
