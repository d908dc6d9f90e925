"""Serve training and evaluation batches straight from the uint8 cache, prepared on the device.

A background thread gathers the next batches' rows from the memory-mapped cache into (pinned,
on CUDA) uint8 tensors; the training device does the rest on whole batches: random resized
crop + horizontal flip in one `grid_sample`, optional colour jitter, ImageNet normalisation.
Evaluation takes the centre `image_size` crop of the stored square. No per-image PIL work.
Shuffling and augmentation draw from generators seeded by (seed, epoch), so an epoch is the
same wherever a run restarts.
"""

from __future__ import annotations

import math
import queue
import threading
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LUMA = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class Augmentation:
    """Train-time augmentation; `enabled=False` trains on the evaluation view."""

    enabled: bool = True
    crop_scale_min: float = 0.25  # smallest crop area, as a fraction of the stored square
    hflip: bool = True
    color_jitter: float = 0.0  # brightness/contrast/saturation strength, 0 = off


def normalize_(images: torch.Tensor) -> torch.Tensor:
    """In place: [0, 255] floats -> ImageNet-normalised, NCHW."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return images.mul_(1.0 / (255.0 * std)).sub_(mean / std)


def center_crop(batch: torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 (B, S, S, 3) -> normalised float (B, 3, image_size, image_size)."""
    offset = (batch.shape[1] - image_size) // 2
    crop = batch[:, offset : offset + image_size, offset : offset + image_size, :]
    return normalize_(crop.permute(0, 3, 1, 2).float())


def random_resized_crop(
    batch: torch.Tensor, image_size: int, augmentation: Augmentation, generator: torch.Generator
) -> torch.Tensor:
    """uint8 (B, S, S, 3) -> augmented, normalised float (B, 3, image_size, image_size)."""
    n = batch.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.empty(n).uniform_(low, high, generator=generator)

    area = uniform(augmentation.crop_scale_min, 1.0)
    aspect = torch.exp(uniform(math.log(3 / 4), math.log(4 / 3)))
    width = torch.sqrt(area * aspect).clamp(max=1.0)
    height = torch.sqrt(area / aspect).clamp(max=1.0)
    center_x = uniform(-1.0, 1.0) * (1 - width)
    center_y = uniform(-1.0, 1.0) * (1 - height)
    flip = torch.where(uniform(0.0, 1.0) < 0.5, -1.0, 1.0) if augmentation.hflip else torch.ones(n)
    zero = torch.zeros(n)
    theta = torch.stack(
        [torch.stack([width * flip, zero, center_x], 1), torch.stack([zero, height, center_y], 1)], 1
    ).to(batch.device)
    images = batch.permute(0, 3, 1, 2).float()
    grid = F.affine_grid(theta, [n, 3, image_size, image_size], align_corners=False)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    if augmentation.color_jitter > 0:
        images = _color_jitter(images, augmentation.color_jitter, generator)
    return normalize_(images)


def _color_jitter(images: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Per-image brightness, contrast and saturation factors in [1 - strength, 1 + strength]."""
    n = images.shape[0]
    factors = (1 + (torch.rand(3, n, 1, 1, 1, generator=generator) * 2 - 1) * strength).to(images.device)
    luma = torch.tensor(LUMA, device=images.device).view(1, 3, 1, 1)
    images = images * factors[0]
    gray = (images * luma).sum(1, keepdim=True)
    mean_gray = gray.mean((2, 3), keepdim=True)
    images = (images - mean_gray) * factors[1] + mean_gray
    gray = (images * luma).sum(1, keepdim=True)
    images = gray + (images - gray) * factors[2]
    return images.clamp_(0.0, 255.0)


class DeviceBatches:
    """Batches of (images, labels) on `device`, from rows of a cached uint8 image array."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        rows: np.ndarray,
        *,
        batch_size: int,
        image_size: int,
        device: torch.device,
        train: bool,
        augmentation: Augmentation = Augmentation(),
        seed: int = 0,
        channels_last: bool = False,
        prefetch: int = 3,
    ) -> None:
        if len(rows) == 0:
            raise ValueError("no rows to serve")
        self.images = images
        self.labels = labels
        self.rows = np.asarray(rows, dtype=np.int64)
        self.batch_size = batch_size
        self.image_size = image_size
        self.device = device
        self.train = train
        self.augmentation = augmentation
        self.seed = seed
        self.channels_last = channels_last
        self.prefetch = prefetch
        # Training drops the last partial batch (a batch of one breaks BatchNorm), unless it is the only one.
        self.drop_last = train and len(self.rows) >= batch_size

    def __len__(self) -> int:
        if self.drop_last:
            return len(self.rows) // self.batch_size
        return math.ceil(len(self.rows) / self.batch_size)

    @property
    def num_images(self) -> int:
        return len(self) * self.batch_size if self.drop_last else len(self.rows)

    def epoch(self, epoch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield the epoch's batches; the same (seed, epoch) gives the same batches."""
        rows = self.rows
        if self.train:
            rows = np.random.default_rng([self.seed, epoch]).permutation(rows)
        batches = [rows[i * self.batch_size : (i + 1) * self.batch_size] for i in range(len(self))]
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        for host_images, host_labels in _prefetched(self._gather(batches), self.prefetch):
            images = host_images.to(self.device, non_blocking=True)
            labels = host_labels.to(self.device, non_blocking=True)
            if self.train and self.augmentation.enabled:
                images = random_resized_crop(images, self.image_size, self.augmentation, generator)
            else:
                images = center_crop(images, self.image_size)
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            yield images, labels

    def _gather(self, batches: list[np.ndarray]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        pin = self.device.type == "cuda"
        side = self.images.shape[1]
        for batch_rows in batches:
            batch_rows = np.sort(batch_rows)  # sequential reads from the memory map
            host = torch.empty((len(batch_rows), side, side, 3), dtype=torch.uint8, pin_memory=pin)
            np.take(self.images, batch_rows, axis=0, out=host.numpy())
            yield host, torch.from_numpy(self.labels[batch_rows])


def _prefetched(items: Iterator, depth: int) -> Iterator:
    """Run `items` in a background thread, `depth` ahead of the consumer."""
    if depth <= 0:
        yield from items
        return
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                buffer.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(done)
        except BaseException as err:  # surfaced in the consumer
            put(err)

    thread = threading.Thread(target=produce, daemon=True, name="batch-prefetch")
    thread.start()
    try:
        while True:
            item = buffer.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)
