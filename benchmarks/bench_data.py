"""Images per second delivered to the training loop: our decode-once cache against the seeds' pipeline.

The seeds' way: torchvision ImageFolder + PIL RandomResizedCrop(224) + flip + ToTensor + Normalize,
through a DataLoader with N workers, decoding every JPEG every epoch. Ours: every image decoded once
into the uint8 cache (timed separately), then batches gathered from the memory map and augmented
on the training device (here the CPU, or CUDA with --device cuda). Both deliver normalised float
batches of 224 px; the same folder of iNat-like 800x600 JPEGs.

    python benchmarks/bench_data.py [--images 3000] [--workers 2] [--epochs 5] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import inat_like_folder, write_results  # noqa: E402

from tune_inat.data.batches import IMAGENET_MEAN, IMAGENET_STD, Augmentation, DeviceBatches  # noqa: E402
from tune_inat.data.dataset import DataConfig, prepare_train_val  # noqa: E402
from tune_inat.host_memory import reuse_freed_memory  # noqa: E402


def seeds_loader(root: Path, batch: int, workers: int, device: torch.device) -> Callable[[int], Iterator]:
    """The seeds' pipeline: each epoch a new pass of the DataLoader (its workers start anew, as theirs do)."""
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    transform = transforms.Compose(
        [
            transforms.RandomResizedCrop(224),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    loader = DataLoader(
        datasets.ImageFolder(root / "train", transform),
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        drop_last=True,
    )
    return lambda epoch: ((images.to(device, non_blocking=True), labels) for images, labels in loader)


def our_loader(
    root: Path, cache_dir: Path, batch: int, workers: int, device: torch.device
) -> tuple[float, Callable[[int], Iterator]]:
    """(seconds to build the cache, our batches of an epoch), warmed by one epoch as every later epoch is."""
    start = time.perf_counter()
    data = prepare_train_val(DataConfig(root, cache_dir, val_fraction=0.01, progress=False), 224)
    build = time.perf_counter() - start
    batches = DeviceBatches(
        data.cache.open_images(),
        data.labels,
        data.train_rows,
        batch_size=batch,
        image_size=224,
        device=device,
        train=True,
        augmentation=Augmentation(),
        channels_last=device.type == "cuda",
        cpu_workers=workers,
    )
    _epoch_rate(batches.epoch(0), device)  # the page cache and the kernels
    return build, batches.epoch


def _epoch_rate(batches: Iterator[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> float:
    start, seen = time.perf_counter(), 0
    for images, _ in batches:
        seen += len(images)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument(
        "--epochs", type=int, default=5, help="timed epochs of each pipeline, interleaved; the median is reported"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()) / "tune-inat-bench-jpegs")
    args = parser.parse_args()
    device = torch.device(args.device)
    reuse_freed_memory()  # as FineTuning does for CPU training; the seeds' workers inherit it (fork)
    root = inat_like_folder(args.folder, args.images)
    seeds, ours = [], []
    with tempfile.TemporaryDirectory() as cache:
        build, our_epoch = our_loader(root, Path(cache), args.batch, args.workers, device)
        seeds_epoch = seeds_loader(root, args.batch, args.workers, device)
        for epoch in range(1, 1 + args.epochs):  # interleaved, so a busy moment of the machine hits both
            seeds.append(_epoch_rate(seeds_epoch(epoch), device))
            ours.append(_epoch_rate(our_epoch(epoch), device))
    seeds_rate, ours_rate = statistics.median(seeds), statistics.median(ours)
    rows = [
        {
            "pipeline": f"seeds: ImageFolder + PIL transforms, DataLoader({args.workers} workers)",
            "images_per_second": seeds_rate,
            "epochs_min_max": f"{min(seeds):.0f}-{max(seeds):.0f}",
            "speedup": 1.0,
        },
        {
            "pipeline": f"ours: uint8 cache + batch augmentation on {device.type}, {args.workers} threads",
            "images_per_second": ours_rate,
            "epochs_min_max": f"{min(ours):.0f}-{max(ours):.0f}",
            "speedup": ours_rate / seeds_rate,
        },
        {
            "pipeline": "ours, one-off: decoding the cache",
            "images_per_second": args.images / build,
            "epochs_min_max": "",
            "speedup": float("nan"),
        },
    ]
    notes = (
        f"{args.images} JPEGs of 800x600, batch {args.batch}, 224 px random resized crops + flips, {device}; "
        f"median of {args.epochs} epochs each, the two pipelines' epochs interleaved (ours after a warm-up epoch). "
        f"The cache is built once per dataset and "
        f"resolution ({build:.1f} s here) and reused by every later epoch, trial and search; the seeds' pipeline "
        f"decodes every image every epoch. Both use {args.workers} workers (ours: threads making whole batches; the "
        f"seeds': DataLoader processes) in the same process setting (glibc keeps freed memory for reuse: "
        f"tune_inat.host_memory, as CPU training does)."
    )
    write_results("bench_data", rows, notes)


if __name__ == "__main__":
    main()
