"""The CUDA path, on a real GPU: `pytest -m gpu` (or `python benchmarks/gpu_check.py`, which runs these first).

Skipped with a reason where no CUDA device is visible, and still collected there, so they keep importing.
Each test is small: the whole set takes a few minutes on one GPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO, run_cli

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="needs a CUDA GPU (none visible): run on a GPU machine "
        "with `pytest -m gpu` or `python benchmarks/gpu_check.py`",
    ),
]
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def demo_224(tmp_path_factory: pytest.TempPathFactory):
    """A small demo folder decoded for 224 px (stored at 256)."""
    from tune_inat.data.dataset import DataConfig, prepare_train_val
    from tune_inat.data.demo import make_demo

    root = make_demo(tmp_path_factory.mktemp("demo224") / "demo", train_per_class=12, test_per_class=2)
    return prepare_train_val(DataConfig(root, tmp_path_factory.mktemp("cache"), progress=False), 224)


# -- batches -------------------------------------------------------------------------------------


def test_cuda_batches_make_the_cpu_crops_from_pinned_memory_and_stop_cleanly() -> None:
    from tune_inat.data.batches import Augmentation, DeviceBatches

    rng = np.random.default_rng(0)
    # smooth images, as photos are (on pixel noise the GPU's grid_sample and the antialiased CPU resize differ by
    # design: mean 0.096 on an H200)
    coarse = torch.from_numpy(rng.integers(0, 256, (96, 3, 8, 8)).astype(np.float32))
    smooth = torch.nn.functional.interpolate(coarse, size=(64, 64), mode="bilinear", align_corners=False)
    images = smooth.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
    labels = rng.integers(0, 10, 96).astype(np.int64)
    common = dict(batch_size=16, image_size=48, train=True, seed=3, augmentation=Augmentation(True, 0.3, True, 0.0))
    on_gpu = DeviceBatches(images, labels, np.arange(96), device=CUDA, **common)
    on_cpu = DeviceBatches(images, labels, np.arange(96), device=torch.device("cpu"), **common)
    for (gpu_images, gpu_labels), (cpu_images, cpu_labels) in zip(on_gpu.epoch(1), on_cpu.epoch(1), strict=True):
        assert gpu_images.device.type == "cuda" and torch.equal(gpu_labels.cpu(), cpu_labels)
        # the same draws: the crops differ only by resampling (one grid_sample on the GPU, antialiased on the CPU)
        difference = (gpu_images.float().cpu() - cpu_images).abs()
        assert difference.mean() < 0.08 and difference.median() < 0.05, difference.mean()
    host, _, _ = on_gpu._gather((np.arange(16), None))
    assert host.is_pinned()  # uint8 batches cross from pinned memory, without blocking
    epoch = on_gpu.epoch(2)
    next(epoch), next(epoch)
    epoch.close()  # the consumer stops early: the background gather thread must end
    time.sleep(0.5)
    assert not [t for t in threading.enumerate() if t.name == "batch-prefetch" and t.is_alive()]


# -- the training loop --------------------------------------------------------------------------------


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_resnet50_trains_in_half_precision_channels_last(demo_224, half: torch.dtype) -> None:
    import itertools

    from tune_inat.engine import FineTuning, MixedPrecision, train_one_epoch
    from tune_inat.settings import TrainConfig

    if half == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    run = FineTuning(
        TrainConfig(
            backbone="resnet50",
            weights="none",
            image_size=224,
            freeze_fraction=0.0,
            lr=3e-3,
            batch_size=16,
            augment=False,
            frozen_features=False,
        ),
        demo_224,
        CUDA,
    )
    run.precision = MixedPrecision(CUDA, half)
    assert (run.precision.scaler is not None) == (half == torch.float16)  # fp16 scales its gradients
    assert run.model.net.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    images, labels = next(iter(run.train_batches.epoch(0)))
    assert images.is_contiguous(memory_format=torch.channels_last)
    losses = [
        train_one_epoch(
            run.forward_model,
            itertools.repeat((images, labels), 4),
            run.optimizer,
            run.scheduler,
            run.criterion,
            run.precision,
        )["train_loss"]
        for _ in range(5)
    ]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses


# -- the memory cap and the out-of-memory retry --------------------------------------------------------

CAP_PROBE = textwrap.dedent("""
    import torch
    torch.cuda.set_per_process_memory_fraction(0.25, 0)
    total = torch.cuda.get_device_properties(0).total_memory
    small = torch.empty(int(0.10 * total), dtype=torch.uint8, device="cuda")
    try:
        torch.empty(int(0.20 * total), dtype=torch.uint8, device="cuda")
        print("over the cap: allocated")
    except torch.OutOfMemoryError:
        print("over the cap: refused")
