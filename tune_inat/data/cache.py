"""Decode every image once into a memory-mapped uint8 array that every later trial reuses.

A cache entry is a folder `<cache_dir>/<key>/` holding `images.npy` (N, S, S, 3) uint8 and
`meta.json`. The key hashes the file list (relative paths, sizes, mtimes), the labels and the
stored size S, so a changed dataset gets a new entry and an unchanged one is found again by
every trial and every later search. An entry is built under a file lock in a temporary folder
that is renamed into place only when complete: a crash never leaves a half cache that looks
whole, and two processes asking for the same entry build it once.

An entry checks itself when opened: `meta.json` carries a checksum of its own content, the
array's shape and byte size, and checksums of a sample of rows; a damaged entry (a truncated
array, edited or cut metadata, rows that changed) is rebuilt under the lock, with one warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock, Timeout
from tqdm import tqdm  # text bars everywhere (tqdm.auto warns in a notebook without ipywidgets)

from tune_inat.data.decode import decode_image
from tune_inat.data.folders import FileList
from tune_inat.errors import UserError

log = logging.getLogger(__name__)

CACHE_FORMAT = 2
IMAGES_FILE = "images.npy"
META_FILE = "meta.json"
SAMPLED_ROWS = 32  # rows whose checksums the metadata records


class DamagedCache(Exception):
    """A cache entry whose files do not match what its metadata records."""


def default_cache_dir() -> Path:
    """`$TUNE_INAT_CACHE`, else `$XDG_CACHE_HOME/tune_inat`, else `~/.cache/tune_inat`."""
    if os.environ.get("TUNE_INAT_CACHE"):
        return Path(os.environ["TUNE_INAT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tune_inat"


@dataclass(frozen=True, eq=False)
class ImageCache:
    """A built cache entry. `rows` are the readable images; unreadable rows hold zeros."""

    directory: Path
    source: Path  # the folder the files are relative to
    stored_size: int
    classes: tuple[str, ...]
    files: tuple[str, ...]  # relative path of every row
    labels: np.ndarray  # int64 label of every row
    rows: np.ndarray  # int64 indices of the readable rows
    skipped: tuple[tuple[str, str], ...]  # (file, reason) of unreadable rows

    def open_images(self) -> np.ndarray:
        """The (N, S, S, 3) uint8 array, memory-mapped read-only (shared by every process)."""
        return np.load(self.directory / IMAGES_FILE, mmap_mode="r")

    def is_present(self) -> bool:
        """The entry's files are there with the size its metadata records (a cheap check, for trials)."""
        path = self.directory / IMAGES_FILE
        return (
            (self.directory / META_FILE).is_file()
            and path.is_file()
            and path.stat().st_size >= len(self.files) * 3 * self.stored_size**2
        )


def cache_key(files: FileList, stored_size: int) -> str:
    identity = {
        "format": CACHE_FORMAT,
        "stored_size": stored_size,
        "classes": list(files.classes),
        "files": [
            [name, int(label), int(size), int(mtime)]
            for name, label, size, mtime in zip(files.files, files.labels, files.sizes, files.mtimes_ns)
        ],
    }
    digest = hashlib.sha256(json.dumps(identity, separators=(",", ":")).encode()).hexdigest()
    return f"{stored_size}px-{len(files)}img-{digest[:20]}"


def _sampled_rows(count: int) -> list[int]:
    return sorted({int(i) for i in np.linspace(0, count - 1, min(count, SAMPLED_ROWS))}) if count else []


def _row_digest(images: np.ndarray, row: int) -> str:
    return hashlib.sha256(np.ascontiguousarray(images[row]).tobytes()).hexdigest()[:16]


