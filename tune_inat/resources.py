"""What each trial reserves, checked against the cluster before any trial starts."""

from __future__ import annotations

import logging
import math
import os
import sys
from dataclasses import dataclass

from tune_inat.errors import UserError
from tune_inat.packing import GPUS_AUTO, SHARE_STEP
from tune_inat.spec import SearchSpec
from tune_inat.strategies import expands_grid

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrialResources:
    """What each trial reserves, and how many run at once."""

    cpus: float
    gpus: float  # with by_memory: the smallest share a trial can get
    max_concurrent: int
    by_memory: bool = False  # --gpus-per-trial auto: each trial's share from its measured memory (packing.py)


def plan_resources(spec: SearchSpec, nodes: list[dict[str, float]], warn: bool = True) -> TrialResources:
    """Check the asked-for resources against the cluster's nodes, before any trial starts."""
    options = spec.options
    node_gpus = [node.get("GPU", 0.0) for node in nodes]
    node_cpus = [node.get("CPU", 0.0) for node in nodes]
    gpus = options.gpus_per_trial
    by_memory = gpus == GPUS_AUTO
    if sum(node_gpus) == 0:
        if warn and (gpus is None or by_memory or gpus > 0):
            log.warning("warning: no GPU in the Ray cluster: trials run on the CPU (slow; fine for the demo)")
        gpus, by_memory = 0.0, False
    elif gpus is None:
        gpus = 0.25
    elif by_memory:
        gpus = SHARE_STEP  # what the smallest trial reserves: as many as that fits may run at once
    if gpus > max(node_gpus):
        raise UserError(f"gpus_per_trial {gpus:g} is more than any node has ({max(node_gpus):g} GPUs per node)")
    cpus = options.cpus_per_trial or (2.0 if gpus > 0 else 1.0)
    if cpus > max(node_cpus):
        raise UserError(f"cpus_per_trial {cpus:g} is more than any node has ({max(node_cpus):g} CPUs per node)")
    fits = sum(
        min(math.floor(c / cpus + 1e-9), math.floor(g / gpus + 1e-9) if gpus else sys.maxsize)
        for c, g in zip(node_cpus, node_gpus)
    )
    if fits == 0:
        raise UserError(f"no node has {cpus:g} CPUs and {gpus:g} GPUs free for one trial")
    max_concurrent = options.max_concurrent_trials or max(
        1, fits if expands_grid(spec) else min(fits, options.num_samples)
    )
    return TrialResources(cpus=cpus, gpus=gpus, max_concurrent=max_concurrent, by_memory=by_memory)


def local_node_resources() -> dict[str, float]:
    """What a local Ray would have: this machine's CPUs and CUDA GPUs (checked before starting Ray)."""
    import torch

    return {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}
