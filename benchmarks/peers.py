"""Peer engines for the strategy replay: W&B Sweeps, Syne Tune and stock Optuna over the recorded curves.

`bench_strategies.py` replays the recorded learning curves through Ray Tune. To compare with the search
engines people use instead, each peer's own library code (not a re-implementation) is driven here by one
small discrete-event simulator with the same budget rules: `samples` trials, `concurrency` running at once
(asynchronous: a worker that frees up asks for the next configuration at once), every trial's full budget
`curves.epochs` epochs, an epoch taking its recorded `epoch_seconds` of simulated time, the recording seed
`curves.seeds[seed % len(curves.seeds)]`. Every peer returns the reports in simulated-time order, in the
format `bench_strategies.anytime` scores: `{"trial", "config", "epoch", "val_acc", "epoch_seconds"}`.

W&B's `sweeps` and Syne Tune pin numpy < 2, which the project's pandas cannot use, so both are installed
without their dependencies into a folder of their own (`PEERS_SITE`, default /tmp/peers/site) that is put
at the *end* of sys.path: the venv's numpy, scipy, scikit-learn and pandas win; see NOTES.md.
"""

from __future__ import annotations

import contextlib
import heapq
import importlib.metadata
import itertools
import logging
import os
import random
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np

SITE = Path(os.environ.get("PEERS_SITE", "/tmp/peers/site"))
METRIC = "val_acc"
CONTINUE, STOP, PAUSE = "continue", "stop", "pause"
ETA = 3  # every early-stopping peer keeps 1/3 at a rung, from epoch 1 on (as the asha/hyperband rows)


def use_site(path: Path = SITE) -> None:
    """Make the separately installed peers importable, without letting them shadow the venv's packages."""
    if path.is_dir() and str(path) not in sys.path:
        sys.path.append(str(path))


use_site()


# -- the simulator ----------------------------------------------------------------------------------------


@dataclass
class Start:
    """A new trial with this configuration."""

    config: dict[str, Any]


@dataclass
class Resume:
    """Resume a paused trial from its last finished epoch (pause-and-resume schedulers: DyHPO)."""

    trial: int


class Engine(Protocol):
    """What the simulator asks of a peer; the adapters below translate to each library's own calls."""

    def tick(self, now: float) -> None:
        """The simulated time (seconds) of the calls that follow."""

    def next(self, trial: int, may_start: bool) -> Start | Resume | None:
        """A free worker's next task; `trial` is the id a new trial gets. None: the worker retires."""

    def report(self, trial: int, epoch: int, val_acc: float) -> str:
        """One epoch's result; CONTINUE, STOP or PAUSE for that trial."""

    def completed(self, trial: int) -> None:
        """The trial ran its full budget (and was not stopped or paused at its last report)."""

    def preempted(self) -> Iterable[int]:
        """Other running trials the engine stopped at this report (W&B's controller stops any run it polls)."""


