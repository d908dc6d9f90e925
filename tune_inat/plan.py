"""`--plan`: what a space file will do, before any GPU hour is spent. No Ray, no training.

How each key of the file was read (the user's name and value -> our setting and value; what is
ignored and why), the settings left at their defaults, the trials, the scheduler's rungs, each
trial's resources and the most trial-epochs the search can spend.
"""

from __future__ import annotations

import math
from dataclasses import fields

from tune_inat.settings import TrainConfig
from tune_inat.space import SpaceReading
from tune_inat.spec import SearchSpec
from tune_inat.strategies import expands_grid, hyperband_bands


def rungs(spec: SearchSpec) -> list[int]:
    """The epochs at which the scheduler may stop a trial (before its last epoch)."""
    options, top = spec.options.scheduler_options, spec.max_epochs
    if spec.options.scheduler == "hyperband":
        return [band for band in hyperband_bands(options) if band < top]
    if spec.options.scheduler in ("asha", "pasha"):
        grace, factor = min(options["grace_period"], top), options["reduction_factor"]
        count = int(math.log(top / grace) / math.log(factor) + 1)  # Ray's ASHA bracket, one bracket
        return [int(m) for k in range(count) if (m := grace * factor**k) < top]
    return []


def trial_count(spec: SearchSpec) -> int:
    """Trials the search runs: every combination for a grid, else num_samples."""
    if not expands_grid(spec):
        return spec.options.num_samples
    return math.prod(len(p.values) for p in spec.parameters.values() if p.distribution == "categorical")


def plan_lines(reading: SpaceReading, spec: SearchSpec, cpus: float, gpus: float, at_once: int) -> list[str]:
    """The plan, one line each (`spec` is the file's spec with the command line's flags applied)."""
    lines = [f"How {spec.source} was read:"]
    width = max((len(r.key) for r in reading.readings), default=0)
    for r in reading.readings:
        meaning = f"{r.setting} {r.meaning}" if r.setting else r.meaning
        lines.append(f"  {r.key:<{width}}  {r.given} -> {meaning}" + (f"  ({r.note})" if r.note else ""))
    given = {r.setting for r in reading.readings} | set(spec.parameters)
    if "freeze_form" in given:
        given.add("freeze_fraction")  # a freeze form replaces the fraction
    defaults = [f"{f.name} {getattr(TrainConfig(), f.name)!r}" for f in fields(TrainConfig) if f.name not in given]
    if defaults:
        lines.append(f"Left at their defaults: {', '.join(defaults)}")
    trials, epochs = trial_count(spec), spec.max_epochs
    goal = "maximize" if spec.mode == "max" else "minimize"
    lines.append(f"Search: {spec.searcher}, {trials} trials, metric {spec.metric} ({goal}), each up to {epochs} epochs")
    stops = rungs(spec)
    where = f"may stop a trial after epoch {', '.join(map(str, stops))}" if stops else "stops no trial early"
    order = "reproducible" if spec.options.reproducible else "asynchronous"
    lines.append(f"Scheduler: {spec.options.scheduler} ({order}), {where}")
    share = f", {gpus:g} GPU" if gpus else " (no GPU)"
    lines.append(f"Resources: each trial {cpus:g} CPUs{share}; {at_once} trials at once")
    lines.append(f"At most {trials * epochs} trial-epochs ({trials} trials x {epochs} epochs, if none is stopped)")
    return lines
