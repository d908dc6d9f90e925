"""Trial schedulers beyond Ray's own: ASHA that decides in trial order, for searches that repeat exactly.

Ray's ASHA decides at each rung against the trials that happened to report there first, so the
same seed can stop a different trial when timing differs. `OrderedASHA` takes every rung decision
as ASHA would if trials reported in the order they were created: a trial that reaches a rung
before an earlier trial has resolved it (reported there, or ended) is paused, and decided (stopped,
or resumed from its checkpoint) once the earlier ones have. Same per-trial metrics, same decisions.
The cost: paused trials wait, and resuming one rebuilds its model from the checkpoint.
"""

from __future__ import annotations

import math
from typing import Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.schedulers.async_hyperband import _Bracket


class OrderedASHA(ASHAScheduler):
    """ASHA (one bracket) whose rung decisions follow trial creation order, not arrival order."""

    def __init__(self, **asha: Any) -> None:
        super().__init__(brackets=1, **asha)
        self._order: list[str] = []  # trial ids in creation order
        self._waiting: dict[str, dict] = {}  # paused at a rung: trial id -> the result that reached it
        self._resume: set[str] = set()  # decided to continue, to be resumed
        self._ended: set[str] = set()
        self._settling = False

    # -- Ray's scheduler hooks ------------------------------------------------------------------
    def on_trial_add(self, tune_controller: Any, trial: Trial) -> None:
        super().on_trial_add(tune_controller, trial)
        if trial.trial_id not in self._order:  # a restored search adds its trials again
            self._order.append(trial.trial_id)

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict) -> str:
        self._resume.discard(trial.trial_id)
        milestone = self._rung_reached(trial, result)
        if milestone is not None and not self._earlier_resolved(trial.trial_id, milestone):
            self._waiting[trial.trial_id] = result
            return TrialScheduler.PAUSE
        action = super().on_trial_result(tune_controller, trial, result)
        self._settle(tune_controller)
        return action

    def on_trial_complete(self, tune_controller: Any, trial: Trial, result: dict) -> None:
        super().on_trial_complete(tune_controller, trial, result)
        self._end(tune_controller, trial)

    def on_trial_remove(self, tune_controller: Any, trial: Trial) -> None:
        self._trial_info.pop(trial.trial_id, None)
        self._end(tune_controller, trial)

    def on_trial_error(self, tune_controller: Any, trial: Trial) -> None:
        self._trial_info.pop(trial.trial_id, None)
        self._end(tune_controller, trial)

    def choose_trial_to_run(self, tune_controller: Any) -> Trial | None:
        self._settle(tune_controller)
        trials = {t.trial_id: t for t in tune_controller.get_trials()}
        for trial_id in self._order:  # new trials first, then those decided to continue, oldest first
            trial = trials.get(trial_id)
            if trial is not None and trial.status == Trial.PENDING:
                return trial
        for trial_id in self._order:
            trial = trials.get(trial_id)
            if trial is not None and trial.status == Trial.PAUSED and trial_id in self._resume:
                return trial
        return None

    # -- the ordering ---------------------------------------------------------------------------
    def _rung_reached(self, trial: Trial, result: dict) -> float | None:
        """The rung milestone this result reaches for the first time (before max_t), else None."""
        if self._time_attr not in result or self._metric not in result or result[self._time_attr] >= self._max_t:
            return None
        for milestone, recorded in self._brackets[0]._rungs:  # highest first
            if result[self._time_attr] >= milestone:
                return None if trial.trial_id in recorded else milestone
        return None

    def _earlier_resolved(self, trial_id: str, milestone: float) -> bool:
        """Every trial created before `trial_id` has reported at `milestone`, or ended (and never will)."""
        recorded = dict(self._brackets[0]._rungs)[milestone]
        for earlier in self._order[: self._order.index(trial_id)]:
            if earlier not in recorded and earlier not in self._ended:
                return False
        return True

    def _end(self, tune_controller: Any, trial: Trial) -> None:
        self._ended.add(trial.trial_id)
        self._waiting.pop(trial.trial_id, None)
        self._resume.discard(trial.trial_id)
        self._settle(tune_controller)

    def _settle(self, tune_controller: Any) -> None:
        """Decide the paused trials whose earlier trials have all resolved their rung, oldest first."""
        if self._settling:
            return
        self._settling = True
        try:
            trials = {t.trial_id: t for t in tune_controller.get_trials()}
            progress = True
            while progress:
                progress = False
                for trial_id in [t for t in self._order if t in self._waiting]:
                    trial, result = trials.get(trial_id), self._waiting[trial_id]
                    if trial is None or trial.status != Trial.PAUSED:
                        continue  # still pausing: decided once it is paused
                    milestone = self._rung_reached(trial, result)
                    if milestone is not None and not self._earlier_resolved(trial_id, milestone):
                        continue
                    del self._waiting[trial_id]
                    progress = True
                    if super().on_trial_result(tune_controller, trial, result) == TrialScheduler.STOP:
                        stop_paused_trial(tune_controller, trial)
                    else:
                        self._resume.add(trial_id)
        finally:
            self._settling = False


def stop_paused_trial(tune_controller: Any, trial: Trial) -> None:
    """Stop a trial that waits paused (it has no actor), and make Ray save its new status.

    Ray 2.60's `stop_trial` marks a trial's saved state for rewriting only when it stops a live actor:
    a paused trial becomes TERMINATED in the run but stays PAUSED in the experiment state it saves, so
    a finished search read back looked unfinished (exit 130) and a resume would have run it again.
    """
    tune_controller.stop_trial(trial)
    tune_controller._mark_trial_to_checkpoint(trial)  # Ray's own hook for "this trial's saved state changed"


