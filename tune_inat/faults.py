"""Test-only fault injection: make chosen trials fail or run out of memory at chosen epochs.

`TUNE_INAT_FAULTS="2:3:error:1,4:2:oom:always,1:2:slow:5"` makes trial 2 raise once at the start
of epoch 3, trial 4 run out of memory at epoch 2 every time, and trial 1 wait 5 s before its
epoch 2 (to change the order trials report in; trial numbers as in the `trial_<number>_<id>`
folders). The search installs a `FaultInjector` as the trials' `before_epoch` hook only when the
variable is set; a normal search has no hook at all.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

FAULTS_VARIABLE = "TUNE_INAT_FAULTS"


@dataclass(frozen=True)
class Fault:
    """Trial number `trial` fails at the start of `epoch` with `kind`, `times` times (0 = every time)."""

    trial: int
    epoch: int
    kind: str  # "error", "oom" or "slow"
    times: int = 1
    seconds: float = 0.0  # "slow": how long to wait


def parse_faults(text: str | None) -> tuple[Fault, ...]:
    """ "1:2:error:1,3:2:oom:always" -> Faults."""
    faults = []
    for item in filter(None, (text or "").split(",")):
        trial, epoch, kind, *extra = item.strip().split(":")
        if kind not in ("error", "oom", "slow"):
            raise ValueError(f"fault kind must be error, oom or slow, got {kind!r}")
        if kind == "slow":
            faults.append(Fault(int(trial), int(epoch), kind, 1, float(extra[0]) if extra else 5.0))
            continue
        count = 0 if extra and extra[0] == "always" else int(extra[0]) if extra else 1
        faults.append(Fault(int(trial), int(epoch), kind, count))
    return tuple(faults)


def trial_number(trial_dir: Path) -> int | None:
    """The number in "trial_003_1a2b3c4d" (the search names trials so), else None."""
    parts = trial_dir.name.split("_")
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


@dataclass(frozen=True)
class FaultInjector:
    """A trial's `before_epoch` hook that raises the faults meant for this trial and epoch.

    How often a fault already fired is counted in a file in the trial folder, so a retried or
    restored trial sees the same count.
    """

    faults: tuple[Fault, ...]

    def __call__(self, trial_dir: Path, epoch: int) -> None:
        number = trial_number(trial_dir)
        for fault in self.faults:
            if fault.trial != number or fault.epoch != epoch:
                continue
            marker = trial_dir / f"fault-{fault.kind}-{fault.epoch}.count"
            fired = int(marker.read_text()) if marker.exists() else 0
            if fault.times and fired >= fault.times:
                continue
            marker.write_text(str(fired + 1))
            if fault.kind == "slow":
                time.sleep(fault.seconds)
                continue
            if fault.kind == "oom":
                raise torch.OutOfMemoryError(f"CUDA out of memory (injected at epoch {epoch})")
            raise RuntimeError(f"injected fault at epoch {epoch}")