@dataclass
class Stats:
    """Wall time the peer's own code took inside one replay: what a search pays its engine."""

    suggest_seconds: float = 0.0
    report_seconds: float = 0.0
    suggestions: int = 0
    reports: int = 0
    started: int = 0
    resumed: int = 0
    preempted: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def simulate(engine: Engine, curves: Any, samples: int, seed: int, concurrency: int, stats: Stats) -> list[dict]:
    """Replay one search: `concurrency` workers, each trial one epoch at a time in simulated seconds.

    A worker that frees up (its trial stopped, paused or done) asks the engine for its next task at once, until
    `samples` trials were started; after that it may still resume a paused trial, else it retires. Reports come
    out in simulated-time order (ties: the order the epochs were scheduled). A trial the engine preempts while
    it runs is stopped at once; its unfinished epoch is never reported, so it costs no compute in the scoring.
    """
    recording = curves.seeds[seed % len(curves.seeds)]
    configs: dict[int, dict] = {}
    done: dict[int, int] = {}  # trial -> epochs finished
    pending: dict[int, int] = {}  # running trial -> id of its scheduled epoch event
    cancelled: set[int] = set()
    events: list[tuple[float, int, int, int]] = []  # (finish time, event id, trial, epoch)
    order = itertools.count()
    reports: list[dict] = []
    workers = concurrency

    def schedule(now: float, trial: int) -> None:
        epoch = done[trial] + 1
        seconds = curves.curves[curves.key(configs[trial])][recording][1][epoch - 1]
        event = next(order)
        heapq.heappush(events, (now + float(seconds), event, trial, epoch))
        pending[trial] = event

    def fill(now: float) -> None:
        nonlocal workers
        while len(pending) < workers:
            began = time.perf_counter()
            engine.tick(now)
            task = engine.next(stats.started, may_start=stats.started < samples)
            stats.suggest_seconds += time.perf_counter() - began
            stats.suggestions += 1
            if task is None:
                workers -= 1  # nothing left for this worker
                continue
            if isinstance(task, Start):
                trial = stats.started
                configs[trial], done[trial] = dict(task.config), 0
                stats.started += 1
            else:
                trial = task.trial
                stats.resumed += 1
            schedule(now, trial)

    fill(0.0)
    while events:
        now, event, trial, epoch = heapq.heappop(events)
        if event in cancelled:
            continue
        del pending[trial]
        accuracies, seconds = curves.curves[curves.key(configs[trial])][recording]
        val_acc = float(accuracies[epoch - 1])
        reports.append(
            {
                "trial": trial,
                "config": configs[trial],
                "epoch": epoch,
                "val_acc": val_acc,
                "epoch_seconds": float(seconds[epoch - 1]),
            }
        )
        done[trial] = epoch
        began = time.perf_counter()
        engine.tick(now)
        decision = engine.report(trial, epoch, val_acc)
        if decision == CONTINUE and epoch == curves.epochs:
            engine.completed(trial)
        elif decision == CONTINUE:
            schedule(now, trial)
        for other in engine.preempted():
            if other in pending:
                cancelled.add(pending.pop(other))
                stats.preempted += 1
        stats.report_seconds += time.perf_counter() - began
        stats.reports += 1
        fill(now)
    return reports


# -- W&B Sweeps: its own engine, `sweeps` (the package W&B's server and local controller run) ----------------


class _OwnGlobalRandom:
    """`sweeps` draws from the global `random` and `np.random`: give it a seeded state of its own, swapped in
    around each call, so a replay is the same whatever else ran in the process."""

    def __init__(self, seed: int) -> None:
        self._python = random.Random(seed).getstate()
        self._numpy = np.random.RandomState(seed).get_state()

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        saved = random.getstate(), np.random.get_state()
        random.setstate(self._python)
        np.random.set_state(self._numpy)
        try:
            yield
        finally:
            self._python, self._numpy = random.getstate(), np.random.get_state()
            random.setstate(saved[0])
            np.random.set_state(saved[1])


def wandb_sweep_config(curves: Any, method: str, hyperband: bool) -> dict:
    """The sweep file a W&B user would write for the recorded grid: `values` lists, val_acc maximised."""
    config: dict[str, Any] = {
        "method": method,
        "metric": {"name": METRIC, "goal": "maximize"},
        "parameters": {
            name: {"values": list(values)} if len(values) > 1 else {"value": values[0]}
            for name, values in curves.values.items()
        },
    }
    if hyperband:  # bands at epochs 1, 3, 9, ...: the first rung and eta of the asha rows
        config["early_terminate"] = {"type": "hyperband", "min_iter": 1, "eta": ETA}
    return config


