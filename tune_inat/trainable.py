"""The Ray Tune function trainable: one trial is one `FineTuning` run, reported and checkpointed each epoch.

Trials get the already-built image caches (one per resolution) through `TrialContext`, passed
once with `tune.with_parameters`; they open the memory-mapped arrays read-only and never decode
an image again. On a node where the cache does not exist yet (a cluster without a shared cache
dir) the trial builds it there, under the cache's file lock. Each epoch reports every metric
with a checkpoint holding the unfrozen weights, optimiser, schedule, epoch and RNG state, so a
retried or restored trial continues where it stopped.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from ray import tune

from tune_inat.data.dataset import DataConfig, TrainValData, prepare_train_val
from tune_inat.engine import FineTuning, TrainConfig

CHECKPOINT_FILE = "fine_tuning.pt"


@dataclass(frozen=True)
class TrialContext:
    """What every trial of one search shares: the data handles, the epoch cap, the data settings."""

    data_by_size: dict[int, TrainValData]
    data_config: DataConfig
    max_epochs: int

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


def fine_tune_trial(config: dict[str, Any], context: TrialContext) -> None:
    """Ray Tune function trainable: train the trial's config, one report and checkpoint per epoch."""
    start = time.perf_counter()
    settings = TrainConfig.from_dict(config, "trial config")
    settings = replace(settings, epochs=min(settings.epochs, context.max_epochs))
    cpus, gpu_share = trial_resources()
    use_cuda = gpu_share > 0 and torch.cuda.is_available()
    device = torch.device("cuda" if use_cuda else "cpu")
    if use_cuda and gpu_share < 1:
        # Trials sharing a GPU are not isolated by Ray: cap each at its share of the memory.
        torch.cuda.set_per_process_memory_fraction(min(1.0, gpu_share), device)
    fine_tuning = FineTuning(settings, context.data_for(settings.image_size), device)
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            fine_tuning.load_state_dict(torch.load(Path(folder) / CHECKPOINT_FILE, map_location=device, weights_only=True))
    fixed = {
        "max_epochs": settings.epochs,
        "gpu_share": gpu_share,
        "cpus": cpus,
        "trainable_parameters": fine_tuning.model.num_trainable_parameters(),
        "startup_seconds": time.perf_counter() - start,
    }
    while not fine_tuning.done:
        metrics = {**fine_tuning.run_epoch(), **fixed}
        with tempfile.TemporaryDirectory() as folder:
            torch.save(fine_tuning.state_dict(), Path(folder) / CHECKPOINT_FILE)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))
