"""Training images per second per backbone and freeze fraction: our loop against a plain fp32 loop.

Ours: `tune_inat.engine.FineTuning` (bf16 autocast, channels-last, cuDNN autotuning, frozen BatchNorm,
no per-batch host sync on CUDA; fp32 on the CPU). Plain: the seeds' loop on the same model, batch and
data: fp32, every parameter's optimiser state, `loss.item()` each batch. Also the frozen-prefix
feature cache: epoch time of a head-only (f = 1) run with augmentation off, cached against
recomputed; and `torch.compile` (--compile) on one configuration.

    python benchmarks/bench_train.py                       # CPU: 64 px, batch 16, a few steps
    python benchmarks/bench_train.py --device cuda --image-size 224 --batch 128 --steps 60 --compile
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

from tune_inat.data.dataset import DataConfig, TrainValData, prepare_train_val  # noqa: E402
from tune_inat.data.demo import make_demo  # noqa: E402
from tune_inat.engine import FineTuning, TrainConfig, train_one_epoch  # noqa: E402
from tune_inat.models import build_model, is_weights_cached  # noqa: E402

BACKBONES = ("resnet50", "efficientnet_v2_s", "convnext_tiny", "vit_b_16")
FREEZE = (0.0, 0.8, 1.0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def ours(settings: TrainConfig, data: TrainValData, device: torch.device, steps: int) -> float:
    """Training images per second of FineTuning's own epoch loop over `steps` batches, after a warm-up."""
    run = FineTuning(settings, data, device)
    batches = _repeat(run.train_batches)

    def train(count: int) -> float:
        metrics = train_one_epoch(
            run.forward_model,
            itertools.islice(batches, count),
            run.optimizer,
            run.scheduler,
            run.criterion,
            run.precision,
        )
        return metrics["train_images"]

    train(max(2, steps // 5))  # warm-up: cuDNN autotuning, allocator, page cache
    _sync(device)
    start = time.perf_counter()
    seen = train(steps)  # reads its device-side sums once, at the end, as every epoch does
    return seen / (time.perf_counter() - start)


def _repeat(batches):
    epoch = 0
    while True:
        yield from batches.epoch(epoch)
        epoch += 1


def plain(settings: TrainConfig, data: TrainValData, device: torch.device, steps: int) -> float:
    """The seeds' loop: fp32, model.train() everywhere, Adam, loss.item() every batch, same batches."""
    torch.manual_seed(0)
    model = build_model(
        settings.backbone, len(data.classes), settings.weights, settings.image_size, settings.freeze_fraction
    )
    net = model.net.to(device)
    net.train()
    optimizer = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=settings.lr)
    criterion = nn.CrossEntropyLoss()
    run_batches = FineTuning(
        TrainConfig(**{**settings.to_dict(), "frozen_features": False}), data, device
    ).train_batches
    iterator = _repeat(run_batches)
    seen, warm = 0, max(2, steps // 5)
    for index in range(warm + steps):
        if index == warm:
            _sync(device)
            start = time.perf_counter()
        images, labels = next(iterator)
        images = images.contiguous()  # the seeds' NCHW float batches
        outputs = net(images)
        logits = outputs[0] if isinstance(outputs, tuple) else outputs
        loss = criterion(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss.item()  # the per-batch host sync the seeds' progress logging does
        if index >= warm:
            seen += len(labels)
    _sync(device)
    return seen / (time.perf_counter() - start)


def epoch_seconds(settings: TrainConfig, data: TrainValData, device: torch.device) -> tuple[float, float]:
    """(seconds of one training epoch, seconds to build the run incl. any feature cache)."""
    start = time.perf_counter()
    run = FineTuning(settings, data, device)
    built = time.perf_counter() - start
    run.run_epoch()  # warm
    metrics = run.run_epoch()
    return metrics["epoch_seconds"], built


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--images", type=int, default=60, help="demo images per class")
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES))
    parser.add_argument("--freeze", type=float, nargs="+", default=list(FREEZE), help="freeze fractions to measure")
    parser.add_argument(
        "--compile", action="store_true", help="also measure torch.compile on the first backbone, f = 0"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    root = make_demo(work / "data", train_per_class=args.images, test_per_class=2)
    data = prepare_train_val(DataConfig(root, work / "cache", progress=False), args.image_size)
    rows = []
    for backbone in args.backbones:
        weights = "imagenet" if is_weights_cached(backbone) else "none"
        for freeze in args.freeze:
            settings = TrainConfig(
                backbone=backbone,
                weights=weights,
                image_size=args.image_size,
                freeze_fraction=freeze,
                batch_size=args.batch,
                lr=1e-4,
            )
            ours_rate = ours(settings, data, device, args.steps)
            plain_rate = plain(settings, data, device, args.steps)
            rows.append(
                {
                    "backbone": backbone,
                    "freeze": freeze,
                    "ours_img_s": ours_rate,
                    "plain_fp32_img_s": plain_rate,
                    "speedup": ours_rate / plain_rate,
                }
            )
            print(rows[-1], flush=True)
    head_only = TrainConfig(
        backbone="resnet50",
        weights="imagenet" if is_weights_cached("resnet50") else "none",
        image_size=args.image_size,
        freeze_fraction=1.0,
        augment=False,
        batch_size=args.batch,
        lr=1e-3,
    )
    recomputed, _ = epoch_seconds(TrainConfig(**{**head_only.to_dict(), "frozen_features": False}), data, device)
    cached, built = epoch_seconds(head_only, data, device)
    rows.append(
        {
            "backbone": "resnet50 head only (f=1, no augmentation)",
            "freeze": 1.0,
            "ours_img_s": f"epoch {cached:.3f} s with cached features",
            "plain_fp32_img_s": f"epoch {recomputed:.3f} s recomputing",
            "speedup": recomputed / cached,
        }
    )
    if args.compile:
        settings = TrainConfig(
            backbone=args.backbones[0],
            weights="none",
            image_size=args.image_size,
            freeze_fraction=0.0,
            batch_size=args.batch,
            lr=1e-4,
        )
        eager = ours(settings, data, device, args.steps)
        compiled = ours(TrainConfig(**{**settings.to_dict(), "compile": True}), data, device, args.steps)
        rows.append(
            {
                "backbone": f"{args.backbones[0]} torch.compile",
                "freeze": 0.0,
                "ours_img_s": compiled,
                "plain_fp32_img_s": f"eager {eager:.1f}",
                "speedup": compiled / eager,
            }
        )
    notes = (
        f"{device}, {args.image_size} px, batch {args.batch}, {args.steps} timed steps after warm-up; "
        f"weights: ImageNet where cached, else random init (same speed). The head-only row: one training epoch "
        f"over {len(data.train_rows)} images; the cached run first computed the features once ({built:.2f} s, "
        f"shared by every trial with this prefix)."
    )
    write_results("bench_train", rows, notes)


if __name__ == "__main__":
    main()