class WandbEngine:
    """Runs as W&B's controller keeps them: `sweeps.next_run` on all runs so far (bayes: a GP over the encoded
    parameters, running runs fantasised), `sweeps.stop_runs` after every report (W&B polls; here each report).

    A run the hyperband rule stops ends `killed`, as W&B records a run its agent terminates; bayes then imputes
    W&B's default `impute: worst` for it. A finished run scores its best logged val_acc (W&B's metric extremum).
    """

    def __init__(self, sweep_config: dict, seed: int, stopped_state: str = "killed") -> None:
        import sweeps

        self.sweeps = sweeps
        self.config = sweep_config
        self.rng = _OwnGlobalRandom(seed)
        self.runs: list[Any] = []
        self.by_trial: dict[int, Any] = {}
        self.stopped_state = sweeps.RunState(stopped_state)
        self._preempted: list[int] = []

    def tick(self, now: float) -> None:
        pass  # sweeps keeps no clock

    def next(self, trial: int, may_start: bool) -> Start | None:
        if not may_start:
            return None
        with self.rng.active(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run = self.sweeps.next_run(self.config, self.runs)
        run.name, run.state = f"trial-{trial}", self.sweeps.RunState.running
        self.runs.append(run)
        self.by_trial[trial] = run
        return Start({name: _plain(spec["value"]) for name, spec in run.config.items()})

    def report(self, trial: int, epoch: int, val_acc: float) -> str:
        run = self.by_trial[trial]
        run.history.append({METRIC: val_acc, "epoch": epoch})
        run.summary_metrics = {METRIC: val_acc}  # a run's summary is its last logged value
        self._preempted = []
        if "early_terminate" not in self.config:
            return CONTINUE
        stopped = {r.name for r in self.sweeps.stop_runs(self.config, self.runs)}
        decision = CONTINUE
        for other, other_run in self.by_trial.items():
            if other_run.name in stopped and other_run.state == self.sweeps.RunState.running:
                other_run.state, other_run.stopped = self.stopped_state, True
                if other == trial:
                    decision = STOP
                else:
                    self._preempted.append(other)
        return decision

    def completed(self, trial: int) -> None:
        self.by_trial[trial].state = self.sweeps.RunState.finished

    def preempted(self) -> Iterable[int]:
        return self._preempted


def wandb_peer(method: str, hyperband: bool) -> Callable[..., list[dict]]:
    def peer(curves: Any, samples: int = 40, seed: int = 0, concurrency: int = 4, stats: Stats | None = None):
        engine = WandbEngine(wandb_sweep_config(curves, method, hyperband), seed)
        return simulate(engine, curves, samples, seed, concurrency, stats or Stats())

    peer.__doc__ = f"W&B Sweeps' engine: method {method}" + (" + hyperband early_terminate" if hyperband else "")
    return peer


wandb_bayes = wandb_peer("bayes", hyperband=False)
wandb_bayes_hyperband = wandb_peer("bayes", hyperband=True)
wandb_random_hyperband = wandb_peer("random", hyperband=True)


# -- Syne Tune: its schedulers driven through their own suggest / on_trial_* interface ------------------------


class _CountNonFinite(logging.Filter):
    """Syne Tune's KDE searcher warns on the root logger for each candidate whose acquisition is not finite
    (statsmodels' Aitchison-Aitken kernel divides by levels - 1 when all good points share a category); keep
    the count, drop the line."""

    count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith("candidate has non finite acquisition"):
            _CountNonFinite.count += 1
            return False
        return True


_NON_FINITE = _CountNonFinite()


def _quiet_syne_tune() -> None:
    logging.getLogger("syne_tune").setLevel(logging.ERROR)
    if _NON_FINITE not in logging.getLogger().filters:
        logging.getLogger().addFilter(_NON_FINITE)


class SyneTuneEngine:
    """The calls Syne Tune's own `Tuner` makes of a scheduler (tuner.py): `suggest(trial_id)`, `on_trial_add`
    for a new trial, `on_trial_result` at each epoch (STOP / PAUSE then `on_trial_remove`), `on_trial_complete`
    at the full budget. A resume suggestion continues the paused trial from its checkpoint (the next epoch).
    The scheduler's clock is Syne Tune's own SimulatedTimeKeeper, set to the simulated time (its simulator
    backend also adds the scheduler's real compute time; here, as in the Ray rows, only epochs take time)."""

    def __init__(self, scheduler: Any, pauses: bool) -> None:
        from syne_tune.backend.simulator_backend.time_keeper import SimulatedTimeKeeper
        from syne_tune.backend.trial_status import Trial
        from syne_tune.optimizer.scheduler import SchedulerDecision

        self.clock = SimulatedTimeKeeper()
        self.clock.start_of_time()
        if hasattr(scheduler, "set_time_keeper"):
            scheduler.set_time_keeper(self.clock)
        self.scheduler, self.pauses = scheduler, pauses
        self.Trial, self.Decision = Trial, SchedulerDecision
        self.trials: dict[int, Any] = {}
        self.last: dict[int, dict] = {}
        self._unused_ids = itertools.count(1_000_000)  # ids of new trials suggested once all were started

    def tick(self, now: float) -> None:
        self.clock.advance_to(now)

    def next(self, trial: int, may_start: bool) -> Start | Resume | None:
        if not may_start and not self.pauses:
            return None  # a stopping scheduler only ever suggests new trials
        suggestion = self.scheduler.suggest(trial if may_start else next(self._unused_ids))
        if suggestion is None:
            return None
        if not suggestion.spawn_new_trial_id:
            return Resume(int(suggestion.checkpoint_trial_id))
        if not may_start:
            return None  # all trials started: a pause-and-resume scheduler's new one is not run
        config = {name: _plain(value) for name, value in suggestion.config.items()}
        self.trials[trial] = self.Trial(trial_id=trial, config=config, creation_time=datetime(2000, 1, 1))
        self.scheduler.on_trial_add(self.trials[trial])
        return Start(config)

    def report(self, trial: int, epoch: int, val_acc: float) -> str:
        result = {"epoch": epoch, METRIC: val_acc}
        self.last[trial] = result
        decision = self.scheduler.on_trial_result(self.trials[trial], result)
        if decision == self.Decision.CONTINUE:
            return CONTINUE
        self.scheduler.on_trial_remove(self.trials[trial])
        return STOP if decision == self.Decision.STOP else PAUSE

    def completed(self, trial: int) -> None:
        self.scheduler.on_trial_complete(self.trials[trial], self.last[trial])

    def preempted(self) -> Iterable[int]:
        return ()


def syne_tune_config_space(curves: Any) -> dict[str, Any]:
    from syne_tune.config_space import choice

    return {name: choice(list(values)) if len(values) > 1 else values[0] for name, values in curves.values.items()}


SYNE_TUNE = {
    # name: (class in syne_tune.optimizer.legacy_baselines, extra arguments, pauses and resumes)
    "mobster": ("MOBSTER", {}, False),  # ASHA (stopping) + GP multi-task searcher
    "hypertune": ("HyperTune", {"brackets": 2}, False),  # both brackets the rungs 1, 3 of 8 epochs allow
    "dyhpo": ("DyHPO", {}, True),  # pause and resume at rungs 1, 3, 5, 7 (its rung_increment 2)
    "bohb": ("BOHB", {}, False),  # ASHA (stopping) + multi-fidelity KDE searcher
    "bohb-d+1": ("BOHB", {}, False),  # the same, its KDE fit from d + 1 points on, as HpBandSter's BOHB
    "asha": ("ASHA", {}, False),  # Syne Tune's own ASHA with random search: a check of the simulator
}


def syne_tune_scheduler(name: str, curves: Any, seed: int, **overrides: Any) -> tuple[Any, bool]:
    """One of Syne Tune's baselines (its `legacy_baselines`, where MOBSTER, Hyper-Tune and DyHPO live in 0.14)."""
    _quiet_syne_tune()
    from syne_tune.optimizer import legacy_baselines

    class_name, extra, pauses = SYNE_TUNE[name]
    kwargs: dict[str, Any] = dict(
        metric=METRIC,
        mode="max",
        resource_attr="epoch",
        max_t=curves.epochs,
        grace_period=1,
        random_seed=seed,
        search_options={"debug_log": False},
    )
    if name != "dyhpo":
        kwargs["reduction_factor"] = ETA
    kwargs.update(extra)
    if name == "bohb-d+1":  # Syne Tune's default, d points, never fits: its KDE needs more than d good ones
        searched = sum(len(values) > 1 for values in curves.values.values())
        kwargs["search_options"] = {"debug_log": False, "num_min_data_points": searched + 1}
    kwargs.update(overrides)
    if class_name == "ASHA":
        kwargs.pop("search_options")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scheduler = getattr(legacy_baselines, class_name)(syne_tune_config_space(curves), **kwargs)
    return scheduler, pauses


def _fresh_gp_names() -> None:
    """Syne Tune's GP models name their parameters from a process-wide counter (its gluon NameManager), and the
    optimiser orders the parameter vector by sorted name, so a model's fit depends on how many models the process
    built before (10 sorts before 9): reset the counter, so each replay fits as in a fresh process."""
    from syne_tune.optimizer.schedulers.searchers.bayesopt.gpautograd import gluon

    gluon.NameManager._current.value = gluon.NameManager()


def syne_tune_peer(name: str) -> Callable[..., list[dict]]:
    def peer(curves: Any, samples: int = 40, seed: int = 0, concurrency: int = 4, stats: Stats | None = None):
        _fresh_gp_names()
        scheduler, pauses = syne_tune_scheduler(name, curves, seed)
        stats = stats or Stats()
        before = _CountNonFinite.count
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reports = simulate(SyneTuneEngine(scheduler, pauses), curves, samples, seed, concurrency, stats)
        if name.startswith("bohb"):
            stats.extra["kde_non_finite_candidates"] = _CountNonFinite.count - before
        return reports

    peer.__doc__ = f"Syne Tune's {SYNE_TUNE[name][0]}"
    return peer


syne_tune_mobster = syne_tune_peer("mobster")
syne_tune_hypertune = syne_tune_peer("hypertune")
syne_tune_dyhpo = syne_tune_peer("dyhpo")
syne_tune_bohb = syne_tune_peer("bohb")
syne_tune_bohb_d1 = syne_tune_peer("bohb-d+1")
syne_tune_asha = syne_tune_peer("asha")


# -- Optuna alone: stock TPE and its own pruners, asynchronous through ask / tell ------------------------------


class OptunaEngine:
    """`study.ask()` when a worker frees up, `trial.report` + `trial.should_prune()` at every epoch, `study.tell`
    at the end: pruned trials as PRUNED (TPE then ranks them by their last intermediate value)."""

    def __init__(self, study: Any, values: dict[str, list]) -> None:
        self.study, self.values = study, values
        self.live: dict[int, Any] = {}
        self.last: dict[int, float] = {}

    def tick(self, now: float) -> None:
        pass  # the study's timestamps are wall clock; no decision reads them

    def next(self, trial: int, may_start: bool) -> Start | None:
        if not may_start:
            return None
        asked = self.study.ask()
        self.live[trial] = asked
        return Start({name: asked.suggest_categorical(name, values) for name, values in self.values.items()})

    def report(self, trial: int, epoch: int, val_acc: float) -> str:
        import optuna

        asked = self.live[trial]
        asked.report(val_acc, epoch)
        self.last[trial] = val_acc
        if asked.should_prune():
            self.study.tell(asked, state=optuna.trial.TrialState.PRUNED)
            return STOP
        return CONTINUE

    def completed(self, trial: int) -> None:
        self.study.tell(self.live[trial], self.last[trial])

    def preempted(self) -> Iterable[int]:
        return ()


def optuna_study(seed: int, pruner: Any) -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    # a fixed name: HyperbandPruner assigns brackets by crc32 of "<study name>_<trial number>"
    return optuna.create_study(
        study_name=f"peer-{seed}", direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed), pruner=pruner
    )


