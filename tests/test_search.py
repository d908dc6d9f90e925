"""The search on real Ray (local, 2 CPUs): the demo search, ASHA, Optuna's view, grids, resources."""

from __future__ import annotations

import glob
import logging
import pickle
from pathlib import Path

import pandas as pd
import pytest
from optuna.trial import TrialState

from tune_inat.data.dataset import DataConfig
from tune_inat.errors import UserError
from tune_inat.job import prepare_data
from tune_inat.resources import plan_resources
from tune_inat.space import load_space, with_fixed, with_overrides
from tune_inat.tuner import run_search


def test_demo_search_completes(demo_search) -> None:
    grid = demo_search.grid
    assert len(grid) == 8 and not grid.errors
    trials = pd.read_parquet(demo_search.folder / "trials.parquet")
    assert len(trials) == 8 and set(trials["status"]) <= {"completed", "stopped_early"}
    assert trials["best_val_acc"].max() > 0.3  # something learned well above chance (0.1)


def test_asha_stops_trials_early(demo_search) -> None:
    trials = pd.read_parquet(demo_search.folder / "trials.parquet")
    stopped = trials[trials["status"] == "stopped_early"]
    assert len(stopped) >= 1
    assert (stopped["epochs_run"] < stopped["max_epochs"]).all()
    completed = trials[trials["status"] == "completed"]
    assert (completed["epochs_run"] == completed["max_epochs"]).all()


def test_optuna_was_told_pruned_trials_were_pruned(demo_search) -> None:
    state_files = sorted(glob.glob(str(demo_search.folder / "searcher-state-*.pkl")))
    assert state_files
    with open(state_files[-1], "rb") as f:
        searcher_state = pickle.load(f)
    study = searcher_state["_ot_study"]
    states = [t.state for t in study.get_trials(deepcopy=False)]
    trials = pd.read_parquet(demo_search.folder / "trials.parquet")
    assert states.count(TrialState.PRUNED) == (trials["status"] == "stopped_early").sum() >= 1
    assert states.count(TrialState.COMPLETE) == (trials["status"] == "completed").sum()
    pruned = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.PRUNED]
    assert all(t.intermediate_values for t in pruned)  # their early scores kept as intermediate values


def test_each_trial_checkpointed_with_at_most_two_kept(demo_search) -> None:
    for trial_dir in demo_search.folder.glob("trial_*"):
        checkpoints = list(trial_dir.glob("checkpoint_*"))
        assert 1 <= len(checkpoints) <= 2, trial_dir
        assert all((c / "fine_tuning.pt").is_file() for c in checkpoints)


def test_seed_sweep_runs_as_a_twelve_trial_grid(ray_cluster, demo_root: Path, tmp_path: Path) -> None:
    spec = with_fixed(load_space("seed_sweep"), {"weights": "none", "image_size": 32, "backbone": "resnet18"})
    spec = with_overrides(spec, max_epochs=1, gpus_per_trial=0, cpus_per_trial=1)
    data_config = DataConfig(demo_root, tmp_path / "cache", progress=False)
    grid = run_search(spec, data_config, prepare_data(spec, data_config), str(tmp_path), "sweep", verbose=0).grid
    assert len(grid) == 12 and not grid.errors
    configs = {(r.config["freeze_fraction"], r.config["epochs"], r.config["batch_size"]) for r in grid}
    assert configs == {(f, e, b) for f in (0.7, 0.8, 0.9) for e in (5, 7) for b in (32, 64)}
    trials = pd.read_parquet(tmp_path / "sweep" / "trials.parquet")
    assert (trials["epochs_run"] == 1).all() and (trials["status"] == "completed").all()


def test_random_search_samples_the_space(ray_cluster, demo_root: Path, tmp_path: Path) -> None:
    spec = with_fixed(load_space("demo"), {"image_size": 32})
    spec = with_overrides(spec, searcher="random", num_samples=3, max_epochs=1, scheduler="fifo", reproducible=False)
    data_config = DataConfig(demo_root, tmp_path / "cache", progress=False)
    grid = run_search(spec, data_config, prepare_data(spec, data_config), str(tmp_path), "random", verbose=0).grid
    configs = [r.config for r in grid]
    assert len(configs) == 3 and not grid.errors
    assert all({"backbone", "freeze_fraction", "lr", "batch_size"} <= set(c) for c in configs)
    assert len({c["lr"] for c in configs}) == 3  # sampled, not the defaults


def test_fractional_gpus_are_reserved_as_asked(ray_cluster, demo_root: Path, tmp_path: Path) -> None:
    spec = with_fixed(load_space("demo"), {"backbone": "resnet18", "image_size": 32})
    spec = with_overrides(spec, num_samples=2, max_epochs=1, gpus_per_trial=0.25, cpus_per_trial=1)
    data_config = DataConfig(demo_root, tmp_path / "cache", progress=False)
    grid = run_search(spec, data_config, prepare_data(spec, data_config), str(tmp_path), "fractional", verbose=0).grid
    assert len(grid) == 2 and not grid.errors
    for trial in grid._experiment_analysis.trials:
        assert trial.placement_group_factory.required_resources == {"CPU": 1.0, "GPU": 0.25}
    assert all(r.metrics["gpu_share"] == 0.25 and r.metrics["cpus"] == 1.0 for r in grid)


def test_resource_plan_against_the_cluster(caplog) -> None:
    demo = load_space("demo")
    gpu_space = with_overrides(demo, gpus_per_trial=0.25, cpus_per_trial=2, num_samples=20)
    plan = plan_resources(gpu_space, [{"CPU": 16, "GPU": 1}, {"CPU": 8, "GPU": 2}])
    assert plan.gpus == 0.25 and plan.cpus == 2 and plan.max_concurrent == 4 + 4  # CPUs bind the second node
    with caplog.at_level(logging.WARNING):
        cpu_plan = plan_resources(gpu_space, [{"CPU": 2}])
    assert cpu_plan.gpus == 0 and "no GPU in the Ray cluster" in caplog.text
    with pytest.raises(UserError, match="gpus_per_trial 2 is more than any node has"):
        plan_resources(with_overrides(demo, gpus_per_trial=2), [{"CPU": 8, "GPU": 1}])
    with pytest.raises(UserError, match="cpus_per_trial 64 is more than any node has"):
        plan_resources(with_overrides(demo, cpus_per_trial=64), [{"CPU": 8}])


def test_clean_checkpoints_keeps_only_the_best(demo_search, tmp_path: Path, capsys) -> None:
    import shutil

    from tune_inat.clean import main as clean_main
    from tune_inat.results import rank_trials

    copy = tmp_path / "demo-test"
    shutil.copytree(demo_search.folder, copy)
    before = list(copy.glob("trial_*/checkpoint_*"))
    original = list(demo_search.folder.glob("trial_*/checkpoint_*"))
    code = clean_main([str(copy)])
    assert code == 0, capsys.readouterr().err
    left = list(copy.glob("trial_*/checkpoint_*"))
    assert len(before) > 1 and len(left) == 1
    assert list(demo_search.folder.glob("trial_*/checkpoint_*")) == original  # the copy's own checkpoints only
    best = rank_trials(pd.read_parquet(copy / "trials.parquet"), "max").iloc[0]
    assert left[0].parent.name.endswith(best["trial_id"])
    assert "freed" in capsys.readouterr().out
