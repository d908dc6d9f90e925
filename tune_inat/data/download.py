"""Fetch and unpack iNaturalist 12K (`nature_12K.zip`, the file the course projects use).

The download resumes where it stopped (HTTP Range into `<zip>.part`), checks its size against
the server's, and is renamed to the zip only when complete; extraction goes to a temporary
folder (zip CRCs checked) that is moved into place at the end.
"""

from __future__ import annotations

import logging
import os
import shutil
import zipfile
from pathlib import Path, PurePosixPath
from urllib.error import HTTPError, URLError
from urllib.parse import urlparse
from urllib.request import Request, urlopen

from tqdm import tqdm  # text bars everywhere (tqdm.auto warns in a notebook without ipywidgets)

from tune_inat.errors import UserError

log = logging.getLogger(__name__)

NATURE_12K_URL = "https://storage.googleapis.com/wandb_datasets/nature_12K.zip"
CHUNK_BYTES = 1 << 20


def download_dataset(dest: Path, url: str = NATURE_12K_URL, keep_zip: bool = False, progress: bool = True) -> Path:
    """Download (resuming) and unpack `url` into `dest`; returns `dest`."""
    dest = Path(dest).expanduser()
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create {dest}: {err.strerror}") from err
    zip_path = dest / (PurePosixPath(urlparse(url).path).name or "dataset.zip")
    if not zip_path.is_file():
        fetch(url, zip_path, progress)
    extract(zip_path, dest)
    if not keep_zip:
        zip_path.unlink()
    return dest


def fetch(url: str, target: Path, progress: bool = True) -> None:
    """Download `url` to `target` via `target.part`, resuming a previous partial download."""
    part = target.with_name(target.name + ".part")
    offset = part.stat().st_size if part.is_file() else 0
    request = Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    host = urlparse(url).netloc or url
    try:
        response = urlopen(request, timeout=30)
    except HTTPError as err:
        if err.code == 416 and offset:  # nothing left to fetch: the part is whole
            part.rename(target)
            return
        raise UserError(f"download of {url} failed: HTTP {err.code} {err.reason}") from err
    except (URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise UserError(
            f"cannot reach {host} ({reason}): no network? Download {url} on a connected machine "
            f"and put it at {target}, then run this again"
        ) from err
    with response:
        if response.status != 206:
            offset = 0  # the server ignored the Range: start over
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        with (
            open(part, "ab" if offset else "wb") as out,
            tqdm(
                total=total,
                initial=offset,
                unit="B",
                unit_scale=True,
                desc=f"downloading {target.name}",
                disable=not progress,
                mininterval=1.0,
            ) as bar,
        ):
            try:
                while chunk := response.read(CHUNK_BYTES):
                    out.write(chunk)
                    bar.update(len(chunk))
            except OSError as err:
                raise UserError(f"download of {url} broke off ({err}); run the command again to resume") from err
    size = part.stat().st_size
    if total is not None and size != total:
        raise UserError(f"download of {url} incomplete: {size} of {total} bytes; run the command again to resume")
    part.rename(target)


def extract(zip_path: Path, dest: Path) -> None:
    """Unpack into a temporary folder under `dest`, then move its top-level entries into `dest`."""
    staging = dest / f".extracting-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with zipfile.ZipFile(zip_path) as archive:
            for member in archive.namelist():
                parts = PurePosixPath(member).parts
                if member.startswith("/") or ".." in parts:
                    raise UserError(f"{zip_path} holds an unsafe path {member!r}; not extracting")
            archive.extractall(staging)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError) as err:
        shutil.rmtree(staging, ignore_errors=True)
        raise UserError(f"{zip_path} is not a complete zip ({err}); delete it and download again") from err
    for entry in sorted(staging.iterdir()):
        if entry.name == "__MACOSX":
            continue
        target = dest / entry.name
        if target.exists():
            log.info("%s already exists; keeping it", target)
            continue
        entry.rename(target)
    shutil.rmtree(staging, ignore_errors=True)
