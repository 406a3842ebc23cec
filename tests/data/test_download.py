"""seg download: MONAI's real download, md5 check and extraction, on a small local archive served as file://.

Nothing is stubbed: urllib fetches file:// URLs itself, so the fetch, the checksum and the extraction are all
MONAI's own code, as they would be for the Decathlon's https URLs.
"""

import hashlib
import shutil
import tarfile
import urllib.request

import monai.apps.utils
import pytest
from monai.apps import DecathlonDataset

from seg.cli import main
from seg.data.checks import check_dataset
from seg.data.download import download_msd, msd_source
from seg.data.layout import load_dataset
from seg.data.synthetic import write_dataset
from seg.errors import DataError

TASK = "Task99_Phantom"


@pytest.fixture
def archive(tmp_path):
    """A Decathlon-style `Task99_Phantom.tar` with two synthetic cases; returns (file:// url, md5)."""
    source = write_dataset(tmp_path / "src" / TASK, cases=2, size=(16, 16, 12))
    path = tmp_path / "server" / f"{TASK}.tar"
    path.parent.mkdir()
    with tarfile.open(path, "w") as tar:
        tar.add(source, arcname=TASK)
    md5 = hashlib.md5(path.read_bytes()).hexdigest()
    return path.as_uri(), md5


def test_official_sources_come_from_monai():
    url, md5 = msd_source("Task04_Hippocampus")
    assert url == DecathlonDataset.resource["Task04_Hippocampus"] and url.endswith("/Task04_Hippocampus.tar")
    assert md5 == DecathlonDataset.md5["Task04_Hippocampus"] == "9d24dba78a72977dbd1d2e110310f31b"
    with pytest.raises(DataError, match="unknown Decathlon task 'Task42_Brain'.*Task09_Spleen"):
        msd_source("Task42_Brain")


def test_download_verifies_extracts_and_loads(archive, tmp_path):
    url, md5 = archive
    out = tmp_path / "data"
    root = download_msd(TASK, out, url=url, md5=md5, progress=False)
    assert root == out / TASK
    info = load_dataset(root)
    assert [c.case_id for c in info.cases] == ["synth_000", "synth_001"]
    assert info.labels == {0: "background", 1: "liver", 2: "lesion"}
    assert check_dataset(root) == []
    assert sorted(p.name for p in out.iterdir()) == [TASK]  # archive removed, no staging folder left


def test_wrong_md5_is_refused_and_nothing_is_kept(archive, tmp_path):
    url, md5 = archive
    out = tmp_path / "data"
    wrong = "0" * 32
    with pytest.raises(DataError, match=f"does not match the {TASK} md5 {wrong}"):
        download_msd(TASK, out, url=url, md5=wrong, progress=False)
    assert list(out.iterdir()) == []


def test_kept_archive_is_reverified(archive, tmp_path):
    url, md5 = archive
    out = tmp_path / "data"
    download_msd(TASK, out, url=url, md5=md5, progress=False, keep_archive=True)
    assert (out / f"{TASK}.tar").is_file()
    (out / TASK / "dataset.json").unlink()  # force a second extraction: the folder no longer counts as done
    with pytest.raises(DataError, match="no dataset.json"):
        download_msd(TASK, out, url=url, md5=md5, progress=False)
    shutil.rmtree(out / TASK)
    with open(out / f"{TASK}.tar", "ab") as tar:
        tar.write(b"tampered")
    with pytest.raises(DataError, match="archive does not match .* delete it"):
        download_msd(TASK, out, url=url, md5=md5, progress=False)


def test_existing_dataset_is_not_downloaded_again(archive, tmp_path, monkeypatch):
    url, md5 = archive
    out = tmp_path / "data"
    download_msd(TASK, out, url=url, md5=md5, progress=False)

    def no_network(*args, **kwargs):
        raise AssertionError("downloaded again")

    monkeypatch.setattr(urllib.request, "urlretrieve", no_network)
    monkeypatch.setattr(monai.apps.utils, "urlretrieve", no_network)
    assert download_msd(TASK, out, url=url, md5=md5, progress=False) == out / TASK


def test_unreachable_url_is_a_data_error(tmp_path):
    missing = (tmp_path / "nowhere" / f"{TASK}.tar").as_uri()
    with pytest.raises(DataError, match="failed"):
        download_msd(TASK, tmp_path / "data", url=missing, md5="0" * 32, progress=False)
    assert list((tmp_path / "data").iterdir()) == []


def test_seg_download_command(archive, tmp_path, capsys):
    url, md5 = archive
    out = tmp_path / "data"
    assert main(["download", "--task", TASK, "--output", str(out), "--url", url, "--md5", md5]) == 0
    assert f"downloaded and verified {TASK} into {out / TASK}" in capsys.readouterr().out
    assert main(["download", "--task", TASK, "--output", str(out), "--url", url, "--md5", "f" * 32]) == 0
    assert "already there" in capsys.readouterr().out
    assert main(["download", "--task", "../escape", "--output", str(out)]) == 1
    assert "task must be a folder name" in capsys.readouterr().err


def _tar(path, members):
    """A tar holding `members` {name in the archive: bytes}; returns (file:// url, md5)."""
    import io

    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path.as_uri(), hashlib.md5(path.read_bytes()).hexdigest()


def test_archive_without_the_task_folder_is_refused(tmp_path):
    url, md5 = _tar(tmp_path / f"{TASK}.tar", {"Other/dataset.json": b"{}"})
    with pytest.raises(DataError, match=f"archive has no {TASK}/dataset.json .*'Other'"):
        download_msd(TASK, tmp_path / "data", url=url, md5=md5, progress=False)
    # the verified archive stays (a 7 GB task is not fetched twice after a full disk), nothing else
    assert [p.name for p in (tmp_path / "data").iterdir()] == [f"{TASK}.tar"]


def test_archive_escaping_its_folder_is_refused(tmp_path):
    url, md5 = _tar(tmp_path / f"{TASK}.tar", {f"{TASK}/dataset.json": b"{}", "../../evil.txt": b"x"})
    with pytest.raises(DataError, match="cannot extract the archive: Unsafe path"):
        download_msd(TASK, tmp_path / "out" / "data", url=url, md5=md5, progress=False)
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "out" / "evil.txt").exists()
