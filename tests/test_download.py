"""The dataset download against a real local HTTP server: whole, resumed, offline, corrupt."""

from __future__ import annotations

import socket
import zipfile
from pathlib import Path

import pytest
from conftest import make_folder, run_cli
from http_helpers import RangeServer

from tune_inat.data.download import download_dataset
from tune_inat.data.folders import discover
from tune_inat.errors import UserError


def _zip_of_dataset(tmp_path: Path) -> bytes:
    src = tmp_path / "src"
    make_folder(src / "inaturalist_12K", {"Aves": 3, "Fungi": 3}, "train")
    make_folder(src / "inaturalist_12K", {"Aves": 1, "Fungi": 1}, "val")
    path = tmp_path / "nature_12K.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for file in sorted(src.rglob("*")):
            archive.write(file, file.relative_to(src).as_posix())
    return path.read_bytes()


@pytest.fixture()
def served(tmp_path: Path):
    server = RangeServer(_zip_of_dataset(tmp_path))
    yield server
    server.close()


def test_download_and_unpack(tmp_path: Path, served: RangeServer) -> None:
    dest = download_dataset(tmp_path / "data", served.url, progress=False)
    pool, test = discover(dest)
    assert pool.classes == ("Aves", "Fungi") and len(pool) == 6 and len(test) == 2
    assert not (dest / "nature_12K.zip").exists() and not (dest / "nature_12K.zip.part").exists()
    assert served.ranges == [None]


def test_download_resumes_a_partial_file(tmp_path: Path, served: RangeServer) -> None:
    dest = tmp_path / "data"
    dest.mkdir()
    half = len(served.payload) // 2
    (dest / "nature_12K.zip.part").write_bytes(served.payload[:half])
    download_dataset(dest, served.url, keep_zip=True, progress=False)
    assert served.ranges == [f"bytes={half}-"]
    assert (dest / "nature_12K.zip").read_bytes() == served.payload
    assert len(discover(dest)[0]) == 6


def test_corrupt_zip_is_reported(tmp_path: Path) -> None:
    dest = tmp_path / "data"
    dest.mkdir()
    (dest / "nature_12K.zip").write_bytes(b"PK\x03\x04 this is not really a zip")
    with pytest.raises(UserError, match="not a complete zip"):
        download_dataset(dest, "http://127.0.0.1:9/nature_12K.zip", progress=False)


def test_offline_download_is_one_clear_line(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once we leave: nothing listens there
    result = run_cli(
        "tune_inat.data", "download", str(tmp_path / "d"), "--url", f"http://127.0.0.1:{port}/nature_12K.zip"
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: cannot reach 127.0.0.1")
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
