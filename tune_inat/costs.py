"""What a model costs where it will run: parameters, compute, file size and inference latency.

Measured once per (backbone, image size, classes, head, machine) and shared through a small cache
(`<cache_dir>/costs/*.json`, written under a file lock), not once per trial: every trial of a search
with that backbone and size reads the first one's numbers. Compute is counted by PyTorch's own FLOP
counter, which counts 2 FLOPs per multiply-add (torchvision's published GFLOPS count multiply-adds,
half as many). Latency is the median of repeated timed forward passes after a warm-up, at batch 1
and batch 64, on the CPU of the machine that measured it (with the threads it was given) and on
the trial's GPU where it has one (in bf16 and channels-last, as the training loop runs it).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from filelock import FileLock
from torch.utils.flop_counter import FlopCounterMode

from tune_inat.backbones import get_backbone
from tune_inat.models import HeadSpec, build_model

TIMED_SECONDS = 0.3  # per latency: repeated runs until this long (at least MIN_RUNS): the median settles fast
MIN_RUNS = 5


@dataclass(frozen=True)
class ModelCost:
    total_parameters: int  # all of them: what the exported model holds
    forward_gflop: float  # one forward pass of one image, billions of FLOPs (2 per multiply-add)
    model_mb: float  # the model's weights as saved, MB
    cpu_latency_ms_b1: float
    cpu_latency_ms_b64: float  # per batch of 64
    latency_cpu: str  # the CPU model and the threads used
    gpu_latency_ms_b1: float | None = None
    gpu_latency_ms_b64: float | None = None
    latency_gpu: str | None = None  # the GPU model

    def as_report(self) -> dict:
        return asdict(self)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _median_ms(run: Callable[[], object], synchronize: Callable[[], object]) -> float:
    for _ in range(2):  # warm-up: allocator, kernels, autotuning
        run()
    synchronize()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < MIN_RUNS or (time.perf_counter() - start < TIMED_SECONDS and len(times) < 50):
        began = time.perf_counter()
        run()
        synchronize()
        times.append(1000 * (time.perf_counter() - began))
    return statistics.median(times)


@torch.inference_mode()
def latency_ms(model: torch.nn.Module, image_size: int, batch: int, device: torch.device) -> float:
    """Median milliseconds of one forward pass of `batch` images on `device`."""
    images = torch.randn(batch, 3, image_size, image_size, device=device)
    if device.type == "cuda" and get_backbone(model.backbone).channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
        model = model.to(memory_format=torch.channels_last)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return _median_ms(lambda: _autocast_forward(model, images, dtype), synchronize)
    return _median_ms(lambda: model(images), synchronize)


def _autocast_forward(model: torch.nn.Module, images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    with torch.autocast("cuda", dtype=dtype):
        return model(images)


@torch.inference_mode()
def forward_gflop(model: torch.nn.Module, image_size: int) -> float:
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, image_size, image_size))
    return counter.get_total_flops() / 1e9


def measure(
    backbone: str, image_size: int, num_classes: int, gpu: torch.device | None, head_hidden: int = 0
) -> ModelCost:
    head = HeadSpec(hidden=head_hidden)  # dropout costs nothing at inference; a hidden layer does
    model = build_model(backbone, num_classes, "none", image_size, auxiliary_heads=False, head=head).eval()
    weights = io.BytesIO()
    torch.save(model.state_dict(), weights)
    gflop = forward_gflop(model, image_size)
    cpu = torch.device("cpu")
    cost = dict(
        total_parameters=model.num_parameters(),
        forward_gflop=gflop,
        model_mb=weights.tell() / 2**20,
        cpu_latency_ms_b1=latency_ms(model, image_size, 1, cpu),
        cpu_latency_ms_b64=latency_ms(model, image_size, 64, cpu),
        latency_cpu=f"{cpu_name()}, {torch.get_num_threads()} threads",
    )
    if gpu is not None and gpu.type == "cuda":
        model = model.to(gpu)
        cost.update(
            gpu_latency_ms_b1=latency_ms(model, image_size, 1, gpu),
            gpu_latency_ms_b64=latency_ms(model, image_size, 64, gpu),
            latency_gpu=torch.cuda.get_device_name(gpu),
        )
    return ModelCost(**cost)


def cost_of(
    backbone: str,
    image_size: int,
    num_classes: int,
    gpu: torch.device | None,
    cache_dir: Path,
    head_hidden: int = 0,
) -> ModelCost:
    """The cost of this model on this machine: from the shared cache, or measured once and cached."""
    machine = f"{cpu_name()}|{torch.get_num_threads()}|{torch.cuda.get_device_name(gpu) if gpu is not None else ''}"
    digest = hashlib.sha256(f"{machine}|{torch.__version__}".encode()).hexdigest()[:12]
    head = f"-{head_hidden}hidden" if head_hidden else ""
    path = Path(cache_dir) / "costs" / f"{backbone}-{image_size}px-{num_classes}cls{head}-{digest}.json"
    found = _read(path)
    if found is not None:
        return found
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path.with_suffix(".lock"))):
        found = _read(path)  # measured by another trial while this one waited
        if found is not None:
            return found
        with torch.random.fork_rng(devices=[gpu] if gpu is not None else []):  # the trial's own draws stay its own
            cost = measure(backbone, image_size, num_classes, gpu, head_hidden)
        partial = path.with_name(f".{path.name}.{os.getpid()}")
        partial.write_text(json.dumps(cost.as_report()))
        os.replace(partial, path)
        return cost


def _read(path: Path) -> ModelCost | None:
    try:
        return ModelCost(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):  # missing, or damaged: measured again
        return None
