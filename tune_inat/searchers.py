"""Optuna that knows a pruned trial from a finished one (the `optuna` entry of `strategies.py`).

Ray's OptunaSearch tells Optuna that a trial ASHA stopped after one epoch is COMPLETE, with its
early, low score, so TPE models 1-epoch and 10-epoch scores as if they were comparable (and an
errored trial with a last score is COMPLETE too). `PruningAwareOptunaSearch` tells Optuna the
truth: a trial that ran all its epochs is COMPLETE, one stopped early is PRUNED (its last score
kept as an intermediate value, which TPE ranks below every completed trial, as designed), and
one that raised is FAIL.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from tune_inat.spec import SearchSpec
from tune_inat.warm import PriorTrial, warm_start

log = logging.getLogger(__name__)


class PruningAwareOptunaSearch(OptunaSearch):
    """OptunaSearch that reports early-stopped trials as PRUNED and failed ones as FAIL.

    With `in_order_lag` set (the reproducible mode), it learns in trial order instead of arrival
    order: the configuration of trial i is asked after trials 0 .. i - lag - 1 are told, and only
    those, so the same per-trial results give the same suggestions whatever the timing. Trials
    that end early are held back until their turn.
    """

    def __init__(
        self,
        *args: Any,
        in_order_lag: int | None = None,
        total: int | None = None,
        mirror: StudyMirror | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._mirror = mirror
        self._lag = in_order_lag
        self._total = total  # trials the search will ask for: once all are asked, no suggestion waits on a tell
        self._asked: list[str] = []  # trial ids in the order they were suggested
        self._held: dict[str, tuple[dict[str, Any] | None, bool]] = {}  # ended, not yet told
        self._told = 0  # how many of `_asked` have been told, in order

    def suggest(self, trial_id: str) -> dict | str | None:
        if self._lag is not None:
            due = max(0, len(self._asked) - self._lag)  # trials that must be told before this one is asked
            if any(earlier not in self._held for earlier in self._asked[self._told : due]):
                return None  # an earlier trial is still running: ask again later
            self._tell_in_order(due)
        config = super().suggest(trial_id)
        if isinstance(config, dict):
            self._asked.append(trial_id)
            self._ot_trials[trial_id].set_user_attr("ray_trial_id", trial_id)  # the id in trials.parquet
        return config

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        """Each epoch's value, as an intermediate value at the trial's own epoch (Ray's iteration count can lag it
        after a resume): what optuna-dashboard plots while the trial runs."""
        value = result.get(self.metric)
        if trial_id in self._completed_trials or trial_id not in self._ot_trials or value is None or value != value:
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an epoch trained again after a crash keeps its first value
            epoch = int(result.get("epoch", result.get("training_iteration", 0)))
            self._ot_trials[trial_id].report(float(value), epoch)
        if self._mirror is not None:
            self._mirror.sync(self._ot_study)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        if self._lag is not None and trial_id in self._asked[self._told :]:
            self._held[trial_id] = (result, error)
            if self._total is not None and len(self._asked) >= self._total:
                self._tell_in_order(len(self._asked))  # the last asks are made: what is held can be told, in order
            return
        self._tell(trial_id, result, error)

    def _tell_in_order(self, due: int) -> None:
        """Tell the held trials among the first `due` asked, in the order they were asked, up to the first running."""
        while self._told < due and self._asked[self._told] in self._held:
            earlier = self._asked[self._told]
            self._tell(earlier, *self._held.pop(earlier))
            self._told += 1

    def _tell(self, trial_id: str, result: dict[str, Any] | None, error: bool) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return super().on_trial_complete(trial_id, result=result, error=error)
        ot_trial = self._ot_trials[trial_id]
        value = (result or {}).get(self.metric)
        has_value = value is not None and not (isinstance(value, float) and math.isnan(value))
        finished = bool(result) and result.get("epoch", 0) >= result.get("max_epochs", math.inf)
        if has_value:  # the last result comes only here (Ray reports no result for it): its epoch too
            self.on_trial_result(trial_id, result)
        if error:
            state, values = TrialState.FAIL, None
        elif finished and has_value:
            state, values = TrialState.COMPLETE, value
        else:
            state, values = TrialState.PRUNED, None  # its last value stays as its intermediate value (TPE's rule)
        self._ot_study.tell(ot_trial, values, state=state)
        self._completed_trials.add(trial_id)
        if self._mirror is not None:
            self._mirror.sync(self._ot_study, now=True)

    def learn_from(self, trials: list[PriorTrial]) -> None:
        """Tell the study an earlier search's finished trials before the first suggestion (a warm start)."""
        states = {"completed": TrialState.COMPLETE, "pruned": TrialState.PRUNED, "failed": TrialState.FAIL}
        for prior in trials:
            completed = prior.state == "completed"
            self._ot_study.add_trial(
                optuna.trial.create_trial(
                    params=prior.params,
                    distributions=self._space,
                    state=states[prior.state],
                    value=prior.score if completed else None,
                    intermediate_values={prior.epochs: prior.score} if prior.state == "pruned" else None,
                )
            )
        if self._mirror is not None:
            self._mirror.sync(self._ot_study, now=True)


