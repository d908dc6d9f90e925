"""The kill matrix: SIGKILL a real search's whole process group at each moment of its life, resume, lose nothing.

After each kill the same command with `--resume` must finish the search, and the tables must hold
every epoch Ray recorded (each trial's `result.json`), once each, epochs 1..n without gaps.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from conftest import run_cli
from crash_helpers import (
    SMALL_SEARCH,
    assert_complete,
    checkpointed_epochs,
    kill_group,
    start_search,
    wait_until,
    written_epochs,
)

TRIALS, EPOCHS = 2, 3


def _only_in_checkpoints(folder: Path) -> dict[str, set[int]]:
    """Per trial, the epochs in its checkpoints (Ray counts them done) but not yet in epochs.parquet."""
    written = written_epochs(folder)
    return {trial: epochs - written.get(trial, set()) for trial, epochs in checkpointed_epochs(folder).items()}


def _unwritten_checkpointed_epoch(folder: Path) -> bool:
    """Rows wait in memory: the moment between two writes."""
    return any(_only_in_checkpoints(folder).values())


MOMENTS: dict[str, Callable[[Path], bool]] = {
    "right-after-tuner-pkl": lambda f: (f / "tuner.pkl").exists(),
    "mid-first-epoch": lambda f: any(f.glob("trial_*")) and not any(f.glob("trial_*/checkpoint_*")),
    "between-flushes": _unwritten_checkpointed_epoch,
    "at-trial-end": lambda f: any((f / "trials.parquet").glob("part-*")) if (f / "trials.parquet").exists() else False,
    "during-the-summary": lambda f: (f / "best_config.yaml").exists(),
}


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def _kept_as_written(before: pd.DataFrame, after: pd.DataFrame) -> None:
    """Rows written before a kill are kept as they were (an epoch re-run keeps its first record)."""
    kept = before.merge(after, on=["trial_id", "epoch"], suffixes=("_before", "_after"))
    assert len(kept) == len(before)
    assert (kept["timestamp_before"] == kept["timestamp_after"]).all()
    assert (kept["val_acc_before"] == kept["val_acc_after"]).all()


def _killed_while_starting_then_started_afresh(args: list[str], folder: Path, cwd: Path, env: dict) -> None:
    """Killed while still importing, nothing of the search exists: `--resume` says how to start afresh."""
    process = start_search(args, cwd, env)
    time.sleep(0.5)
    kill_group(process)
    assert not (folder / "search.json").exists()
    resumed = run_cli("tune_inat.search", *args, "--resume", env=env, cwd=cwd)
    errors = [line for line in resumed.stderr.splitlines() if line.startswith("error:")]
    assert resumed.returncode == 2 and len(errors) == 1 and "Traceback" not in resumed.stderr
    assert "nothing to resume" in errors[0] and "without --resume" in errors[0]


@pytest.mark.slow
def test_one_search_killed_at_every_moment_in_turn_then_resumed_loses_nothing(
    tmp_path: Path, shared_cache: Path
) -> None:
    """The whole matrix in one search: killed at each moment in the order a search meets them, resumed each time.

    Killed first while still starting (nothing written: `--resume` says so, and it starts afresh); every
    later kill hits a resumed search, so this also shows that a resume survives being killed.
    """
    env = {"TUNE_INAT_CACHE": str(shared_cache)}
    args = [*SMALL_SEARCH, "--results", "results", "--name", "hurt"]
    folder = tmp_path / "results" / "hurt"
    _killed_while_starting_then_started_afresh(args, folder, tmp_path, env)
    written_before_kills, caught_in_memory = [], {}
    process = start_search(args, tmp_path, env)
    for moment, reached in MOMENTS.items():
        wait_until(functools.partial(reached, folder), process)
        if moment == "between-flushes":
            caught_in_memory = _only_in_checkpoints(folder)
        kill_group(process)
        if written_epochs(folder):
            written_before_kills.append(pd.read_parquet(folder / "epochs.parquet"))
        process = start_search([*args, "--resume"], tmp_path, env)
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0 and "Traceback" not in err, err[-3000:]
    assert any(caught_in_memory.values())  # one kill really caught rows that were only in memory
    assert_complete(folder, TRIALS, EPOCHS)
    after = pd.read_parquet(folder / "epochs.parquet")
    for before in written_before_kills:
        _kept_as_written(before, after)
    written = written_epochs(folder)
    assert all(epochs <= written[trial] for trial, epochs in caught_in_memory.items())


@pytest.mark.slow
@pytest.mark.parametrize("moment", list(MOMENTS))
def test_sigkill_at_any_moment_then_resume_loses_nothing(moment: str, tmp_path: Path, shared_cache: Path) -> None:
    env = {"TUNE_INAT_CACHE": str(shared_cache)}
    args = [*SMALL_SEARCH, "--results", "results", "--name", "hurt"]
    folder = tmp_path / "results" / "hurt"
    process = start_search(args, tmp_path, env)
    wait_until(lambda: MOMENTS[moment](folder), process)
    if moment == "between-flushes":
        missing_before = _only_in_checkpoints(folder)
    kill_group(process)
    if moment == "between-flushes":  # the kill really caught rows that were only in memory
        assert any(missing_before.values())
    before = pd.read_parquet(folder / "epochs.parquet") if written_epochs(folder) else None

    resumed = run_cli("tune_inat.search", *args, "--resume", env=env, timeout=600, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Traceback" not in resumed.stderr
    assert_complete(folder, TRIALS, EPOCHS)
    if before is not None:
        _kept_as_written(before, pd.read_parquet(folder / "epochs.parquet"))
    if moment == "between-flushes":
        written = written_epochs(folder)
        assert all(epochs <= written[trial] for trial, epochs in missing_before.items())


def _saved_states_until(folder: Path, moment: Callable[[Path], bool], process) -> list[tuple[Path, bytes]]:
    """Every version of Ray's experiment state file as the search saved it, until `moment`."""
    versions: list[tuple[Path, bytes]] = []

    def record_then_check() -> bool:
        for path in folder.glob("experiment_state-*.json"):
            data = path.read_bytes()
            try:
                json.loads(data)
            except ValueError:
                continue  # being copied into place
            if not versions or versions[-1][1] != data:
                versions.append((path, data))
        return moment(folder)

    wait_until(record_then_check, process)
    return versions


