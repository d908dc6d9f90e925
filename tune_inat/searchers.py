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
    """OptunaSearch that reports early-stopped trials as PRUNED and failed ones as FAIL."""

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
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


def optuna_searcher(spec: SearchSpec, space: dict[str, Any]) -> PruningAwareOptunaSearch:
    """TPE over `space` (the searched settings as Ray Tune domains), seeded.

    The space, metric and mode are given to the searcher itself, so the searcher pickled in
    `tuner.pkl` is complete: a search killed before Ray saved any searcher state still resumes.
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
    return PruningAwareOptunaSearch(space=distributions, metric=spec.metric, mode=spec.mode, sampler=sampler)
