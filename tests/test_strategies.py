"""Search strategies beyond ASHA: PASHA's budget growth and stopping rule, recipes tried first, warm starts."""

from __future__ import annotations

import pickle
from pathlib import Path

import pandas as pd
import pytest
from conftest import run_cli
from ray.tune.schedulers import TrialScheduler

from tune_inat.errors import UserError
from tune_inat.results import rank_trials
from tune_inat.schedulers import PASHA
from tune_inat.space import load_space, parse_space, with_fixed, with_overrides


class FakeTrial:
    def __init__(self, trial_id: str) -> None:
        self.trial_id = trial_id


def _pasha(**options) -> PASHA:
    scheduler = PASHA(
        time_attr="epoch", metric="val_acc", mode="max", max_t=8, grace_period=1, reduction_factor=2, **options
    )
    return scheduler


def _report(scheduler: PASHA, trial: FakeTrial, epoch: int, value: float) -> str:
    return scheduler.on_trial_result(None, trial, {"epoch": epoch, "val_acc": value})


def test_pasha_starts_with_two_rungs_and_stops_trials_at_the_budget() -> None:
    scheduler = _pasha()
    a, b = FakeTrial("a"), FakeTrial("b")
    for trial in (a, b):
        scheduler.on_trial_add(None, trial)
    assert scheduler.budget == 2
    assert _report(scheduler, a, 1, 0.50) == TrialScheduler.CONTINUE
    assert _report(scheduler, b, 1, 0.55) == TrialScheduler.CONTINUE  # above rung 1's cut-off (ASHA's rule)
    assert _report(scheduler, a, 2, 0.60) == TrialScheduler.STOP  # the budget (2 epochs) is reached
    assert _report(scheduler, b, 2, 0.65) == TrialScheduler.STOP  # same order at both rungs: the budget stays
    assert scheduler.budget == 2 and not scheduler.budget_history


def _three_trials(scheduler: PASHA, at_rung_two: float) -> str:
    trials = {name: FakeTrial(name) for name in "abc"}
    for trial in trials.values():
        scheduler.on_trial_add(None, trial)
    for name, value in (("a", 0.50), ("b", 0.55), ("c", 0.60)):
        _report(scheduler, trials[name], 1, value)
    _report(scheduler, trials["a"], 2, 0.60)
    _report(scheduler, trials["b"], 2, 0.65)
    return _report(scheduler, trials["c"], 2, at_rung_two)


def test_pasha_grows_the_budget_when_the_top_rungs_disagree() -> None:
    scheduler = _pasha()
    # c was above b at rung 1 and is below it at rung 2: the ranking changed, so 2 epochs do not decide
    assert _three_trials(scheduler, 0.63) == TrialScheduler.CONTINUE
    assert scheduler.budget == 4 and scheduler.budget_history == [("c", 4)]
    c = FakeTrial("c")
    assert _report(scheduler, c, 3, 0.64) == TrialScheduler.CONTINUE
    assert _report(scheduler, c, 4, 0.66) == TrialScheduler.STOP  # the new budget


def test_pasha_counts_differences_within_epsilon_as_ties() -> None:
    scheduler = _pasha(epsilon=0.05)  # the same swap, by less than epsilon: noise
    assert _three_trials(scheduler, 0.63) == TrialScheduler.STOP
    assert scheduler.budget == 2


def test_pasha_still_cuts_like_asha_below_the_budget() -> None:
    scheduler = _pasha()
    trials = [FakeTrial(str(i)) for i in range(3)]
    for trial in trials:
        scheduler.on_trial_add(None, trial)
    _report(scheduler, trials[0], 1, 0.9)
    _report(scheduler, trials[1], 1, 0.8)
    assert _report(scheduler, trials[2], 1, 0.1) == TrialScheduler.STOP  # below the rung's top half


# -- recipes tried first ------------------------------------------------------------------------


def test_start_with_recipes_are_checked_against_the_space() -> None:
    base = {
        "parameters": {
            "backbone": {"values": ["resnet18", "resnet34"]},
            "lr": {"min": 1e-4, "max": 1e-2},
            "weights": {"value": "none"},
        }
    }
    spec = parse_space(
        {**base, "tune_inat": {"start_with": [{"backbone": "resnet34", "learning_rate": 1e-3}]}}, "inline"
    )
    assert spec.options.start_with == ({"backbone": "resnet34", "lr": 1e-3},)  # aliases read, types coerced
    for recipe, message in (
        ({"backbone": "vgg16"}, "not in the space"),
        ({"lr": 0.5}, "outside"),
        ({"epochs": 3}, "not a setting of this space"),
        ({"weights": "imagenet"}, "fixed at"),
    ):
        with pytest.raises(UserError, match=message):
            parse_space({**base, "tune_inat": {"start_with": [recipe]}}, "inline")
    fixed = with_fixed(spec, {"backbone": "resnet18"})  # a --set wins over the recipe's value
    assert fixed.options.start_with == ({"lr": 1e-3},)


