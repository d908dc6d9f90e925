"""The Ray Tune function trainable: one trial is one `FineTuning` run, reported and checkpointed each epoch.

Trials get the already-built image caches (one per resolution) through `TrialContext`, passed
once with `tune.with_parameters`; they open the memory-mapped arrays read-only and never decode
an image again. On a node where the cache does not exist yet (a cluster without a shared cache
dir) the trial builds it there, under the cache's file lock. Each epoch reports every metric
with a checkpoint holding the unfrozen weights, optimiser, schedule, epoch and RNG state, so a
retried or restored trial continues where it stopped.

Out of GPU memory, a trial retries once in place from its last epoch with half the micro-batch
and twice the gradient accumulation (the same effective batch); if that fails too it ends as
"out of GPU memory", which Ray's own retries do not repeat.
"""

from __future__ import annotations

import gc
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from ray import tune

from tune_inat.data.dataset import DataConfig, TrainValData, prepare_train_val
from tune_inat.engine import FineTuning, TrainConfig

CHECKPOINT_FILE = "fine_tuning.pt"
OOM_MARKER = "out_of_gpu_memory.txt"


class TrialFailure(RuntimeError):
    """A trial failure whose message is already the one line users should read."""


@dataclass(frozen=True)
class Fault:
    """Test-only fault injection: trial number `trial` fails at the start of `epoch` with `kind`, `times` times."""

    trial: int
    epoch: int
    kind: str  # "error" or "oom"
    times: int = 1  # 0 = every time


def parse_faults(text: str | None) -> tuple[Fault, ...]:
    """"1:2:error:1,3:2:oom:always" -> Faults (trial numbers as in the trial folders' names)."""
    faults = []
    for item in filter(None, (text or "").split(",")):
        trial, epoch, kind, *times = item.strip().split(":")
        if kind not in ("error", "oom"):
            raise ValueError(f"fault kind must be error or oom, got {kind!r}")
        count = 0 if times and times[0] == "always" else int(times[0]) if times else 1
        faults.append(Fault(int(trial), int(epoch), kind, count))
    return tuple(faults)


@dataclass(frozen=True)
class TrialContext:
    """What every trial of one search shares: the data handles, the epoch cap, the data settings."""

    data_by_size: dict[int, TrainValData]
    data_config: DataConfig
    max_epochs: int
    faults: tuple[Fault, ...] = field(default=())

    def data_for(self, image_size: int) -> TrainValData:
        data = self.data_by_size.get(image_size)
        if data is not None and (data.cache.directory / "meta.json").is_file():
            return data
        # Not built on this node (or not planned for this size): build or find it here, under the lock.
        return prepare_train_val(replace(self.data_config, progress=False), image_size)


def trial_resources() -> tuple[float, float]:
    """(CPUs, GPU share) Ray reserved for this trial."""
    resources = tune.get_context().get_trial_resources().required_resources
    return float(resources.get("CPU", 0)), float(resources.get("GPU", 0))


def _trial_number(trial_name: str) -> int | None:
    """The number in "trial_003_1a2b3c4d" (the search names trials so), else None."""
    parts = trial_name.split("_")
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


def _inject_faults(context: TrialContext, trial_dir: Path, epoch: int) -> None:
    index = _trial_number(tune.get_context().get_trial_name())
    for fault in context.faults:
        if fault.trial != index or fault.epoch != epoch:
            continue
        marker = trial_dir / f"fault-{fault.kind}-{fault.epoch}.count"
        fired = int(marker.read_text()) if marker.exists() else 0
        if fault.times and fired >= fault.times:
            continue
        marker.write_text(str(fired + 1))
        if fault.kind == "oom":
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected at epoch {epoch})")
        raise RuntimeError(f"injected fault at epoch {epoch}")


