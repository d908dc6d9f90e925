"""Trial faults injected into real trials: retry from checkpoint, errors recorded, out-of-memory handling."""

from __future__ import annotations

import glob
import json
import pickle
from pathlib import Path

import pandas as pd
import pytest
from optuna.trial import TrialState

from tune_inat.data.dataset import DataConfig
from tune_inat.faults import FaultInjector, parse_faults
from tune_inat.job import prepare_data
from tune_inat.space import load_space, with_fixed, with_overrides
from tune_inat.tuner import run_search


@pytest.fixture(scope="module")
def faulty_search(ray_cluster, demo_root: Path, tmp_path_factory: pytest.TempPathFactory):
    """Five trials of 3 epochs; trial 1 fails once, 2 always, 3 runs out of memory once, 4 always, 5 is clean."""
    spec = with_fixed(load_space("demo"), {"backbone": "resnet18", "image_size": 32})
    spec = with_overrides(
        spec, num_samples=5, max_epochs=3, scheduler="fifo", max_failures=1, cpus_per_trial=1, gpus_per_trial=0
    )
    data_config = DataConfig(demo_root, tmp_path_factory.mktemp("cache"), progress=False)
    results = tmp_path_factory.mktemp("results")
    faults = parse_faults("1:2:error:1,2:2:error:always,3:2:oom:1,4:2:oom:always")
    grid = run_search(
        spec,
        data_config,
        prepare_data(spec, data_config),
        str(results),
        "faulty",
        verbose=0,
        before_epoch=FaultInjector(faults),
    ).grid
    folder = results / "faulty"
    trials = pd.read_parquet(folder / "trials.parquet")
    numbers = {path.name.split("_")[2]: int(path.name.split("_")[1]) for path in folder.glob("trial_*_*")}
    trials["number"] = trials["trial_id"].map(numbers)
    return grid, folder, trials.set_index("number").sort_index(), pd.read_parquet(folder / "epochs.parquet")


def _reported_epochs(folder: Path, trial_id: str) -> list[int]:
    (trial_dir,) = folder.glob(f"trial_*_{trial_id}")
    lines = (trial_dir / "result.json").read_text().splitlines()
    return [json.loads(line)["epoch"] for line in lines if line.strip()]


def test_the_search_goes_on(faulty_search) -> None:
    grid, _, trials, _ = faulty_search
    assert len(grid) == 5 and len(trials) == 5
    assert trials.loc[5, "status"] == "completed"


def test_a_failed_trial_retries_from_its_checkpoint(faulty_search) -> None:
    grid, folder, trials, epochs = faulty_search
    row = trials.loc[1]
    assert row["status"] == "completed" and row["epochs_run"] == 3
    assert _reported_epochs(folder, row["trial_id"]) == [1, 2, 3]  # epoch 1 not trained again
    trial = next(t for t in grid._experiment_analysis.trials if t.trial_id == row["trial_id"])
    assert trial.run_metadata.num_failures == 1
    assert sorted(epochs[epochs["trial_id"] == row["trial_id"]]["epoch"]) == [1, 2, 3]


def test_a_trial_that_keeps_failing_is_recorded_as_error(faulty_search) -> None:
    _, _, trials, _ = faulty_search
    row = trials.loc[2]
    assert row["status"] == "error"
    assert row["error"] == "RuntimeError: injected fault at epoch 2"
    assert row["epochs_run"] == 1


def test_out_of_memory_retries_with_half_the_micro_batch(faulty_search) -> None:
    _, _, trials, epochs = faulty_search
    row = trials.loc[3]
    assert row["status"] == "completed"
    mine = epochs[epochs["trial_id"] == row["trial_id"]].sort_values("epoch")
    assert mine["micro_batch_size"].tolist() == [row["batch_size"], row["batch_size"] // 2, row["batch_size"] // 2]


def test_out_of_memory_twice_is_an_error_the_searcher_sees_as_failed(faulty_search) -> None:
    _, folder, trials, _ = faulty_search
    row = trials.loc[4]
    assert row["status"] == "error"
    assert row["error"].startswith("out of GPU memory: batch")
    with open(sorted(glob.glob(str(folder / "searcher-state-*.pkl")))[-1], "rb") as f:
        study = pickle.load(f)["_ot_study"]
    states = [t.state for t in study.get_trials(deepcopy=False)]
    assert states.count(TrialState.FAIL) == 2  # trials 2 and 4
    assert states.count(TrialState.COMPLETE) == 3


def test_fault_specs_are_checked() -> None:
    assert parse_faults("2:3:oom:always")[0].times == 0 and parse_faults("2:3:oom")[0].times == 1
    assert parse_faults("1:2:slow:3")[0].seconds == 3.0
    with pytest.raises(ValueError, match="error, oom or slow"):
        parse_faults("0:1:segfault")
