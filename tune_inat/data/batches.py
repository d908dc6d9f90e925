"""Serve training and evaluation batches straight from the uint8 cache. No per-image PIL work.

Each batch's crops (random resized crop: area `crop_scale_min`..1 of the stored square, aspect
3/4..4/3, random position, horizontal flip) are drawn up front from a generator seeded by
(seed, epoch), so an epoch is the same wherever a run restarts. Then, by device:
- CUDA: a background thread gathers the rows from the memory-mapped cache into pinned uint8
  tensors (4x less traffic than floats); the GPU does crop + resize + flip for the whole batch
  in one `grid_sample`, optional colour jitter and ImageNet normalisation.
- CPU: each crop is resized in uint8 (PyTorch's vectorised bilinear kernel), flipped and
  normalised while in the CPU cache. Batches are made between training steps, in the loop's
  thread: training already uses every core, and background workers competing with it slowed it by
  ~15% (measured, 2 cores). `cpu_workers` > 1 prepares whole batches in that many threads, for a
  consumer that leaves cores free (bench_data gives ours the seeds' worker count).
Evaluation takes the centre `image_size` crop of the stored square.
"""

from __future__ import annotations

import math
import queue
import threading
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# The cache is memory-mapped read-only and crops are only read; torch warns about any read-only
# array. Silenced for this module only, with a filter (catch_warnings is not thread-safe).
warnings.filterwarnings(
    "ignore", message="The given NumPy array is not writable", category=UserWarning, module=__name__
)

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


@dataclass(frozen=True)
class Crops:
    """One batch's random resized crops, in pixels of the stored square."""

    top: np.ndarray
    left: np.ndarray
    height: np.ndarray
    width: np.ndarray
    flip: np.ndarray  # bool
    jitter: torch.Tensor | None  # (3, n) brightness/contrast/saturation factors, or None


def sample_crops(n: int, side: int, augmentation: Augmentation, generator: torch.Generator) -> Crops:
    """Draw n crops (area, aspect, position, flip, jitter) from `generator`; same draws on any device."""
    draws = torch.rand(5, n, generator=generator, dtype=torch.float64).numpy()
    area = augmentation.crop_scale_min + (1 - augmentation.crop_scale_min) * draws[0]
    aspect = np.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * draws[1])
    width = np.clip(np.rint(side * np.sqrt(area * aspect)), 1, side).astype(np.int64)
    height = np.clip(np.rint(side * np.sqrt(area / aspect)), 1, side).astype(np.int64)
    top = np.floor(draws[2] * (side - height + 1)).astype(np.int64)
    left = np.floor(draws[3] * (side - width + 1)).astype(np.int64)
    flip = (draws[4] < 0.5) if augmentation.hflip else np.zeros(n, dtype=bool)
    jitter = None
    if augmentation.color_jitter > 0:
        jitter = 1 + (torch.rand(3, n, generator=generator) * 2 - 1) * augmentation.color_jitter
    return Crops(top, left, height, width, flip, jitter)


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


def crop_resize_grid(batch: torch.Tensor, crops: Crops, image_size: int) -> torch.Tensor:
    """uint8 (B, S, S, 3) -> float (B, 3, size, size): all crops, resizes and flips in one grid_sample (GPU)."""
    side = batch.shape[1]
    width = torch.from_numpy(crops.width / side)
    height = torch.from_numpy(crops.height / side)
    center_x = torch.from_numpy((2 * crops.left + crops.width) / side - 1)
    center_y = torch.from_numpy((2 * crops.top + crops.height) / side - 1)
    sign = torch.from_numpy(np.where(crops.flip, -1.0, 1.0))
    zero = torch.zeros(len(sign), dtype=torch.float64)
    theta = torch.stack([torch.stack([width * sign, zero, center_x], 1), torch.stack([zero, height, center_y], 1)], 1)
    grid = F.affine_grid(theta.float().to(batch.device), [len(sign), 3, image_size, image_size], align_corners=False)
    return F.grid_sample(
        batch.permute(0, 3, 1, 2).float(), grid, mode="bilinear", padding_mode="border", align_corners=False
    )


def crop_resize_each(
    squares: Sequence[np.ndarray] | torch.Tensor, crops: Crops, image_size: int, normalize: bool
) -> torch.Tensor:
    """(S, S, 3) uint8 squares -> float (B, 3, size, size), each crop resized in uint8, flipped, then converted.

    Made for the CPU: PyTorch's vectorised uint8 bilinear kernel (antialiased, like PIL), and each
    image converted to float (ImageNet-normalised if `normalize`, else [0, 255]) while it is still in
    the CPU cache, single-threaded in NumPy so that batch workers never start nested thread pools.
    `squares` may be rows of the memory-mapped cache: only each crop's pixels are read.
    """
    out = torch.empty((len(crops.top), 3, image_size, image_size))
    out_array = out.numpy()
    scale, shift = _normalisation() if normalize else (np.float32(1), np.float32(0))
    for i in range(len(out)):
        top, left, height, width = int(crops.top[i]), int(crops.left[i]), int(crops.height[i]), int(crops.width[i])
        region = torch.as_tensor(squares[i][top : top + height, left : left + width])
        region = region.permute(2, 0, 1)[None]  # read in place, channels-last
        resized = F.interpolate(
            region, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True
        )
        pixels = (resized[0].flip(-1) if crops.flip[i] else resized[0]).numpy()  # flipped in uint8: 4x less to move
        np.multiply(pixels, scale, out=out_array[i], dtype=np.float32)
        np.subtract(out_array[i], shift, out=out_array[i])
    return out


