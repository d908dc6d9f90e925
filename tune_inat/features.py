"""Outputs of a frozen prefix, computed once and shared by every trial that freezes the same way.

When augmentation is off, a frozen prefix maps each cached image to the same features every
epoch. So they are computed once per (image cache, backbone, weights, freeze point, resolution),
written under a file lock to `<cache_dir>/features/<key>.npy` (float16 when computed on a GPU in
bf16/fp16, float32 on the CPU), and every trial with that prefix trains only the rest of the
network on them: a head-only trial then costs a fraction of an epoch over the backbone. Beside
each array, `<key>.json` records its shape, size and checksums of a sample of rows; an entry that
does not match (a truncated or changed file) is recomputed under the lock, with one warning.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock
from torch import nn

from tune_inat.data.batches import BatchOrder, DeviceBatches
from tune_inat.data.dataset import TrainValData

log = logging.getLogger(__name__)

FEATURE_CACHE_LIMIT_BYTES = 8 * 2**30  # larger prefixes outputs are recomputed every epoch instead


def feature_key(
    data: TrainValData, backbone: str, weights: str, prefix_length: int, image_size: int, seed: int, dtype: str
) -> str:
    """Identity of a feature cache: the frozen weights it depends on, and the images."""
    if weights == "none":
        weights_id = f"random-init-seed-{seed}"  # the frozen prefix is the seeded random initialisation
    elif weights == "imagenet":
        weights_id = "imagenet"
    else:
        stat = Path(weights).stat()
        weights_id = f"{Path(weights).resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    identity = (
        f"{data.cache.directory.name}|{backbone}|{weights_id}|{prefix_length}|{image_size}|{dtype}|{torch.__version__}"
    )
    return f"{backbone}-{prefix_length}-{image_size}px-{hashlib.sha256(identity.encode()).hexdigest()[:16]}"


SAMPLED_ROWS = 32


def _row_digests(store: np.ndarray, rows: list[int]) -> list[str]:
    return [hashlib.sha256(np.ascontiguousarray(store[row]).tobytes()).hexdigest()[:16] for row in rows]


def _describe(path: Path) -> dict:
    """What a finished feature array holds: written beside it, checked when it is opened."""
    store = np.load(path, mmap_mode="r")
    rows = sorted({int(i) for i in np.linspace(0, len(store) - 1, min(len(store), SAMPLED_ROWS))})
    return {
        "shape": list(store.shape),
        "dtype": str(store.dtype),
        "bytes": path.stat().st_size,
        "sampled_rows": rows,
        "sampled_digests": _row_digests(store, rows),
    }


def _open_checked(path: Path, warn: bool) -> np.ndarray | None:
    """The feature array at `path` if it matches its record; None when missing or damaged."""
    record_path = path.with_suffix(".json")
    if not path.is_file():
        return None
    try:
        record = json.loads(record_path.read_text())
        store = np.load(path, mmap_mode="r")
        ok = (
            list(store.shape) == record["shape"]
            and str(store.dtype) == record["dtype"]
            and path.stat().st_size == record["bytes"]
            and _row_digests(store, record["sampled_rows"]) == record["sampled_digests"]
        )
    except (OSError, ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        if warn:
            log.warning("warning: frozen-feature cache %s is damaged; recomputing it", path)
        return None
    return store


@torch.inference_mode()
def prefix_outputs(
    prefix: nn.Module,
    data: TrainValData,
    image_size: int,
    device: torch.device,
    key: str,
    autocast_dtype: torch.dtype | None,
) -> np.ndarray | None:
    """The prefix's outputs for every cached image (row-indexed, memory-mapped), or None if too large."""
    folder = data.cache.directory.parent / "features"
    final = folder / f"{key}.npy"
    found = _open_checked(final, warn=False)
    if found is not None:
        return found
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder / f"{key}.lock")):
        found = _open_checked(final, warn=True)  # another trial may have computed it while we waited
        if found is not None:
            return found
        images = data.cache.open_images()
        rows = data.cache.rows
        batches = DeviceBatches(
            images,
            data.labels,
            rows,
            batch_size=128,
            image_size=image_size,
            device=device,
            train=False,
            channels_last=device.type == "cuda",
        )
        prefix.eval()
        dtype = np.float16 if autocast_dtype is not None else np.float32
        partial = folder / f".{key}.partial-{os.getpid()}-{uuid.uuid4().hex[:6]}.npy"
        store = None
        try:
            for batch_rows, (batch, _) in zip(batches.batches(0), batches.epoch(0), strict=True):  # same order
                with torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext():
                    output = prefix(batch)
                if store is None:
                    size = len(images) * math.prod(output.shape[1:]) * np.dtype(dtype).itemsize
                    if size > FEATURE_CACHE_LIMIT_BYTES:
                        log.info(
                            "frozen-prefix outputs would take %.1f GiB: computing them every epoch instead",
                            size / 2**30,
                        )
                        return None
                    store = np.lib.format.open_memmap(
                        partial, mode="w+", dtype=dtype, shape=(len(images), *output.shape[1:])
                    )
                store[batch_rows] = output.float().cpu().numpy().astype(dtype)
            store.flush()
            del store
            final.with_suffix(".json").unlink(missing_ok=True)
            os.replace(partial, final)
            record = final.with_suffix(".json.tmp")
            record.write_text(json.dumps(_describe(final)))
            os.replace(record, final.with_suffix(".json"))
        finally:
            partial.unlink(missing_ok=True)
    log.info("cached frozen-prefix outputs: %s", final)
    return np.load(final, mmap_mode="r")


class FeatureBatches(BatchOrder):
    """Batches of (features, labels) on `device`, in the same order as the image batches of the same run."""

    def __init__(
        self,
        features: np.ndarray,
        labels: np.ndarray,
        rows: np.ndarray,
        *,
        batch_size: int,
        device: torch.device,
        train: bool,
        seed: int = 0,
    ) -> None:
        super().__init__(rows, batch_size, train, seed)
        self.features = features
        self.labels = labels
        self.device = device

    def epoch(self, epoch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch_rows in self.batches(epoch):
            features = torch.from_numpy(np.asarray(self.features[batch_rows]))  # float16 or float32 as stored
            yield (
                features.to(self.device, non_blocking=True).float(),
                torch.from_numpy(self.labels[batch_rows]).to(self.device),
            )