class PASHA(ASHAScheduler):
    """PASHA (Bohdal et al., ICLR 2023): ASHA whose maximum budget grows only while the ranking still changes.

    It starts with the two lowest rungs as the whole budget: a trial that reaches the top rung is
    stopped there (the budget is reached). Each time a trial reaches the top rung, the trials in the
    top two rungs are compared: if their order at the top rung differs from their order one rung
    below (by more than `epsilon`, so noise does not count), the budget grows by one rung, up to
    `max_t`. Made for "pick the recipe, then re-train it" (our `final`): it spends the full budget
    only when the low budgets do not already rank the configurations. Trials stopped at a smaller
    budget stay stopped when the budget grows (the stopping variant of PASHA, like Ray's ASHA).
    """

    def __init__(self, epsilon: float = 0.01, **asha: Any) -> None:
        super().__init__(brackets=1, **asha)
        self.epsilon = epsilon
        self._milestones = sorted(milestone for milestone, _ in self._brackets[0]._rungs)
        self._top = min(1, len(self._milestones) - 1)  # index of the rung that is the budget now
        self.budget_history: list[tuple[str, float]] = []  # (trial that made it grow, the new budget)

    @property
    def budget(self) -> float:
        """Epochs a trial may run now."""
        return self._milestones[self._top] if self._milestones else self._max_t

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict) -> str:
        if self._time_attr not in result or self._metric not in result:
            return TrialScheduler.CONTINUE
        reached = result[self._time_attr]
        if reached >= self._max_t or reached < self.budget:
            return super().on_trial_result(tune_controller, trial, result)
        action = super().on_trial_result(tune_controller, trial, result)  # records it at the top rung
        if self._ranking_changed() and self._top < len(self._milestones) - 1:
            self._top += 1
            self.budget_history.append((trial.trial_id, self.budget))
        if action == TrialScheduler.CONTINUE and reached >= self.budget:
            self._num_stopped += 1
            return TrialScheduler.STOP  # the budget is reached
        return action

    def _ranking_changed(self) -> bool:
        """Do the trials of the top rung rank differently there than one rung below (beyond epsilon)?"""
        if self._top == 0:
            return False
        rungs = dict(self._brackets[0]._rungs)
        upper, lower = rungs[self._milestones[self._top]], rungs[self._milestones[self._top - 1]]
        both = [t for t in upper if t in lower]
        for i, first in enumerate(both):
            for second in both[i + 1 :]:
                before = lower[first] - lower[second]
                after = upper[first] - upper[second]
                if (before > self.epsilon and after < -self.epsilon) or (
                    before < -self.epsilon and after > self.epsilon
                ):
                    return True
        return False


class BandBracket(_Bracket):
    """ASHA's bracket deciding at W&B's bands by W&B's rule (its `sweeps` engine, hyperband_stopping.py).

    At every result past the first band, the trial's latest band applies: its value there (strict) or its
    best so far (not strict) must not be below the value ranked int(n / eta) among the n trials that reached
    that band, itself included. W&B re-checks every running run at each poll, so a trial past a band can
    still be stopped there as later trials raise the bar; a Ray scheduler acts on a trial at its own
    results, so this re-checks at each of the trial's epochs. `recheck=False` decides once, when the trial
    reaches the band: the reproducible mode needs that, since who has reached a band later depends on timing.
    """

    def __init__(self, milestones: list[int], eta: float, strict: bool, recheck: bool = True) -> None:
        self.rf = eta
        self._rungs = [(milestone, {}) for milestone in sorted(milestones, reverse=True)]
        self._stop_last_trials = True
        self._strict = strict
        self._recheck = recheck
        self._best: dict[str, float] = {}  # best value so far of each trial (W&B's non-strict condition)

    def on_result(self, trial: Trial, cur_iter: int, cur_rew: float | None) -> str:
        if cur_rew is None:
            return TrialScheduler.CONTINUE
        if math.isnan(cur_rew):
            cur_rew = -math.inf  # a diverged value ranks last (sorting NaN would make the threshold arbitrary)
        self._best[trial.trial_id] = max(self._best.get(trial.trial_id, cur_rew), cur_rew)
        recorded = next((trials for milestone, trials in self._rungs if cur_iter >= milestone), None)  # latest band
        if recorded is None:
            return TrialScheduler.CONTINUE
        if trial.trial_id in recorded and not self._recheck:
            return TrialScheduler.CONTINUE
        recorded.setdefault(trial.trial_id, cur_rew)  # its value at the band (W&B's history[band - 1])
        ranked = sorted(recorded.values(), reverse=True)
        threshold = ranked[int((1.0 / self.rf) * len(ranked))]  # W&B's r = 1 / eta, then int(r * n)
        condition = recorded[trial.trial_id] if self._strict else self._best[trial.trial_id]
        return TrialScheduler.STOP if condition < threshold else TrialScheduler.CONTINUE


def use_bands(scheduler: ASHAScheduler, milestones: list[int], eta: float, strict: bool) -> ASHAScheduler:
    """Make a one-bracket ASHA (or OrderedASHA) decide at W&B's bands by W&B's rule (OrderedASHA: once per band)."""
    scheduler._brackets = [BandBracket(milestones, eta, strict, recheck=not isinstance(scheduler, OrderedASHA))]
    return scheduler