def _normalisation() -> tuple[np.ndarray, np.ndarray]:
    """(scale, shift) with (pixel * scale - shift) == (pixel / 255 - mean) / std, per channel."""
    std = np.array(IMAGENET_STD, dtype=np.float32).reshape(3, 1, 1)
    mean = np.array(IMAGENET_MEAN, dtype=np.float32).reshape(3, 1, 1)
    return (1.0 / (255.0 * std)).astype(np.float32), (mean / std).astype(np.float32)


def apply_color_jitter(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """[0, 255] float images; per-image brightness, contrast, saturation factors (3, n)."""
    factors = factors.to(images.device).view(3, -1, 1, 1, 1)
    luma = torch.tensor(LUMA, device=images.device).view(1, 3, 1, 1)
    images = images * factors[0]
    gray = (images * luma).sum(1, keepdim=True)
    mean_gray = gray.mean((2, 3), keepdim=True)
    images = (images - mean_gray) * factors[1] + mean_gray
    gray = (images * luma).sum(1, keepdim=True)
    images = gray + (images - gray) * factors[2]
    return images.clamp_(0.0, 255.0)


def augment(batch: torch.Tensor | Sequence[np.ndarray], crops: Crops, image_size: int) -> torch.Tensor:
    """uint8 (B, S, S, 3) squares (a CUDA tensor, or CPU rows) -> augmented, normalised float (B, 3, size, size)."""
    if isinstance(batch, torch.Tensor) and batch.device.type == "cuda":
        images = crop_resize_grid(batch, crops, image_size)
    elif crops.jitter is None:
        return crop_resize_each(batch, crops, image_size, normalize=True)
    else:
        images = crop_resize_each(batch, crops, image_size, normalize=False)
    if crops.jitter is not None:
        images = apply_color_jitter(images, crops.jitter)
    return normalize_(images)


class BatchOrder:
    """Which rows go in which batch: shuffled by (seed, epoch) when training, each batch sorted.

    Shared by image and feature batches, so a run sees the same batches whichever it trains on.
    Training drops the last partial batch (a batch of one breaks BatchNorm), unless it is the only one.
    """

    def __init__(self, rows: np.ndarray, batch_size: int, train: bool, seed: int) -> None:
        if len(rows) == 0:
            raise ValueError("no rows to serve")
        self.rows = np.asarray(rows, dtype=np.int64)
        self.batch_size = batch_size
        self.train = train
        self.seed = seed
        self.drop_last = train and len(self.rows) >= batch_size

    def __len__(self) -> int:
        if self.drop_last:
            return len(self.rows) // self.batch_size
        return math.ceil(len(self.rows) / self.batch_size)

    @property
    def num_images(self) -> int:
        return len(self) * self.batch_size if self.drop_last else len(self.rows)

    def batches(self, epoch: int) -> list[np.ndarray]:
        """The epoch's batches of row indices, each sorted (sequential reads from the memory map)."""
        rows = np.random.default_rng([self.seed, epoch]).permutation(self.rows) if self.train else self.rows
        return [np.sort(rows[i * self.batch_size : (i + 1) * self.batch_size]) for i in range(len(self))]


class DeviceBatches(BatchOrder):
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
        cpu_workers: int = 1,
    ) -> None:
        super().__init__(rows, batch_size, train, seed)
        self.images = np.asarray(images)  # a plain view of a memory map: slicing it costs no memmap bookkeeping
        self.labels = labels
        self.image_size = image_size
        self.device = device
        self.augmentation = augmentation
        self.channels_last = channels_last
        self.prefetch = prefetch
        self.cpu_workers = cpu_workers

    @property
    def augmenting(self) -> bool:
        return self.train and self.augmentation.enabled

    def epoch(self, epoch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield the epoch's batches; the same (seed, epoch) gives the same batches."""
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        side = self.images.shape[1]
        plan = []
        for batch_rows in self.batches(epoch):
            crops = sample_crops(len(batch_rows), side, self.augmentation, generator) if self.augmenting else None
            plan.append((batch_rows, crops))
        if self.device.type == "cuda":
            batches = (
                self._finish(host.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True), crops)
                for host, labels, crops in _prefetched(map(self._gather, plan), self.prefetch)
            )
        else:
            batches = _ordered_in_threads(self._cpu_batch, plan, self.cpu_workers)
        yield from batches

    def _cpu_batch(self, item: tuple[np.ndarray, Crops | None]) -> tuple[torch.Tensor, torch.Tensor]:
        batch_rows, crops = item
        if crops is None:
            return self._finish(*self._gather(item))
        images = augment([self.images[row] for row in batch_rows], crops, self.image_size)  # crops read in place
        return self._finish_layout(images), torch.from_numpy(self.labels[batch_rows])

    def _gather(self, item: tuple[np.ndarray, Crops | None]) -> tuple[torch.Tensor, torch.Tensor, Crops | None]:
        batch_rows, crops = item
        side = self.images.shape[1]
        host = torch.empty((len(batch_rows), side, side, 3), dtype=torch.uint8, pin_memory=self.device.type == "cuda")
        np.take(self.images, batch_rows, axis=0, out=host.numpy())
        return host, torch.from_numpy(self.labels[batch_rows]), crops

    def _finish(
        self, images: torch.Tensor, labels: torch.Tensor, crops: Crops | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        images = augment(images, crops, self.image_size) if crops is not None else center_crop(images, self.image_size)
        return self._finish_layout(images), labels

    def _finish_layout(self, images: torch.Tensor) -> torch.Tensor:
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images


def _ordered_in_threads(work: Callable, items: list, workers: int) -> Iterator:
    """work(item) for each item in `workers` threads, yielded in order, at most workers + 1 ahead."""
    if workers <= 1:
        yield from map(work, items)
        return
    pending: deque[Future] = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="batches") as pool:
        try:
            for item in items:
                pending.append(pool.submit(work, item))
                if len(pending) > workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


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
