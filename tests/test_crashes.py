"""The kill matrix: SIGKILL a real search's whole process group at each moment of its life, resume, lose nothing.

After each kill the same command with `--resume` must finish the search, and the tables must hold
every epoch Ray recorded (each trial's `result.json`), once each, epochs 1..n without gaps.
"""

from __future__ import annotations

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


def _unwritten_checkpointed_epoch(folder: Path) -> bool:
    """An epoch is in a checkpoint (Ray counts it done) but not yet in epochs.parquet: rows wait in memory."""
    written = written_epochs(folder)
    return any(epochs - written.get(trial, set()) for trial, epochs in checkpointed_epochs(folder).items())


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


# the moments of the two bugs this matrix was built for run in CI; the others with `pytest -m extended`
IN_EVERY_RUN = ("right-after-tuner-pkl", "between-flushes")


@pytest.mark.slow
@pytest.mark.parametrize(
    "moment", [m if m in IN_EVERY_RUN else pytest.param(m, marks=pytest.mark.extended) for m in MOMENTS]
)
def test_sigkill_at_any_moment_then_resume_loses_nothing(moment: str, tmp_path: Path, shared_cache: Path) -> None:
    env = {"TUNE_INAT_CACHE": str(shared_cache)}
    args = [*SMALL_SEARCH, "--results", "results", "--name", "hurt"]
    folder = tmp_path / "results" / "hurt"
    process = start_search(args, tmp_path, env)
    wait_until(lambda: MOMENTS[moment](folder), process)
    if moment == "between-flushes":
        missing_before = {t: e - written_epochs(folder).get(t, set()) for t, e in checkpointed_epochs(folder).items()}
    kill_group(process)
    if moment == "between-flushes":  # the kill really caught rows that were only in memory
        assert any(missing_before.values())
    before = pd.read_parquet(folder / "epochs.parquet") if written_epochs(folder) else None

    resumed = run_cli("tune_inat.search", *args, "--resume", env=env, timeout=600, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Traceback" not in resumed.stderr
    assert_complete(folder, TRIALS, EPOCHS)
    if (
        before is not None
    ):  # rows written before the kill are kept as they were (an epoch re-run keeps its first record)
        after = pd.read_parquet(folder / "epochs.parquet")
        kept = before.merge(after, on=["trial_id", "epoch"], suffixes=("_before", "_after"))
        assert len(kept) == len(before)
        assert (kept["timestamp_before"] == kept["timestamp_after"]).all()
        assert (kept["val_acc_before"] == kept["val_acc_after"]).all()
    if moment == "between-flushes":
        written = written_epochs(folder)
        assert all(epochs <= written[trial] for trial, epochs in missing_before.items())


@pytest.mark.slow
def test_killed_before_anything_was_written_says_how_to_start_afresh(tmp_path: Path, shared_cache: Path) -> None:
    env = {"TUNE_INAT_CACHE": str(shared_cache)}
    args = [*SMALL_SEARCH, "--results", "results", "--name", "early"]
    process = start_search(args, tmp_path, env)
    time.sleep(0.5)  # still importing: nothing of the search exists yet
    kill_group(process)
    assert not (tmp_path / "results" / "early" / "search.json").exists()
    resumed = run_cli("tune_inat.search", *args, "--resume", env=env, cwd=tmp_path)
    errors = [line for line in resumed.stderr.splitlines() if line.startswith("error:")]
    assert resumed.returncode == 2 and len(errors) == 1 and "Traceback" not in resumed.stderr
    assert "nothing to resume" in errors[0] and "without --resume" in errors[0]
    afresh = run_cli("tune_inat.search", *args, env=env, timeout=600, cwd=tmp_path)
    assert afresh.returncode == 0, afresh.stderr[-3000:]
    assert_complete(tmp_path / "results" / "early", TRIALS, EPOCHS)


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