def optuna_peer(pruner_name: str) -> Callable[..., list[dict]]:
    def peer(curves: Any, samples: int = 40, seed: int = 0, concurrency: int = 4, stats: Stats | None = None):
        import optuna

        if pruner_name == "hyperband":
            pruner = optuna.pruners.HyperbandPruner(min_resource=1, max_resource=curves.epochs, reduction_factor=ETA)
        else:
            pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=ETA)
        engine = OptunaEngine(optuna_study(seed, pruner), curves.values)
        return simulate(engine, curves, samples, seed, concurrency, stats or Stats())

    peer.__doc__ = f"Optuna alone: TPESampler(seed) + {pruner_name} pruner"
    return peer


optuna_tpe_hyperband = optuna_peer("hyperband")
optuna_tpe_sha = optuna_peer("successive_halving")


PEERS: dict[str, Callable[..., list[dict]]] = {
    "wandb-bayes": wandb_bayes,
    "wandb-bayes+hyperband": wandb_bayes_hyperband,
    "wandb-random+hyperband": wandb_random_hyperband,
    "synetune-mobster": syne_tune_mobster,
    "synetune-hypertune": syne_tune_hypertune,
    "synetune-dyhpo": syne_tune_dyhpo,
    "synetune-bohb": syne_tune_bohb,
    "synetune-bohb(d+1)": syne_tune_bohb_d1,
    "synetune-asha": syne_tune_asha,
    "optuna-tpe+hyperband": optuna_tpe_hyperband,
    "optuna-tpe+sha": optuna_tpe_sha,
}


