"""Optuna that knows a pruned trial from a finished one (the `optuna` entry of `strategies.py`).

Ray's OptunaSearch tells Optuna that a trial ASHA stopped after one epoch is COMPLETE, with its
early, low score, so TPE models 1-epoch and 10-epoch scores as if they were comparable (and an
errored trial with a last score is COMPLETE too). `PruningAwareOptunaSearch` tells Optuna the
truth: a trial that ran all its epochs is COMPLETE, one stopped early is PRUNED (its last score
kept as an intermediate value, which TPE ranks below every completed trial, as designed), and
one that raised is FAIL.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from tune_inat.space import SearchSpec


class PruningAwareOptunaSearch(OptunaSearch):
    """OptunaSearch that reports early-stopped trials as PRUNED and failed ones as FAIL.

    With `in_order_lag` set (the reproducible mode), it learns in trial order instead of arrival
    order: the configuration of trial i is asked after trials 0 .. i - lag - 1 are told, and only
    those, so the same per-trial results give the same suggestions whatever the timing. Trials
    that end early are held back until their turn.
    """

    def __init__(self, *args: Any, in_order_lag: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lag = in_order_lag
        self._asked: list[str] = []  # trial ids in the order they were suggested
        self._held: dict[str, tuple[dict[str, Any] | None, bool]] = {}  # ended, not yet told
        self._told = 0  # how many of `_asked` have been told, in order

    def suggest(self, trial_id: str) -> dict | str | None:
        if self._lag is not None:
            due = max(0, len(self._asked) - self._lag)  # trials that must be told before this one is asked
            if any(earlier not in self._held for earlier in self._asked[self._told : due]):
                return None  # an earlier trial is still running: ask again later
            while self._told < due:
                earlier = self._asked[self._told]
                self._tell(earlier, *self._held.pop(earlier))
                self._told += 1
        config = super().suggest(trial_id)
        if isinstance(config, dict):
            self._asked.append(trial_id)
        return config

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        if self._lag is not None and trial_id in self._asked[self._told :]:
            self._held[trial_id] = (result, error)
            return
        self._tell(trial_id, result, error)

    def _tell(self, trial_id: str, result: dict[str, Any] | None, error: bool) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return super().on_trial_complete(trial_id, result=result, error=error)
        ot_trial = self._ot_trials[trial_id]
        value = (result or {}).get(self.metric)
        has_value = value is not None and not (isinstance(value, float) and math.isnan(value))
        finished = bool(result) and result.get("epoch", 0) >= result.get("max_epochs", math.inf)
        if error:
            state, values = TrialState.FAIL, None
        elif finished and has_value:
            state, values = TrialState.COMPLETE, value
        else:
            state, values = TrialState.PRUNED, None
            if has_value:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # a step already reported is kept as it was
                    ot_trial.report(value, int(result.get("training_iteration", result.get("epoch", 0))))
        self._ot_study.tell(ot_trial, values, state=state)
        self._completed_trials.add(trial_id)


def optuna_searcher(spec: SearchSpec, space: dict[str, Any], max_concurrent: int) -> PruningAwareOptunaSearch:
    """TPE over `space` (the searched settings as Ray Tune domains), seeded.

    The space, metric and mode are given to the searcher itself, so the searcher pickled in
    `tuner.pkl` is complete: a search killed before Ray saved any searcher state still resumes.
    In the reproducible mode it learns in trial order, with as many trials running as fit.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(
            seed=spec.options.seed,
            multivariate=True,
            group=True,
            constant_liar=True,  # parallel trials: pretend running ones did badly, to spread the suggestions
            n_startup_trials=min(10, max(3, spec.options.num_samples // 3)),
        )
    distributions = OptunaSearch.convert_search_space(space)  # Optuna's own form: no conversion warning
    lag = max_concurrent - 1 if spec.options.reproducible else None
    return PruningAwareOptunaSearch(
        space=distributions, metric=spec.metric, mode=spec.mode, sampler=sampler, in_order_lag=lag
    )
