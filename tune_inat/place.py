"""Where a search lives (its results folder and Ray's experiment folder), and who may use it (one search per name).

A search's name is claimed for as long as it runs: a lock on its folder, and a finished search's name
is never reused by a new search (only `--resume` continues it).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from tune_inat.errors import UserError
from tune_inat.lock import SearchLock
from tune_inat.results import (
    EPOCHS_FILE,
    SEARCH_RECORD_FILE,
    TRIALS_FILE,
    absolute_location,
    file_exists,
    is_local,
    resolve_folder,
)
from tune_inat.spec import SearchSpec

log = logging.getLogger(__name__)

TUNER_FILE = "tuner.pkl"  # Ray's own: a folder with it (and an experiment state) can be restored


@dataclass(frozen=True)
class SearchPlace:
    """One search's two folders: the results (Parquet, search.json) and Ray's experiment state."""

    name: str
    results: str  # results folder: local path or URI
    experiment: str  # Ray's experiment folder: absolute path or URI

    @classmethod
    def of(cls, results_root: str, name: str, storage_root: str | None = None) -> SearchPlace:
        storage = absolute_location(storage_root or results_root).rstrip("/")
        return cls(name, f"{absolute_location(results_root).rstrip('/')}/{name}", f"{storage}/{name}")

    def has(self, folder: str, name: str) -> bool:
        filesystem, path = resolve_folder(folder)
        return file_exists(filesystem, f"{path}/{name}")

    def restorable(self) -> bool:
        """Ray saved enough to continue: its tuner and at least one experiment state."""
        filesystem, path = resolve_folder(self.experiment)
        if not file_exists(filesystem, f"{path}/{TUNER_FILE}"):
            return False
        states = filesystem.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        return any(i.base_name.startswith("experiment_state-") and i.size for i in states)

    def holds_a_search(self) -> bool:
        """Anything a search leaves: its record, a table, Ray's state."""
        return any(self.has(self.results, n) for n in (SEARCH_RECORD_FILE, EPOCHS_FILE, TRIALS_FILE)) or self.has(
            self.experiment, TUNER_FILE
        )

    def lock(self) -> SearchLock | None:
        """A lock on the first local folder of the two; None when both are object storage."""
        for folder in (self.results, self.experiment):
            if is_local(folder):
                return SearchLock(Path(folder.removeprefix("file://")), self.name)
        return None


class Claim:
    """Hold a search's name for as long as it runs: one search per name, a new name never reused."""

    def __init__(self, place: SearchPlace, resume: bool) -> None:
        self.place = place
        self.resume = resume
        self._lock = place.lock()

    def __enter__(self) -> Claim:
        if self._lock is None:
            log.warning(
                "warning: %s cannot be locked (object storage): make sure no other search uses the name %s",
                self.place.results,
                self.place.name,
            )
        else:
            self._lock.acquire()
        if not self.resume and self.place.holds_a_search():
            self.__exit__(None, None, None)
            raise UserError(
                f"{self.place.results} already holds a search named {self.place.name}; continue it with "
                f"--resume --name {self.place.name}, or start a new one with another --name"
            )
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._lock is not None:
            self._lock.release()


def new_name(spec: SearchSpec, results_root: str, storage_root: str | None) -> str:
    """`<space>-<time>`, with a suffix if a search already has that name."""
    stem = f"{Path(spec.source).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    for suffix in ("", *(f"-{i}" for i in range(2, 100))):
        if not SearchPlace.of(results_root, stem + suffix, storage_root).holds_a_search():
            return stem + suffix
    raise UserError(f"too many searches named {stem}-* in {results_root}; pass --name")


def newest_search(stem: str, results_root: str) -> str:
    """The most recent search of a space in a local results folder (for --resume without --name)."""
    if not is_local(results_root):
        raise UserError("--resume with a remote --results needs --name")
    candidates = sorted(
        Path(absolute_location(results_root)).glob(f"{stem}-*/{SEARCH_RECORD_FILE}"), key=lambda p: p.stat().st_mtime
    )
    if not candidates:
        raise UserError(f"nothing to resume: no {stem}-* search in {results_root} (pass --name NAME)")
    return candidates[-1].parent.name