""")


def test_a_quarter_share_cannot_allocate_past_its_share() -> None:
    probe = subprocess.run([sys.executable, "-c", CAP_PROBE], capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr[-2000:]
    assert "over the cap: refused" in probe.stdout  # 0.10 + 0.20 of the GPU is past a 0.25 share


PEAK_PROBE = textwrap.dedent("""
    import json, sys, torch
    from tune_inat.data.dataset import DataConfig, prepare_train_val
    from tune_inat.engine import FineTuning
    from tune_inat.settings import TrainConfig
    root, cache, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
    data = prepare_train_val(DataConfig(root, cache, progress=False), 224)
    settings = TrainConfig(backbone="resnet50", weights="none", image_size=224, freeze_fraction=0.0,
                           batch_size=batch, epochs=1, augment=False, frozen_features=False)
    run = FineTuning(settings, data, torch.device("cuda"))
    run.run_epoch()
    total = torch.cuda.get_device_properties(0).total_memory
    print(json.dumps({"peak": torch.cuda.max_memory_allocated(), "total": total}))
""")


@pytest.mark.slow
def test_a_real_out_of_memory_is_retried_with_half_the_micro_batch(tmp_path: Path) -> None:
    """The share is set between what batch B and batch B/2 need: B runs out of memory for real, B/2 fits."""
    from tune_inat.data.demo import make_demo

    root = make_demo(tmp_path / "demo", train_per_class=52, test_per_class=2)  # 416 train images: one batch of 256+
    peaks = {}
    for batch in (256, 128):
        probe = subprocess.run(
            [sys.executable, "-c", PEAK_PROBE, str(root), str(tmp_path / "cache"), str(batch)],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=REPO,
        )
        assert probe.returncode == 0, probe.stderr[-2000:]
        peaks[batch] = json.loads(probe.stdout.strip().splitlines()[-1])
    total = peaks[256]["total"]
    share = round((peaks[256]["peak"] + peaks[128]["peak"]) / 2 / total, 3)
    assert peaks[128]["peak"] < share * total < peaks[256]["peak"]
    result = run_cli(
        "tune_inat.search",
        "--data",
        str(root),
        "--space",
        "demo",
        "--num-samples",
        "1",
        "--max-epochs",
        "1",
        "--set",
        "backbone=resnet50",
        "--set",
        "image_size=224",
        "--set",
        "batch_size=256",
        "--set",
        "freeze_fraction=0",
        "--set",
        "augment=false",
        "--gpus-per-trial",
        str(share),
        "--cpus-per-trial",
        "2",
        "--results",
        str(tmp_path / "results"),
        "--name",
        "oom",
        "--no-wandb",
        "--quiet",
        env={"TUNE_INAT_CACHE": str(tmp_path / "cache")},
        timeout=900,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ran out of GPU memory" in result.stderr
    epochs = pd.read_parquet(tmp_path / "results" / "oom" / "epochs.parquet")
    trials = pd.read_parquet(tmp_path / "results" / "oom" / "trials.parquet")
    assert epochs["micro_batch_size"].tolist() == [128] and epochs["batch_size"].tolist() == [256]
    assert (trials["status"] == "completed").all()


# -- four trials on one GPU --------------------------------------------------------------------------------


@pytest.mark.slow
def test_four_trials_share_one_gpu_at_once(tmp_path: Path) -> None:
    result = run_cli(
        "tune_inat.search",
        "--demo",
        "--num-samples",
        "4",
        "--max-epochs",
        "3",
        "--scheduler",
        "fifo",
        "--no-reproducible",
        "--set",
        "backbone=resnet18",
        "--set",
        "image_size=64",
        "--gpus-per-trial",
        "0.25",
        "--cpus-per-trial",
        "1",
        "--max-concurrent-trials",
        "4",
        "--results",
        str(tmp_path / "results"),
        "--name",
        "packed",
        "--no-wandb",
        "--quiet",
        env={"TUNE_INAT_CACHE": str(tmp_path / "cache")},
        timeout=900,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    epochs = pd.read_parquet(tmp_path / "results" / "packed" / "epochs.parquet")
    trials = pd.read_parquet(tmp_path / "results" / "packed" / "trials.parquet")
    assert len(trials) == 4 and (epochs["gpu_share"] == 0.25).all()
    assert epochs["peak_gpu_memory_mb"].notna().all() and (epochs["peak_gpu_memory_mb"] > 0).all()
    assert trials["started_at"].max() < trials["ended_at"].min()  # all four ran at one moment, on one GPU


def compute_processes() -> dict[int, float]:
    """pid -> MiB of every process holding memory on GPU 0, from NVML (what nvidia-smi lists)."""
    import pynvml

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    return {p.pid: (p.usedGpuMemory or 0) / 2**20 for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)}


@pytest.mark.slow
def test_a_stopped_or_failed_trial_gives_its_gpu_memory_back_within_2_s(tmp_path: Path) -> None:
    """ASHA stops trials mid-search and one trial fails: each one's process leaves the GPU (NVML) within 2 s of
    its end, and the trial placed after it gets its full share (its peak is not capped below it)."""
    seen: dict[int, float] = {}  # pid -> when NVML last listed it
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            now = time.time()
            for pid in compute_processes():
                seen[pid] = now
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        result = run_cli(
            "tune_inat.search", "--demo", "--num-samples", "8", "--max-epochs", "4", "--scheduler", "asha",
            "--grace-period", "1", "--reduction-factor", "2", "--no-reproducible", "--set", "backbone=resnet18",
            "--set", "image_size=64", "--gpus-per-trial", "0.5", "--cpus-per-trial", "1", "--max-concurrent-trials",
            "2", "--results", str(tmp_path / "results"), "--name", "release", "--no-wandb", "--quiet",
            env={"TUNE_INAT_CACHE": str(tmp_path / "cache"), "TUNE_INAT_FAULTS": "3:2:error:always"},
            timeout=900, cwd=tmp_path,
        )  # fmt: skip
    finally:
        done.set()
        watcher.join()
    trials = pd.read_parquet(tmp_path / "results" / "release" / "trials.parquet")
    ended = trials[trials["status"].isin(["stopped_early", "error"])]
    assert len(ended) >= 2 and result.returncode == 0, result.stderr[-3000:]
    for _, trial in ended.iterrows():
        last_seen = seen.get(int(trial["worker_pid"]))
        assert last_seen is not None, f"trial {trial['trial_id']} never seen on the GPU"
        assert last_seen - trial["ended_at"].timestamp() < 2.0, (trial["trial_id"], last_seen)
    epochs = pd.read_parquet(tmp_path / "results" / "release" / "epochs.parquet")
    later = trials.sort_values("started_at").iloc[2:]  # placed after others ended
    assert (epochs[epochs["trial_id"].isin(later["trial_id"])]["micro_batch_size"] == epochs["batch_size"]).all()


@pytest.mark.slow
def test_auto_packing_reserves_each_trial_its_measured_share(tmp_path: Path) -> None:
    from tune_inat.packing import MemoryShares, read_probes

    cache = tmp_path / "cache"
    result = run_cli(
        "tune_inat.search", "--demo", "--num-samples", "4", "--max-epochs", "2", "--scheduler", "fifo",
        "--no-reproducible", "--set", "image_size=64", "--gpus-per-trial", "auto", "--cpus-per-trial", "1",
        "--results", str(tmp_path / "results"), "--name", "auto", "--no-wandb", "--quiet",
        env={"TUNE_INAT_CACHE": str(cache)}, timeout=900, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (table,) = list((cache / "memory").glob("*.json"))
    probes = read_probes(table)
    assert all(p.measured for p in probes.values())
    shares = MemoryShares(probes, torch.cuda.get_device_properties(0).total_memory / 2**20, 1.0)
    epochs = pd.read_parquet(tmp_path / "results" / "auto" / "epochs.parquet")
    for _, row in epochs.iterrows():
        assert row["gpu_share"] == shares.share(row.to_dict())
        assert row["peak_gpu_memory_mb"] <= row["gpu_share"] * shares.gpu_total_mib  # it held in its share
    assert (tmp_path / "results" / "auto" / "gpus.parquet").exists()  # what the GPUs did, sampled


# -- frozen features on the GPU, torch.compile ---------------------------------------------------------------


def test_frozen_features_in_float16_match_the_uncached_logits(demo_224) -> None:
    from tune_inat.engine import FineTuning
    from tune_inat.settings import TrainConfig

    settings = dict(
        backbone="resnet50", weights="none", image_size=224, freeze_fraction=0.8, augment=False, batch_size=16
    )
    cached = FineTuning(TrainConfig(**settings), demo_224, CUDA)
    assert cached.uses_cached_features
    prefix, suffix = cached.model.split_frozen_prefix()
    cached.model.eval()
    direct_run = FineTuning(TrainConfig(**settings, frozen_features=False), demo_224, CUDA)
    images, labels = next(iter(direct_run.val_batches.epoch(0)))
    features, feature_labels = next(iter(cached.val_batches.epoch(0)))
    assert torch.equal(labels, feature_labels)
    with torch.inference_mode(), torch.autocast("cuda", dtype=cached.precision.dtype):
        direct = cached.model(images).float()
        through_cache = suffix(features).float()
    # half precision through two graph splits: logits of about +-25 differ by up to about 0.1 (seen on an H200)
    assert (direct - through_cache).abs().max() <= 0.02 * direct.abs().max()
    assert (direct.argmax(1) == through_cache.argmax(1)).float().mean() > 0.95


def test_compile_trains_a_step(demo_224) -> None:
    from tune_inat.engine import FineTuning
    from tune_inat.settings import TrainConfig

    run = FineTuning(
        TrainConfig(
            backbone="resnet18",
            weights="none",
            image_size=224,
            freeze_fraction=0.5,
            epochs=1,
            batch_size=32,
            compile=True,
        ),
        demo_224,
        CUDA,
    )
    metrics = run.run_epoch()
    assert np.isfinite(metrics["train_loss"]) and metrics["images_per_second"] > 0