def test_shipped_spaces_start_with_known_good_recipes() -> None:
    default, quick = load_space("default"), load_space("quick")
    assert {r["backbone"] for r in default.options.start_with} >= {"efficientnet_v2_s", "vit_b_16"}
    assert any(r["backbone"] == "efficientnet_v2_s" and r["image_size"] == 384 for r in default.options.start_with)
    assert {r["backbone"] for r in quick.options.start_with} == {"efficientnet_v2_s", "resnet50", "convnext_tiny"}
    assert {"mobilenet_v3_large", "efficientnet_b0"} <= set(default.values_of("backbone"))


# -- real searches: PASHA, and a warm start from the demo search ------------------------------------------


@pytest.mark.slow
def test_a_demo_search_with_pasha(tmp_path: Path, demo_root: Path) -> None:
    result = run_cli(
        "tune_inat.search",
        "--data",
        str(demo_root),
        "--space",
        "demo",
        "--scheduler",
        "pasha",
        "--no-reproducible",
        "--num-samples",
        "6",
        "--set",
        "backbone=resnet18",
        "--set",
        "image_size=32",
        "--no-wandb",
        "--quiet",
        "--results",
        str(tmp_path / "results"),
        "--name",
        "pasha",
        env={"TUNE_INAT_CACHE": str(tmp_path / "cache")},
        timeout=900,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    trials = pd.read_parquet(tmp_path / "results" / "pasha" / "trials.parquet")
    assert len(trials) == 6 and set(trials["status"]) <= {"completed", "stopped_early"}
    # trials end at a rung of the budget PASHA had then (1, 3 or 6 epochs with the default reduction factor 3)
    assert set(trials["epochs_run"]) <= {1, 3, 6}
    assert (trials["status"] == "stopped_early").any()


@pytest.mark.slow
def test_a_warm_start_learns_the_earlier_search_and_runs_its_best_recipes_first(demo_search, tmp_path: Path) -> None:
    result = run_cli(
        "tune_inat.search",
        "--data",
        str(demo_search.data_config.root),
        "--space",
        "demo",
        "--warm-start",
        str(demo_search.folder),
        "--num-samples",
        "4",
        "--max-epochs",
        "1",
        "--no-wandb",
        "--results",
        str(tmp_path / "results"),
        "--name",
        "warm",
        env={"TUNE_INAT_CACHE": str(tmp_path / "cache")},
        timeout=900,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    earlier = pd.read_parquet(demo_search.folder / "trials.parquet")
    finished = earlier[earlier["status"].isin(["completed", "stopped_early"])]
    assert (
        f"warm start from {demo_search.folder}: {len(finished)} of its {len(finished)} finished trials" in result.stderr
    )
    searched = ["backbone", "freeze_fraction", "lr", "batch_size"]
    best = rank_trials(finished[finished["status"] == "completed"], "max")[searched].head(3)
    folder = tmp_path / "results" / "warm"
    trials = pd.read_parquet(folder / "trials.parquet")
    numbers = {p.name.split("_")[2]: int(p.name.split("_")[1]) for p in folder.glob("trial_*_*")}
    first = trials.assign(number=trials["trial_id"].map(numbers)).sort_values("number")[searched].head(3)
    pd.testing.assert_frame_equal(first.reset_index(drop=True), best.reset_index(drop=True), check_dtype=False)
    with open(sorted(folder.glob("searcher-state-*.pkl"))[-1], "rb") as state:
        study = pickle.load(state)["_ot_study"]
    assert len(study.trials) >= len(finished) + 4  # the earlier trials, then this search's


def test_a_warm_start_from_another_metric_is_refused(demo_search) -> None:
    from tune_inat.warm import warm_start

    spec = with_overrides(load_space("demo"))
    loss = parse_space(
        {
            "metric": {"name": "val_loss", "goal": "minimize"},
            "parameters": {"backbone": {"values": ["resnet18", "resnet34"]}},
        },
        "inline",
    )
    with pytest.raises(UserError, match="ranked by val_acc"):
        warm_start(loss, str(demo_search.folder))
    with pytest.raises(UserError, match="ran on"):
        warm_start(spec, str(demo_search.folder), Path("/elsewhere"))
