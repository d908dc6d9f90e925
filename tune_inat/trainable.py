"""The Ray Tune function trainable: one trial is one `FineTuning` run, reported and checkpointed each epoch.

Trials get the already-built image caches (one per resolution) through `TrialContext`, passed
once with `tune.with_parameters`; they open the memory-mapped arrays read-only and never decode
an image again. On a node where the cache does not exist yet (a cluster without a shared cache
dir) the trial builds it there, under the cache's file lock.

Each epoch reports every metric with a checkpoint holding the unfrozen weights, optimiser,
schedule, epoch and RNG state, plus `epochs.json`: every epoch's reported metrics so far. So a
retried or restored trial continues where it stopped, and the results callback can recover any
epoch row a crash kept from being written (the checkpoint Ray restores from lists them all).

Out of GPU memory, a trial retries once in place from its last epoch with half the micro-batch
and twice the gradient accumulation (the same effective batch); if that fails too it ends as
"out of GPU memory", which Ray's own retries do not repeat.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from tune_inat.costs import cost_of, cpu_name
from tune_inat.data.dataset import DataConfig, TrainValData, prepare_train_val
from tune_inat.engine import FineTuning
from tune_inat.results import COST_KEYS
from tune_inat.settings import TrainConfig

CHECKPOINT_FILE = "fine_tuning.pt"
NODE_CACHE_VARIABLE = "TUNE_INAT_NODE_CACHE"  # set on a cluster node: where that node keeps its own caches
HISTORY_FILE = "epochs.json"
OOM_MARKER = "out_of_gpu_memory.txt"

EpochHook = Callable[[Path, int], None]  # (trial folder, epoch about to start)


class TrialFailure(RuntimeError):
    """A trial failure whose message is already the one line users should read."""


@dataclass(frozen=True)
class TrialContext:
    """What every trial of one search shares: the data handles, the epoch cap, the data settings.

    `before_epoch` is empty in a normal search; tests install a fault injector there
    (`tune_inat.faults`).
    """

    data_by_size: dict[int, TrainValData]
    data_config: DataConfig
    max_epochs: int
    before_epoch: EpochHook | None = None
    worker_logs: bool = False  # Ray's own lines from the trial (checkpoint saved, restored), shown when asked

    def data_for(self, image_size: int) -> TrainValData:
        node_cache = os.environ.get(NODE_CACHE_VARIABLE)
        data = self.data_by_size.get(image_size)
        if not node_cache and data is not None and data.cache.is_present():
            return data
        # Not built on this node (or not planned for this size), or this node keeps its own cache: build or find
        # it here, under the cache's lock.
        return prepare_train_val(replace(self.data_config, progress=False, cache_dir=self.cache_dir), image_size)

    @property
    def cache_dir(self) -> Path:
        """Where this node keeps its caches: `TUNE_INAT_NODE_CACHE` where the node sets it, else the driver's."""
        return Path(os.environ.get(NODE_CACHE_VARIABLE) or self.data_config.cache_dir)


def trial_resources() -> tuple[float, float]:
    """(CPUs, GPU share) Ray reserved for this trial."""
    resources = tune.get_context().get_trial_resources().required_resources
    return float(resources.get("CPU", 0)), float(resources.get("GPU", 0))


CHECKPOINT_PREFIX = "tune-inat-ckpt-"


class EpochCheckpoints:
    """Each epoch's state saved once: the copy Ray keeps, and the local copy an OOM retry restarts from.

    The local copy lives in the temp dir under the worker's pid. A worker killed outright (the driver
    SIGKILLed, a node lost) cannot remove its copy, so each new trial removes those of dead workers:
    a crashed search does not leave a model's weights and optimiser state per trial in /tmp for good.
    """

    def __init__(self, temp_dir: Path | None = None) -> None:
        self.temp_dir = Path(temp_dir or tempfile.gettempdir())
        self.latest: Path | None = None
        remove_orphaned_checkpoints(self.temp_dir)

    def save(self, state: dict[str, Any], history: list[dict[str, Any]]) -> Path:
        folder = Path(tempfile.mkdtemp(prefix=f"{CHECKPOINT_PREFIX}{os.getpid()}-", dir=self.temp_dir))
        torch.save(state, folder / CHECKPOINT_FILE)
        (folder / HISTORY_FILE).write_text(json.dumps(history))
        self.discard()
        self.latest = folder
        return folder

    def discard(self) -> None:
        if self.latest is not None:
            shutil.rmtree(self.latest, ignore_errors=True)
            self.latest = None


