"""Warm starts: what an earlier search on the same data already knows, for a new search of a space.

`--warm-start RESULTS_DIR` gives the new search's searcher every finished trial of the earlier one
that this space could have proposed (its fixed settings equal, its searched ones in range): Optuna
learns from them before its first suggestion, and the earlier search's best recipes run first.
Trials outside the space are dropped, and the messages say which setting dropped them.
Reads only the earlier search's tables (`results.read_results`): no Ray, no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tune_inat.errors import UserError
from tune_inat.results import rank_trials, read_results
from tune_inat.settings import plain
from tune_inat.spec import Parameter, SearchSpec

BEST_RECIPES_FIRST = 3


@dataclass(frozen=True)
class PriorTrial:
    """A finished trial of an earlier search, as the new searcher is told it."""

    params: dict[str, Any]  # its value of each setting this space searches
    score: float | None  # its best value of the search metric
    state: str  # "completed", "pruned" (stopped early) or "failed"
    epochs: int  # epochs it ran


@dataclass(frozen=True)
class WarmStart:
    trials: list[PriorTrial]
    first: list[dict[str, Any]]  # the best recipes, to run first
    notes: list[str]  # one line each: how many were taken, which were dropped and why


def _fits(parameter: Parameter, value: Any) -> bool:
    if parameter.values:
        return value in parameter.values
    return value is not None and parameter.low <= value <= parameter.high


def warm_start(spec: SearchSpec, folder: str, data_root: Path | None = None) -> WarmStart:
    """The earlier search's finished trials that `spec` could have proposed, and its best recipes."""
    results = read_results(folder)
    if (results.metric, results.mode) != (spec.metric, spec.mode):
        raise UserError(
            f"--warm-start {folder}: that search ranked by {results.metric} ({results.mode}), this one by "
            f"{spec.metric} ({spec.mode}); its scores would mislead the searcher"
        )
    earlier_root = results.record.get("data_root")
    if data_root is not None and earlier_root and Path(earlier_root) != Path(data_root):
        raise UserError(
            f"--warm-start {folder}: that search ran on {earlier_root}, this one on {data_root}; "
            f"scores on other data would mislead the searcher"
        )
    searched = spec.searched()
    finished = results.trials[results.trials["status"].isin(["completed", "stopped_early", "error"])]
    trials: list[PriorTrial] = []
    dropped: dict[str, int] = {}
    for _, row in finished.iterrows():
        reason = next((name for name, p in spec.parameters.items() if not _fits(p, plain(row.get(name)))), None)
        if reason is not None:
            dropped[reason] = dropped.get(reason, 0) + 1
            continue
        score = plain(row["best_score"])
        score = None if score is None or (isinstance(score, float) and math.isnan(score)) else float(score)
        state = {"completed": "completed", "stopped_early": "pruned"}.get(row["status"], "failed")
        if score is None and state != "failed":
            state = "failed"
        epochs = int(plain(row["epochs_run"])) if row["epochs_run"] == row["epochs_run"] else 0
        trials.append(PriorTrial({name: plain(row[name]) for name in searched}, score, state, epochs))
    ranked = rank_trials(finished[finished["status"] == "completed"], spec.mode) if len(finished) else finished
    first: list[dict[str, Any]] = []
    for _, row in ranked.iterrows():
        recipe = {name: plain(row[name]) for name in searched}
        if all(_fits(spec.parameters[name], value) for name, value in recipe.items()) and recipe not in first:
            first.append(recipe)
        if len(first) == BEST_RECIPES_FIRST:
            break
    notes = [
        f"warm start from {folder}: {len(trials)} of its {len(finished)} finished trials given to the searcher, "
        f"its best {len(first)} recipes run first"
    ]
    notes += [
        f"warm start: {count} trials dropped: their {name} is outside this space" for name, count in dropped.items()
    ]
    return WarmStart(trials, first, notes)
