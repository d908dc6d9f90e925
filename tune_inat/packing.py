"""`--gpus-per-trial auto`: each trial reserves the GPU share its training memory needs, so packing never runs out.

Ray users hand-tune one fraction for every trial and either waste the GPU (small trials at 0.5) or
run out of memory (large ones at 0.25). Here a trial's peak training memory is a line in its
micro-batch: `static_mib` (weights, gradients, AdamW's two moments, the CUDA context, cuDNN's
workspace) plus `per_image_mib` times the micro-batch (the activations kept for the backward pass),
measured once per (backbone, image size) at freeze 0, the most any freeze point needs, with two
micro-batches on the GPU itself (`measure_on_gpu`, cached under the cache dir per GPU model), then a
safety margin, rounded up to eighths of a GPU. `estimate_on_cpu` is the same line computed without
a GPU (saved activations counted with torch's saved-tensor hooks, bf16 halving them, plus the
parameters' state and a fixed CUDA context): marked not measured, it is what the planner is tested
on here and what a GPU run replaces.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

GPUS_AUTO = "auto"
SHARE_STEP = 1 / 8  # shares are whole eighths of a GPU: at most 8 trials to one GPU
MARGIN = 0.15  # on top of the measured peak: allocator fragmentation, a cuDNN algorithm that needs more
CUDA_CONTEXT_MIB = 600.0  # what a process's CUDA context and cuBLAS/cuDNN handles take before any tensor
PROBE_BATCHES = (8, 32)  # two micro-batches: the line through them


@dataclass(frozen=True)
class MemoryProbe:
    """Peak training memory of one backbone at one image size: static + per_image x micro-batch (MiB)."""

    backbone: str
    image_size: int
    static_mib: float
    per_image_mib: float
    measured: bool  # True: on a GPU (torch.cuda.max_memory_allocated); False: estimated on the CPU
    device: str  # the GPU model it was measured on, or how it was estimated

    def peak_mib(self, micro_batch: int) -> float:
        return self.static_mib + self.per_image_mib * micro_batch


def micro_batch_of(config: dict[str, Any]) -> int:
    """Images per forward pass: the effective batch over its accumulation steps."""
    return int(config["batch_size"]) // max(1, int(config.get("grad_accum_steps", 1) or 1))


def gpu_share(peak_mib: float, gpu_total_mib: float, margin: float = MARGIN) -> float:
    """The GPU share that holds `peak_mib` with the margin, in eighths; 1 (a whole GPU) at most."""
    need = peak_mib * (1 + margin) / gpu_total_mib
    return min(1.0, max(SHARE_STEP, math.ceil(need / SHARE_STEP - 1e-9) * SHARE_STEP))


@dataclass(frozen=True)
class MemoryShares:
    """Ray's per-trial resources as a function of the trial's config (`tune.with_resources` takes one)."""

    probes: dict[str, MemoryProbe]  # by probe_key
    gpu_total_mib: float
    cpus: float
    margin: float = MARGIN

    def share(self, config: dict[str, Any]) -> float:
        from tune_inat.backbones import get_backbone

        size = config.get("image_size") or get_backbone(config["backbone"]).native_size
        probe = self.probes[probe_key(config["backbone"], int(size))]
        return gpu_share(probe.peak_mib(micro_batch_of(config)), self.gpu_total_mib, self.margin)

    def __call__(self, config: dict[str, Any]) -> dict[str, float]:
        return {"CPU": self.cpus, "GPU": self.share(config)}


def probe_key(backbone: str, image_size: int) -> str:
    return f"{backbone}@{image_size}"


def _training_step(model: Any, images: Any, labels: Any, optimizer: Any) -> None:
    import torch

    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=images.device.type == "cuda"):
        loss = torch.nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _model(backbone: str, image_size: int, num_classes: int) -> Any:
    from tune_inat.models import build_model

    model = build_model(backbone, num_classes, weights="none", image_size=image_size, freeze_fraction=0.0)
    model.train()
    return model


def measure_on_gpu(backbone: str, image_size: int, num_classes: int = 10, device: str = "cuda") -> MemoryProbe:
    """The line through the peak memory of two real training steps (bf16 autocast, AdamW, freeze 0)."""
    import torch

    model = _model(backbone, image_size, num_classes).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(p for p in model.parameters() if p.requires_grad)
    peaks = []
    for batch in PROBE_BATCHES:
        images = torch.randn(batch, 3, image_size, image_size, device=device).contiguous(
            memory_format=torch.channels_last
        )
        labels = torch.randint(0, num_classes, (batch,), device=device)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        _training_step(model, images, labels, optimizer)
        torch.cuda.synchronize(device)
        peaks.append(torch.cuda.max_memory_allocated(device) / 2**20)
        del images, labels
    per_image = max(0.0, (peaks[1] - peaks[0]) / (PROBE_BATCHES[1] - PROBE_BATCHES[0]))
    static = peaks[0] - per_image * PROBE_BATCHES[0] + CUDA_CONTEXT_MIB
    del model, optimizer
    torch.cuda.empty_cache()
    return MemoryProbe(backbone, image_size, static, per_image, True, torch.cuda.get_device_name(device))


def estimate_on_cpu(backbone: str, image_size: int, num_classes: int = 10) -> MemoryProbe:
    """The same line without a GPU: the activations a backward pass keeps, counted on the CPU, at bf16's 2 bytes
    (fp32 saved here, halved), plus weights, gradients and AdamW's moments (4 x fp32) and the CUDA context."""
    import torch

    model = _model(backbone, image_size, num_classes)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    saved_bytes = []
    # small batches (BatchNorm needs two): the saved tensors stay alive (no address counted twice) and small
    for batch in (2, 4):
        seen: set[int] = set()

        def count(tensor: torch.Tensor, seen: set[int] = seen) -> torch.Tensor:
            storage = tensor.untyped_storage()
            if not isinstance(tensor, torch.nn.Parameter) and storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                saved_bytes[-1] += storage.nbytes() / 2  # bf16 autocast keeps most activations in 2 bytes, not 4
            return tensor

        saved_bytes.append(0.0)
        with torch.autograd.graph.saved_tensors_hooks(count, lambda packed: packed):
            output = model(torch.randn(batch, 3, image_size, image_size))
        del output  # the graph and its saved tensors go with it
    per_image = max(0.0, saved_bytes[1] - saved_bytes[0]) / 2 / 2**20
    static = (16 * trainable + 4 * frozen) / 2**20 + CUDA_CONTEXT_MIB
    return MemoryProbe(backbone, image_size, static, per_image, False, "estimated on the CPU (saved-tensor hooks)")