class _EpochCheckpoints:
    """Save each epoch's state once: the copy Ray keeps, and the local copy an OOM retry restarts from."""

    def __init__(self) -> None:
        self.latest: Path | None = None

    def save(self, state: dict[str, Any]) -> Path:
        folder = Path(tempfile.mkdtemp(prefix="tune-inat-ckpt-"))
        torch.save(state, folder / CHECKPOINT_FILE)
        self.discard()
        self.latest = folder
        return folder

    def discard(self) -> None:
        if self.latest is not None:
            shutil.rmtree(self.latest, ignore_errors=True)
            self.latest = None


def _train(settings: TrainConfig, context: TrialContext, device: torch.device, state: dict | None,
           checkpoints: _EpochCheckpoints, fixed: dict[str, Any], trial_dir: Path, start: float) -> None:
    """Build the run (restoring `state`), then train, report and checkpoint each remaining epoch."""
    fine_tuning = FineTuning(settings, context.data_for(settings.image_size), device)
    if state is not None:
        fine_tuning.load_state_dict(state)
    fixed.setdefault("startup_seconds", time.perf_counter() - start)  # first attempt only
    reported = {**fixed, "trainable_parameters": fine_tuning.model.num_trainable_parameters(),
                "micro_batch_size": settings.batch_size // settings.grad_accum_steps}
    try:
        while not fine_tuning.done:
            _inject_faults(context, trial_dir, fine_tuning.epoch + 1)
            metrics = {**fine_tuning.run_epoch(), **reported}
            folder = checkpoints.save(fine_tuning.state_dict())
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))
    finally:
        del fine_tuning


def fine_tune_trial(config: dict[str, Any], context: TrialContext) -> None:
    """Ray Tune function trainable: train the trial's config, one report and checkpoint per epoch."""
    start = time.perf_counter()
    settings = TrainConfig.from_dict(config, "trial config")
    settings = replace(settings, epochs=min(settings.epochs, context.max_epochs))
    trial_dir = Path(tune.get_context().get_trial_dir())
    if (trial_dir / OOM_MARKER).exists():  # a Ray retry of a trial that already failed for memory
        raise TrialFailure((trial_dir / OOM_MARKER).read_text())
    cpus, gpu_share = trial_resources()
    use_cuda = gpu_share > 0 and torch.cuda.is_available()
    device = torch.device("cuda" if use_cuda else "cpu")
    if use_cuda and gpu_share < 1:
        # Trials sharing a GPU are not isolated by Ray: cap each at its share of the memory.
        torch.cuda.set_per_process_memory_fraction(min(1.0, gpu_share), device)
    state = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    fixed: dict[str, Any] = {"max_epochs": settings.epochs, "gpu_share": gpu_share, "cpus": cpus}
    checkpoints = _EpochCheckpoints()
    try:
        try:
            _train(settings, context, device, state, checkpoints, fixed, trial_dir, start)
        except torch.OutOfMemoryError:
            smaller = replace(settings, grad_accum_steps=settings.grad_accum_steps * 2)
            if settings.batch_size % smaller.grad_accum_steps or smaller.batch_size // smaller.grad_accum_steps < 2:
                _fail_for_memory(trial_dir, settings)
            _release_gpu_memory(device)
            if checkpoints.latest is not None:
                state = torch.load(checkpoints.latest / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
            try:
                _train(smaller, context, device, state, checkpoints, fixed, trial_dir, start)
            except torch.OutOfMemoryError:
                _release_gpu_memory(device)
                _fail_for_memory(trial_dir, smaller)
    finally:
        checkpoints.discard()


def _release_gpu_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _fail_for_memory(trial_dir: Path, settings: TrainConfig) -> None:
    message = (
        f"out of GPU memory: batch {settings.batch_size} as {settings.grad_accum_steps} micro-batches of "
        f"{settings.batch_size // settings.grad_accum_steps} did not fit either"
    )
    (trial_dir / OOM_MARKER).write_text(message)
    raise TrialFailure(message) from None