def first_recipes(spec: SearchSpec) -> tuple[list[dict[str, Any]], list[PriorTrial]]:
    """What the searcher tries first (the space's `start_with`, then a warm start's best), and what it learns from."""
    first = [dict(recipe) for recipe in spec.options.start_with]
    prior: list[PriorTrial] = []
    if spec.options.warm_start:  # checked, and its notes shown, by the search before the tuner is built
        warm = warm_start(spec, spec.options.warm_start)
        first += [recipe for recipe in warm.first if recipe not in first]
        prior = warm.trials
    return first, prior


def tpe_sampler(spec: SearchSpec) -> optuna.samplers.TPESampler:
    """Multivariate TPE, seeded, with the constant liar for parallel trials."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=spec.options.seed,
            multivariate=True,
            group=True,
            constant_liar=True,  # parallel trials: pretend running ones did badly, to spread the suggestions
            n_startup_trials=min(10, max(3, spec.options.num_samples // 3)),
        )


class StudyMirror:
    """The searcher's study, copied into an SQLite file for Optuna's own tools (optuna-dashboard, `load_study`).

    A copy, not the searcher's own storage: the search decides exactly as with its study in memory, and a
    write that fails (a full disk, a reader holding the file's lock too long) costs the copy one warning and
    is made up at the next sync; the search goes on. Synced at most every `SYNC_SECONDS`, and at each trial's end.
    """

    SYNC_SECONDS = 2.0

    def __init__(self, path: Path, name: str) -> None:
        self.path = Path(path)  # results/<name>/optuna.db
        self.name = name  # the study's name: the search's
        self._storage: optuna.storages.RDBStorage | None = None
        self._synced_at = -math.inf
        self._warned = False

    @property
    def url(self) -> str:
        return f"sqlite:///{self.path}"

    def __getstate__(self) -> dict[str, Any]:  # pickled with the searcher: the connection is opened again
        return {**self.__dict__, "_storage": None, "_synced_at": -math.inf}

    def sync(self, study: optuna.Study, now: bool = False) -> None:
        if not now and time.monotonic() - self._synced_at < self.SYNC_SECONDS:
            return
        self._synced_at = time.monotonic()
        try:
            self._copy(study)
        except Exception as err:  # sqlite3 / SQLAlchemy / Optuna's storage errors: the copy waits, the search goes on
            if not self._warned:
                self._warned = True
                reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
                log.warning(
                    "warning: the Optuna study's copy %s cannot be written now (%s); the search goes on and the "
                    "copy catches up when it can",
                    self.path,
                    reason,
                )

    def _copy(self, study: optuna.Study) -> None:
        if self._storage is None:
            # readers lock the file for a moment: wait for them rather than skip a sync
            self._storage = optuna.storages.RDBStorage(self.url, engine_kwargs={"connect_args": {"timeout": 30}})
        storage = self._storage
        try:
            study_id = storage.get_study_id_from_name(self.name)
        except KeyError:
            study_id = storage.create_new_study(study.directions, self.name)
        copied = {trial.number: trial for trial in storage.get_all_trials(study_id, deepcopy=False)}
        for trial in study.get_trials(deepcopy=False):  # in creation order: the copy's numbers are the same
            copy = copied.get(trial.number)
            if copy is None:
                storage.create_new_trial(study_id, template_trial=trial)
            elif not copy.state.is_finished():
                for step, value in trial.intermediate_values.items():
                    if step not in copy.intermediate_values:
                        storage.set_trial_intermediate_value(copy._trial_id, step, value)
                if trial.state.is_finished():
                    storage.set_trial_state_values(copy._trial_id, trial.state, trial.values)


def optuna_searcher(
    spec: SearchSpec, space: dict[str, Any], max_concurrent: int, study: StudyMirror | None = None
) -> PruningAwareOptunaSearch:
    """TPE over `space` (the searched settings as Ray Tune domains), seeded.

    The space, metric and mode are given to the searcher itself, so the searcher pickled in
    `tuner.pkl` is complete: a search killed before Ray saved any searcher state still resumes.
    In the reproducible mode it learns in trial order, with as many trials running as fit.
    With `study`, the study is copied as it grows into that SQLite file, for Optuna's own tools.
    """
    sampler = tpe_sampler(spec)
    distributions = OptunaSearch.convert_search_space(space)  # Optuna's own form: no conversion warning
    lag = max_concurrent - 1 if spec.options.reproducible else None
    first, prior = first_recipes(spec)
    searcher = PruningAwareOptunaSearch(
        space=distributions,
        metric=spec.metric,
        mode=spec.mode,
        sampler=sampler,
        in_order_lag=lag,
        total=spec.options.num_samples,
        points_to_evaluate=first or None,
        mirror=study,
    )
    searcher.learn_from(prior)
    return searcher