# -- what a suggestion costs once a search is large ------------------------------------------------------------


def suggestion_cost(engine: str, n_told: int = 200, curves: Any = None, repeats: int = 3, seed: int = 0) -> float:
    """Seconds the searcher takes for one suggestion once `n_told` trials were told (mean of `repeats`).

    GP searchers refit on every observation, so their cost grows with the search (W&B's bayes caps its GP at
    100 sampled runs). `engine`: "wandb-bayes", "synetune-mobster" or "optuna-tpe". The told trials are random
    configurations of the grid with their recorded curves (all epochs; MOBSTER's ASHA stops some at its rungs).
    """
    if curves is None:
        curves = _default_curves()
    rng = np.random.default_rng(seed)
    keys = list(curves.curves)
    recording = curves.seeds[0]
    told = [keys[i] for i in rng.integers(len(keys), size=n_told)]
    if engine == "wandb-bayes":
        import sweeps

        config = wandb_sweep_config(curves, "bayes", hyperband=False)
        runs = []
        for index, key in enumerate(told):
            accuracies = curves.curves[key][recording][0]
            runs.append(
                sweeps.SweepRun(
                    name=f"told-{index}",
                    state=sweeps.RunState.finished,
                    config={name: {"value": value} for name, value in zip(curves.values, key)},
                    history=[{METRIC: float(a), "epoch": e} for e, a in enumerate(accuracies, start=1)],
                    summary_metrics={METRIC: float(accuracies[-1])},
                )
            )
        own = _OwnGlobalRandom(seed)

        def suggest() -> None:
            with own.active(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sweeps.next_run(config, runs)

    elif engine == "synetune-mobster":
        # told straight to its searcher at the rung levels (1, 3 and the full 8 epochs), each trial as far as
        # successive halving with eta 3 would have let it go (all reach 1, the top third 3, the top ninth 8):
        # the data MOBSTER's GP holds after n_told trials. (Its scheduler cannot be driven for n_told trials of a
        # grid of fewer configurations: its searchers never suggest a configuration twice.)
        _fresh_gp_names()
        scheduler, _ = syne_tune_scheduler(
            "mobster", curves, seed, search_options={"debug_log": False, "allow_duplicates": True}
        )
        scheduler._initialize_searcher()  # what its first suggest() would do
        levels = [1, ETA, curves.epochs]
        reached = np.ones(n_told, dtype=int)
        for rung, level in enumerate(levels[:-1]):
            alive = np.flatnonzero(reached > rung)
            scores = [curves.curves[told[i]][recording][0][level - 1] for i in alive]
            keep = alive[np.argsort(scores)[::-1][: max(1, len(alive) // ETA)]]
            reached[keep] += 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for index, key in enumerate(told):
                accuracies, config = curves.curves[key][recording][0], dict(zip(curves.values, key))
                for level in levels[: reached[index]]:
                    result = {"epoch": level, METRIC: float(accuracies[level - 1])}
                    scheduler.searcher.on_trial_result(str(index), config, result=result, update=True)
        counter = itertools.count(n_told)

        def suggest() -> None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                scheduler.suggest(next(counter))  # fits the GP on all the rung data; left pending, as in a search

    elif engine == "optuna-tpe":
        import optuna

        study = optuna_study(seed, optuna.pruners.NopPruner())
        distributions = {
            name: optuna.distributions.CategoricalDistribution(values) for name, values in curves.values.items()
        }
        for key in told:
            accuracies = curves.curves[key][recording][0]
            study.add_trial(
                optuna.trial.create_trial(
                    params=dict(zip(curves.values, key)),
                    distributions=distributions,
                    value=float(accuracies[-1]),
                    intermediate_values={e: float(a) for e, a in enumerate(accuracies, start=1)},
                )
            )

        def suggest() -> None:
            asked = study.ask()
            for name, values in curves.values.items():
                asked.suggest_categorical(name, values)
            study.tell(asked, state=optuna.trial.TrialState.FAIL)  # keeps the told set as it was

    else:
        raise ValueError(f"unknown engine {engine!r}: wandb-bayes, synetune-mobster or optuna-tpe")
    began = time.perf_counter()
    for _ in range(repeats):
        suggest()
    return (time.perf_counter() - began) / repeats


def _default_curves() -> Any:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_strategies import HERE, Curves

    return Curves(HERE / "data" / "curves_digits.parquet")


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def versions() -> dict[str, str]:
    """The exact versions of the peers' libraries (and the numerics they ran on)."""
    found = {}
    for name in ("sweeps", "syne-tune", "optuna", "numpy", "scipy", "scikit-learn", "autograd", "statsmodels"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found