@pytest.mark.slow
def test_resume_from_a_saved_state_that_names_a_checkpoint_ray_had_deleted(tmp_path: Path, shared_cache: Path) -> None:
    """Ray deletes a replaced checkpoint first and saves the state that names its successor after: a kill between."""
    from ray import tune

    env = {"TUNE_INAT_CACHE": str(shared_cache)}
    args = [*SMALL_SEARCH, "--results", "results", "--name", "lagging"]
    folder = tmp_path / "results" / "lagging"
    process = start_search(args, tmp_path, env)
    versions = _saved_states_until(folder, lambda f: any(f.glob("trial_*/checkpoint_000002")), process)
    kill_group(process)
    for path, data in reversed(versions):  # the newest saved state that names a checkpoint deleted since
        path.write_bytes(data)
        named = [Path(t.checkpoint.path) for t in tune.ExperimentAnalysis(str(folder)).trials if t.checkpoint]
        if not all(path.exists() for path in named):
            break
    else:
        pytest.fail(f"none of the {len(versions)} saved states names a deleted checkpoint")
    resumed = run_cli("tune_inat.search", *args, "--resume", env=env, timeout=600, cwd=tmp_path)
    assert resumed.returncode == 0 and "Traceback" not in resumed.stderr, resumed.stderr[-3000:]
    warnings = [line for line in resumed.stderr.splitlines() if "deleted just before the search stopped" in line]
    assert len(warnings) >= 1 and "resumes from its newest checkpoint" in warnings[0], resumed.stderr[-3000:]
    assert_complete(folder, TRIALS, EPOCHS)


def test_local_checkpoint_copies_of_killed_workers_are_removed(tmp_path: Path) -> None:
    """A SIGKILLed worker cannot remove its local checkpoint copy; the next trial on the machine does."""
    import os
    import subprocess
    import sys

    from tune_inat.trainable import EpochCheckpoints

    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / f"tune-inat-ckpt-{ended.stdout.strip()}-abc123"
    orphan.mkdir()
    (orphan / "fine_tuning.pt").write_bytes(b"weights")
    alive = tmp_path / f"tune-inat-ckpt-{os.getppid()}-def456"  # a running worker's copy stays
    alive.mkdir()
    unrelated = tmp_path / "tune-inat-ckpt-notapid"
    unrelated.mkdir()
    checkpoints = EpochCheckpoints(tmp_path)
    assert not orphan.exists() and alive.exists() and unrelated.exists()
    saved = checkpoints.save({"epoch": 1}, [{"epoch": 1}])
    assert saved.parent == tmp_path and saved.name.startswith(f"tune-inat-ckpt-{os.getpid()}-")
    checkpoints.discard()
    assert not saved.exists()