def probes_for(pairs: list[tuple[str, int]], cache_dir: Path, device: str = "cuda") -> dict[str, MemoryProbe]:
    """Measured probes of every (backbone, image size), from the cache or measured once on this GPU and cached."""
    import torch

    gpu = torch.cuda.get_device_name(device)
    path = Path(cache_dir) / "memory" / f"{gpu.replace(' ', '_').replace('/', '_')}.json"
    known = read_probes(path)
    missing = [pair for pair in pairs if probe_key(*pair) not in known]
    for backbone, size in missing:
        known[probe_key(backbone, size)] = measure_on_gpu(backbone, size, device=device)
    if missing:
        write_probes(path, known)
    return {probe_key(*pair): known[probe_key(*pair)] for pair in pairs}


def read_probes(path: Path) -> dict[str, MemoryProbe]:
    try:
        rows = json.loads(Path(path).read_text())["probes"]
        return {probe_key(row["backbone"], row["image_size"]): MemoryProbe(**row) for row in rows}
    except (OSError, ValueError, KeyError, TypeError):  # none yet, or damaged: measured again
        return {}


def write_probes(path: Path, probes: dict[str, MemoryProbe], note: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    body = {"note": note, "probes": [asdict(probe) for probe in probes.values()]}
    partial.write_text(json.dumps(body, indent=1) + "\n")
    os.replace(partial, path)