def remove_orphaned_checkpoints(temp_dir: Path) -> None:
    """Remove local checkpoint copies whose worker process no longer runs on this machine."""
    for folder in temp_dir.glob(f"{CHECKPOINT_PREFIX}*-*"):
        pid = folder.name.removeprefix(CHECKPOINT_PREFIX).split("-", 1)[0]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: checks the process exists, sends nothing
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def load_checkpoint(folder: Path, where: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(training state, reported history) of a checkpoint folder; a damaged one is one TrialFailure line."""
    try:
        state = torch.load(folder / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
        history = json.loads((folder / HISTORY_FILE).read_text()) if (folder / HISTORY_FILE).is_file() else []
    except Exception as err:  # truncated, garbage, unreadable: say which file
        reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise TrialFailure(f"checkpoint {where}/{CHECKPOINT_FILE} is damaged ({reason})") from None
    if not isinstance(state, dict) or "epoch" not in state or not isinstance(history, list):
        raise TrialFailure(f"checkpoint {where} is not a tune-inat checkpoint")
    return state, history


def micro_batch_attempts(settings: TrainConfig) -> list[TrainConfig]:
    """The settings to try, in order: as given, then (out of memory) half the micro-batch, same effective batch."""
    halved = replace(settings, grad_accum_steps=settings.grad_accum_steps * 2)
    if settings.batch_size % halved.grad_accum_steps or settings.batch_size // halved.grad_accum_steps < 2:
        return [settings]
    return [settings, halved]


def fine_tune_trial(config: dict[str, Any], context: TrialContext) -> None:
    """Ray Tune function trainable: train the trial's config, one report and checkpoint per epoch."""
    start, started_at = time.perf_counter(), time.time()
    if not context.worker_logs:  # a Ray that sends workers' output to the driver (a notebook's own) stays quiet
        for name in ("ray.train", "ray.tune"):
            logging.getLogger(name).setLevel(logging.WARNING)
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
    state, history = None, []
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state, history = load_checkpoint(Path(folder), checkpoint.path)
    facts = {
        "max_epochs": settings.epochs,
        "gpu_share": gpu_share,
        "cpus": cpus,
        "started_at": history[0].get("started_at", started_at) if history else started_at,
        "node_id": ray.get_runtime_context().get_node_id(),  # where it runs now (after a retry: the new node)
        "node_host": socket.gethostname(),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "gpu_uuid": f"GPU-{torch.cuda.get_device_properties(device).uuid}" if device.type == "cuda" else None,
        "worker_pid": os.getpid(),
    }
    if history and "startup_seconds" in history[0]:
        facts["startup_seconds"] = history[0]["startup_seconds"]
    if history and "forward_gflop" in history[0]:  # measured at the first start
        facts.update({key: history[0][key] for key in COST_KEYS if key in history[0]})
    checkpoints = EpochCheckpoints()
    attempts = micro_batch_attempts(settings)
    try:
        for attempt, run_settings in enumerate(attempts):
            try:
                train_and_report(run_settings, context, device, state, history, checkpoints, facts, trial_dir, start)
                return
            except torch.OutOfMemoryError:
                release_gpu_memory(device)
                if attempt == len(attempts) - 1:
                    fail_for_memory(trial_dir, run_settings)
                if checkpoints.latest is not None:  # continue from the last finished epoch
                    state, history = load_checkpoint(checkpoints.latest, "of the last epoch")
    finally:
        checkpoints.discard()


def train_and_report(
    settings: TrainConfig,
    context: TrialContext,
    device: torch.device,
    state: dict | None,
    history: list[dict[str, Any]],
    checkpoints: EpochCheckpoints,
    facts: dict[str, Any],
    trial_dir: Path,
    start: float,
) -> None:
    """Build the run (restoring `state`), then train, report and checkpoint each remaining epoch."""
    data = context.data_for(settings.image_size)  # once: with a node's own cache it is opened and checked here
    fine_tuning = FineTuning(settings, data, device)
    if state is not None:
        fine_tuning.load_state_dict(state)
    facts.setdefault("startup_seconds", time.perf_counter() - start)  # the first start only
    if "forward_gflop" not in facts:  # what the model costs where it runs: measured once per backbone, size and head
        cost = cost_of(
            settings.backbone,
            settings.image_size,
            len(data.classes),
            device if device.type == "cuda" else None,
            context.cache_dir,
            settings.head_hidden,
        )
        facts.update(cost.as_report())
    constant = {
        **facts,
        "trainable_parameters": fine_tuning.model.num_trainable_parameters(),
        "frozen_parameter_share": fine_tuning.model.frozen_parameter_share(),
        "micro_batch_size": settings.batch_size // settings.grad_accum_steps,
    }
    try:
        while not fine_tuning.done:
            if context.before_epoch is not None:
                context.before_epoch(trial_dir, fine_tuning.epoch + 1)
            metrics = {**fine_tuning.run_epoch(), **constant, "reported_at": time.time()}
            history.append(metrics)
            folder = checkpoints.save(fine_tuning.state_dict(), history)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))
    finally:
        del fine_tuning


def release_gpu_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def fail_for_memory(trial_dir: Path, settings: TrainConfig) -> None:
    message = (
        f"out of GPU memory: batch {settings.batch_size} as {settings.grad_accum_steps} micro-batches of "
        f"{settings.batch_size // settings.grad_accum_steps} did not fit either"
    )
    (trial_dir / OOM_MARKER).write_text(message)
    raise TrialFailure(message) from None
