"""The data handles the rest of the program uses: scan, validate, cache, split, in one call.

The search gets `TrainValData`, which has no test split at all: the test set can only be
reached through `prepare_test`, which the search never calls.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tune_inat.data.cache import ImageCache, build_or_load_cache
from tune_inat.data.decode import stored_size_for
from tune_inat.data.folders import FileList, discover, stratified_split
from tune_inat.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataConfig:
    """Where the data is and how it is split; the same for every trial of a search."""

    root: Path
    cache_dir: Path
    val_fraction: float = 0.2  # of the training pool, stratified, for the search's validation
    test_fraction: float = 0.2  # only for a root without val/: held out as the test set
    split_seed: int = 0
    decode_workers: int = 0  # 0: one per CPU core
    progress: bool = True


@dataclass(frozen=True, eq=False)
class TrainValData:
    """Training and validation rows of one image cache: the search's whole view of the data."""

    cache: ImageCache
    train_rows: np.ndarray
    val_rows: np.ndarray

    @property
    def classes(self) -> tuple[str, ...]:
        return self.cache.classes

    @property
    def labels(self) -> np.ndarray:
        return self.cache.labels


@dataclass(frozen=True, eq=False)
class TestData:
    """The held-out test rows; read once, by the final evaluation only."""

    cache: ImageCache
    rows: np.ndarray

    @property
    def classes(self) -> tuple[str, ...]:
        return self.cache.classes


def _cached(files: FileList, cfg: DataConfig, image_size: int) -> ImageCache:
    cache = build_or_load_cache(
        files, stored_size_for(image_size), cfg.cache_dir, workers=cfg.decode_workers, progress=cfg.progress
    )
    if cache.skipped:
        first = "; ".join(f"{name}: {reason}" for name, reason in cache.skipped[:3])
        log.warning("skipped %d unreadable images in %s (first: %s)", len(cache.skipped), files.root, first)
    readable = np.bincount(cache.labels[cache.rows], minlength=len(cache.classes))
    for label in np.flatnonzero(readable == 0):
        raise UserError(f"class {cache.classes[label]!r} in {files.root} has no readable images")
    return cache


def prepare_train_val(cfg: DataConfig, image_size: int) -> TrainValData:
    """Scan, validate and cache the training pool, then split off the validation rows."""
    pool, _ = discover(cfg.root, cfg.test_fraction, cfg.split_seed)
    cache = _cached(pool, cfg, image_size)
    train_idx, val_idx = stratified_split(cache.labels[cache.rows], cfg.val_fraction, cfg.split_seed)
    return TrainValData(cache=cache, train_rows=cache.rows[train_idx], val_rows=cache.rows[val_idx])


def merge_validation(data: TrainValData) -> TrainValData:
    """Training on train + validation (the final re-training): every row trains, none validates."""
    rows = np.sort(np.concatenate([data.train_rows, data.val_rows]))
    return TrainValData(cache=data.cache, train_rows=rows, val_rows=np.empty(0, dtype=np.int64))


def prepare_test(cfg: DataConfig, image_size: int) -> TestData:
    """Scan, validate and cache the test set (`val/` of iNaturalist 12K)."""
    _, test = discover(cfg.root, cfg.test_fraction, cfg.split_seed)
    cache = _cached(test, cfg, image_size)
    return TestData(cache=cache, rows=cache.rows)
