"""Helpers for tests that run the search as a user does and hurt it: start, watch, kill, resume, check."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd

# 2 trials of 3 epochs on the demo folder, at 32 px: each run takes seconds, both trials at once
SMALL_SEARCH = [
    "--demo",
    "--num-samples",
    "2",
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
    "--no-wandb",
]


def start_search(args: list[str], cwd: Path, env: dict[str, str], cpus: set[int] | None = None) -> subprocess.Popen:
    """`python -m tune_inat.search ARGS` in its own process group (so the test can kill all of it), on `cpus`."""
    process = subprocess.Popen(
        [sys.executable, "-m", "tune_inat.search", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    if cpus:  # before it starts Ray, whose processes inherit it
        os.sched_setaffinity(process.pid, cpus)
    return process


def wait_until(
    condition: Callable[[], bool], process: subprocess.Popen, timeout: float = 240, poll: float = 0.01
) -> None:
    deadline = time.time() + timeout
    while not condition():
        if process.poll() is not None:
            out, err = process.communicate()
            raise AssertionError(f"the search ended (code {process.returncode}) before the moment came:\n{err[-3000:]}")
        if time.time() > deadline:
            raise AssertionError(f"the moment did not come in {timeout} s")
        time.sleep(poll)


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the search's whole process group (the driver and the Ray it started), as a power cut would."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.communicate(timeout=60)
    time.sleep(1)  # let the kernel reap what it killed


def checkpointed_epochs(folder: Path) -> dict[str, set[int]]:
    """Per trial id, the epochs its checkpoints in storage list (what a resume can recover)."""
    found: dict[str, set[int]] = {}
    for history in folder.glob("trial_*/checkpoint_*/epochs.json"):
        try:
            epochs = {int(entry["epoch"]) for entry in json.loads(history.read_text())}
        except (OSError, ValueError):
            continue  # being written
        found.setdefault(history.parent.parent.name.split("_")[2], set()).update(epochs)
    return found


def written_epochs(folder: Path) -> dict[str, set[int]]:
    if not (folder / "epochs.parquet").exists():
        return {}
    try:
        epochs = pd.read_parquet(folder / "epochs.parquet")
    except (OSError, ValueError):  # an empty folder has no schema yet
        return {}
    return {t: set(rows["epoch"]) for t, rows in epochs.groupby("trial_id")}


def recorded_epochs(trial_dir: Path) -> list[int]:
    """The epochs of Ray's own record of a trial, its result.json (one line per report, re-runs included)."""
    path = trial_dir / "result.json"
    if not path.exists():
        return []
    return [json.loads(line)["epoch"] for line in path.read_text().splitlines() if line.strip()]


def assert_complete(folder: Path, trials: int, epochs: int) -> None:
    """Every trial finished with epochs 1..n once each, and every epoch Ray recorded is a row."""
    table = pd.read_parquet(folder / "epochs.parquet")
    finished = pd.read_parquet(folder / "trials.parquet")
    assert not table.duplicated(["trial_id", "epoch"]).any(), table[["trial_id", "epoch"]]
    assert not finished["trial_id"].duplicated().any()
    assert len(finished) == trials and (finished["status"] == "completed").all(), finished[["trial_id", "status"]]
    for trial_id in finished["trial_id"]:
        mine = sorted(table[table["trial_id"] == trial_id]["epoch"])
        assert mine == list(range(1, epochs + 1)), (trial_id, mine)
    for trial_dir in folder.glob("trial_*"):  # every epoch Ray recorded is a row
        trial_id = trial_dir.name.split("_")[2]
        mine = set(table[table["trial_id"] == trial_id]["epoch"])
        assert set(recorded_epochs(trial_dir)) <= mine, (trial_id, recorded_epochs(trial_dir), sorted(mine))
    assert set(table["trial_id"]) == set(finished["trial_id"])


OUTCOME_COLUMNS = ["trial_id", "status", "best_score", "epochs_run"]


def read_tables_until(folder: str, stop_file: str, cpus: set[int] | None = None) -> dict:
    """A reader of a running search's tables, in a no-sleep loop from its first rows until `stop_file` exists.

    `trials.parquet` (the table that gains rows as trials end) every time: its outcome columns through pyarrow (which
    pandas reads through), as a notebook watching the search would, and all of it through pandas every tenth time;
    `epochs.parquet` (many more parts) every hundredth. Run in processes of its own, several at once, on `cpus`
    (the search on others: how much each gets then does not depend on how the machine's scheduler weighs them).
    """
    import pyarrow.parquet as pq

    if cpus:
        os.sched_setaffinity(0, cpus)
    while not os.path.exists(os.path.join(folder, "epochs.parquet")) and not os.path.exists(stop_file):
        time.sleep(0.05)
    reads, failures, shapes, trial_counts = 0, [], set(), set()
    while not os.path.exists(stop_file):
        tables = ["trials.parquet", "epochs.parquet"] if reads % 100 == 0 else ["trials.parquet"]
        for table in tables:
            path = os.path.join(folder, table)
            if not os.path.exists(path):
                continue
            try:
                whole = reads % 10 == 0 or table == "epochs.parquet"
                frame = pd.read_parquet(path) if whole else pq.read_table(path, columns=OUTCOME_COLUMNS)
                if whole:
                    shapes.add((table, frame.shape[1]))
                if table == "trials.parquet":
                    trial_counts.add(frame.shape[0])
                reads += 1
            except Exception as err:  # any failure of a reader counts
                failures.append(f"{type(err).__name__}: {err}")
    return {"reads": reads, "failures": failures[:5], "shapes": shapes, "trial_counts": trial_counts}