def _meta_digest(meta: dict) -> str:
    content = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def verify_cache(directory: Path) -> dict:
    """The entry's metadata, after checking the entry against it; DamagedCache says what is wrong."""
    try:
        meta = json.loads((directory / META_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DamagedCache(f"{META_FILE} is unreadable ({type(err).__name__})") from None
    if not isinstance(meta, dict) or meta.get("meta_sha256") != _meta_digest(meta):
        raise DamagedCache(f"{META_FILE} does not match its checksum")
    try:
        _check_images(directory, meta)
    except (KeyError, TypeError, IndexError) as err:
        raise DamagedCache(f"{META_FILE} lacks what it should record ({type(err).__name__}: {err})") from None
    return meta


def _check_images(directory: Path, meta: dict) -> None:
    shape = tuple(meta["shape"])
    try:
        images = np.load(directory / IMAGES_FILE, mmap_mode="r")
    except (OSError, ValueError) as err:
        raise DamagedCache(f"{IMAGES_FILE} is unreadable ({str(err).splitlines()[0][:80]})") from None
    if images.shape != shape or images.dtype != np.uint8 or (directory / IMAGES_FILE).stat().st_size != meta["bytes"]:
        raise DamagedCache(
            f"{IMAGES_FILE} holds {images.shape} in {(directory / IMAGES_FILE).stat().st_size} bytes, "
            f"not the recorded {shape} in {meta['bytes']}"
        )
    for row, digest in zip(meta["sampled_rows"], meta["sampled_digests"]):
        if _row_digest(images, row) != digest:
            raise DamagedCache(f"row {row} of {IMAGES_FILE} changed since it was written")


def load_cache(directory: Path) -> ImageCache:
    meta = verify_cache(directory)
    skipped_rows = set(meta["skipped_rows"])
    files = tuple(meta["files"])
    return ImageCache(
        directory=directory,
        source=Path(meta["source"]),
        stored_size=meta["stored_size"],
        classes=tuple(meta["classes"]),
        files=files,
        labels=np.asarray(meta["labels"], dtype=np.int64),
        rows=np.asarray([i for i in range(len(files)) if i not in skipped_rows], dtype=np.int64),
        skipped=tuple((files[i], reason) for i, reason in zip(meta["skipped_rows"], meta["skipped_reasons"])),
    )


def build_or_load_cache(
    files: FileList,
    stored_size: int,
    cache_dir: Path,
    workers: int = 0,
    progress: bool = True,
) -> ImageCache:
    """Return the cache entry for `files` at `stored_size`, decoding only if it does not exist."""
    cache_dir = Path(cache_dir).expanduser()
    key = cache_key(files, stored_size)
    final = cache_dir / key
    if (final / META_FILE).is_file():
        try:
            return load_cache(final)
        except DamagedCache:
            pass  # rebuilt below, under the lock
    lock = FileLock(str(cache_dir / f"{key}.lock"))
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        lock.acquire(timeout=0)
    except Timeout:
        log.info("another process is building the image cache %s; waiting for it", final)
        lock.acquire()
    except OSError as err:
        raise UserError(
            f"cache folder {cache_dir} is not writable ({err.strerror}); pass another with --cache-dir"
        ) from err
    try:
        if final.exists():  # built by another process while we waited, or damaged
            try:
                return load_cache(final)
            except DamagedCache as err:
                log.warning("warning: image cache %s is damaged (%s); rebuilding it", final, err)
                damaged = cache_dir / f"{key}.damaged-{uuid.uuid4().hex[:8]}"
                os.rename(final, damaged)
                shutil.rmtree(damaged, ignore_errors=True)
        for stale in cache_dir.glob(f"{key}.partial-*"):
            shutil.rmtree(stale, ignore_errors=True)
        partial = cache_dir / f"{key}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            _decode_all(files, stored_size, partial, workers, progress)
            os.rename(partial, final)
            log.info("built image cache %s", final)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    finally:
        lock.release()
    return load_cache(final)


def _decode_all(files: FileList, stored_size: int, folder: Path, workers: int, progress: bool) -> None:
    """Decode every file into `folder/images.npy` in parallel, then write meta.json last."""
    folder.mkdir(parents=True)
    reasons, sampled, digests = _decode_into(folder / IMAGES_FILE, files, stored_size, workers, progress)
    skipped_rows = [row for row, reason in enumerate(reasons) if reason is not None]
    meta = {
        "format": CACHE_FORMAT,
        "stored_size": stored_size,
        "source": str(files.root),
        "classes": list(files.classes),
        "files": list(files.files),
        "labels": files.labels.tolist(),
        "skipped_rows": skipped_rows,
        "skipped_reasons": [reasons[row] for row in skipped_rows],
        "shape": [len(files), stored_size, stored_size, 3],
        "bytes": (folder / IMAGES_FILE).stat().st_size,
        "sampled_rows": sampled,
        "sampled_digests": digests,
    }
    meta["meta_sha256"] = _meta_digest(meta)
    (folder / META_FILE).write_text(json.dumps(meta))


def _decode_into(
    path: Path, files: FileList, stored_size: int, workers: int, progress: bool
) -> tuple[list[str | None], list[int], list[str]]:
    """Fill a new (N, S, S, 3) array at `path`; (reason each unreadable row failed, sampled rows, their digests)."""
    images = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(len(files), stored_size, stored_size, 3))
    _reserve_disk_space(path)

    def decode_row(row: int) -> str | None:
        try:
            images[row] = decode_image(files.path(row), stored_size)
            return None
        except Exception as err:  # any unreadable file is skipped and reported, never fatal
            return f"{type(err).__name__}: {err}".splitlines()[0][:200]

    workers = workers or min(32, os.cpu_count() or 1)
    # Pillow releases the GIL while decoding and resizing, so threads decode in parallel.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        reasons = list(
            tqdm(
                pool.map(decode_row, range(len(files)), chunksize=1),
                total=len(files),
                desc=f"decoding {len(files)} images once ({stored_size}px cache)",
                unit="img",
                disable=not progress,
                mininterval=1.0,
            )
        )
    images.flush()
    sampled = _sampled_rows(len(files))
    return reasons, sampled, [_row_digest(images, row) for row in sampled]


def _reserve_disk_space(path: Path) -> None:
    """Allocate the whole file now: a full disk fails here with a clear line, not mid-decode."""
    size = path.stat().st_size
    try:
        with open(path, "r+b") as f:
            os.posix_fallocate(f.fileno(), 0, size)
    except AttributeError:  # no posix_fallocate on this platform: the sparse file will do
        return
    except OSError as err:
        raise UserError(
            f"not enough disk space for the image cache at {path.parent.parent} "
            f"({size / 2**30:.1f} GiB needed: {err.strerror}); pass another with --cache-dir"
        ) from err
