"""Interrupt a real search (Ctrl-C, or the driver SIGKILLed), resume it, and check nothing is lost or doubled."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import run_cli

SEARCH = [
    "--demo",
    "--num-samples",
    "3",
    "--max-epochs",
    "3",
    "--scheduler",
    "fifo",
    "--cpus-per-trial",
    "1",
    "--set",
    "backbone=resnet18",
    "--set",
    "image_size=32",
    "--quiet",
    "--name",
    "interrupted",
]  # wandb on


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def _wait_for_rows(path: Path, rows: int, process: subprocess.Popen, timeout: float = 240) -> pd.DataFrame:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, process.communicate()[1][-3000:]
        if path.exists():
            epochs = pd.read_parquet(path)
            if len(epochs) >= rows:
                return epochs
        time.sleep(0.2)
    raise AssertionError(f"no {rows} epoch rows in {timeout} s")


@pytest.mark.parametrize("how", ["SIGINT"])  # SIGKILL at every moment: test_crashes.py
def test_interrupted_search_resumes_without_losing_or_doubling_rows(
    how: str, tmp_path: Path, shared_cache: Path
) -> None:
    secret = "k" * 40  # a wandb API key: must never reach the results
    wandb_env = {"WANDB_MODE": "offline", "WANDB_API_KEY": secret}
    env = {**os.environ, "TUNE_INAT_CACHE": str(shared_cache), "PYTHONUNBUFFERED": "1", **wandb_env}
    args = [*SEARCH, "--results", "results"]  # relative, as the README's demo command leaves it
    process = subprocess.Popen(
        [sys.executable, "-m", "tune_inat.search", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    folder = tmp_path / "results" / "interrupted"
    before = _wait_for_rows(folder / "epochs.parquet", 3, process)
    interrupted = time.monotonic()
    process.send_signal(getattr(signal, how))
    _, stderr = process.communicate(timeout=120)
    if how == "SIGINT":
        assert process.returncode == 130, stderr[-3000:]
        assert time.monotonic() - interrupted < 20  # wandb's offline runs are closed, not waited for (was 5 min)
        assert "resume with: python -m tune_inat.search" in stderr and "--resume --name interrupted" in stderr
    else:
        assert process.returncode == -signal.SIGKILL
    time.sleep(2)  # let the killed driver's Ray processes go
    before = pd.read_parquet(folder / "epochs.parquet")  # everything written before the interruption

    resumed = run_cli(
        "tune_inat.search",
        *args,
        "--resume",
        env={"TUNE_INAT_CACHE": str(shared_cache), **wandb_env},
        timeout=600,
        cwd=tmp_path,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    epochs = pd.read_parquet(folder / "epochs.parquet")
    trials = pd.read_parquet(folder / "trials.parquet")
    assert len(trials) == 3 and (trials["status"] == "completed").all()
    assert len(epochs) == 3 * 3 and not epochs.duplicated(["trial_id", "epoch"]).any()
    for path in folder.rglob("*"):  # Parquet, wandb's offline runs, Ray's state
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    # rows written before the interruption are still there, and epochs already trained were not trained again
    merged = before.merge(epochs, on=["trial_id", "epoch"], suffixes=("_before", "_after"))
    assert len(merged) == len(before)
    first_epochs = merged[merged["epoch"] == 1]
    assert len(first_epochs) >= 1
    assert (first_epochs["timestamp_before"] == first_epochs["timestamp_after"]).all()
    assert (first_epochs["val_acc_before"] == first_epochs["val_acc_after"]).all()
    if how == "SIGINT":  # the finished search ends as any search does: leaderboard, best config that train re-runs
        assert "Leaderboard: top 3 of 3 trials" in resumed.stdout
        best = folder / "best_config.yaml"
        settings = yaml.safe_load(best.read_text())
        assert settings["backbone"] == "resnet18" and settings["epochs"] == 3 and settings["image_size"] == 32
        rerun = run_cli(
            "tune_inat.train",
            "--demo",
            "--config",
            str(best),
            "--epochs",
            "1",
            "--output",
            str(tmp_path / "model.pt"),
            env={"TUNE_INAT_CACHE": str(shared_cache)},
        )
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        assert rerun.stdout.count("epoch ") == 1 and (tmp_path / "model.pt").is_file()
