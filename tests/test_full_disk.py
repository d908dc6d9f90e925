"""A full disk under a running search, on a real small tmpfs: rows wait in memory, none is lost, the exit is true."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import run_cli
from crash_helpers import SMALL_SEARCH, assert_complete, checkpointed_epochs, start_search, wait_until, written_epochs


@pytest.fixture()
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 400 MB tmpfs mounted for this test only (needs root, as CI has); unmounted even when the test fails."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=400m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill(disk: Path) -> None:
    """Take every free byte of the disk."""
    with open(disk / "filler", "wb") as out:
        try:
            while True:
                out.write(b"\0" * 2**20)
                out.flush()
        except OSError:
            pass
    index = 0
    while True:
        try:
            (disk / f"filler-{index}").write_bytes(b"\0" * 4096)
        except OSError:
            return
        index += 1


def free(disk: Path) -> None:
    for path in disk.glob("filler*"):
        path.unlink()


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.mark.slow
def test_results_disk_full_then_freed_mid_search_loses_nothing(small_disk: Path, tmp_path: Path) -> None:
    env = {"TUNE_INAT_CACHE": str(tmp_path / "cache")}
    args = [
        *SMALL_SEARCH,
        "--max-epochs",
        "12",
        "--set",
        "epochs=12",
        "--results",
        str(small_disk / "results"),
        "--storage-path",
        str(tmp_path / "storage"),
        "--name",
        "full",
    ]
    folder = small_disk / "results" / "full"
    process = start_search(args, tmp_path, env)
    wait_until(lambda: bool(checkpointed_epochs(tmp_path / "storage" / "full")), process)  # trials are training
    fill(small_disk)
    written = sum(map(len, written_epochs(folder).values()))
    # epochs end meanwhile and wait in memory
    wait_until(
        lambda: sum(map(len, checkpointed_epochs(tmp_path / "storage" / "full").values())) >= written + 2, process
    )
    time.sleep(6)  # longer than the 5 s between writes: at least one write fails
    free(small_disk)
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    assert "cannot write results to" in err and "written to" in err and "again" in err
    assert_complete(folder, 2, 12)
    import optuna  # the study's copy missed writes too (one warning), and caught up once the disk was freed

    study = optuna.load_study(study_name="full", storage=f"sqlite:///{folder / 'optuna.db'}")
    assert [len(t.intermediate_values) for t in study.trials] == [12, 12] and study.trials[0].state.is_finished()


@pytest.mark.slow
def test_results_disk_still_full_at_the_end_exits_1_then_resume_writes_everything(
    small_disk: Path, tmp_path: Path
) -> None:
    env = {"TUNE_INAT_CACHE": str(tmp_path / "cache")}
    args = [
        *SMALL_SEARCH,
        "--results",
        str(small_disk / "results"),
        "--storage-path",
        str(tmp_path / "storage"),
        "--name",
        "full",
    ]
    folder = small_disk / "results" / "full"
    process = start_search(args, tmp_path, env)
    wait_until(lambda: (folder / "search.json").exists(), process)
    fill(small_disk)
    out, err = process.communicate(timeout=600)
    assert process.returncode == 1, err[-3000:]
    assert len(_errors(err)) == 1 and "result rows could not be written to" in _errors(err)[0]
    assert str(folder) in _errors(err)[0] and "--resume" in _errors(err)[0]
    assert "Traceback" not in err
    free(small_disk)
    resumed = run_cli("tune_inat.search", *args, "--resume", env=env, timeout=600, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_complete(folder, 2, 3)


@pytest.mark.slow
def test_storage_disk_full_is_one_line_and_resume_still_works(small_disk: Path, tmp_path: Path) -> None:
    """Ray's own state on the full disk too: its failed writes leave empty and cut files that must not stop a resume."""
    env = {"TUNE_INAT_CACHE": str(tmp_path / "cache")}
    args = [*SMALL_SEARCH, "--results", str(small_disk / "results"), "--name", "full"]
    folder = small_disk / "results" / "full"
    process = start_search(args, tmp_path, env)
    wait_until(lambda: (folder / "search.json").exists(), process)
    fill(small_disk)
    out, err = process.communicate(timeout=600)
    assert process.returncode == 1, err[-3000:]
    assert len(_errors(err)) == 1 and "Traceback" not in err, err[-3000:]
    free(small_disk)
    resumed = run_cli("tune_inat.search", *args, "--resume", env=env, timeout=600, cwd=tmp_path)
    assert "Traceback" not in resumed.stderr and "EOFError" not in resumed.stderr, resumed.stderr[-3000:]
    if resumed.returncode == 0:  # the state Ray saved before the disk filled let the trials go on
        assert_complete(folder, 2, 3)
    else:  # the trials failed for the disk: said in one line, the rows Ray recorded all there
        assert resumed.returncode == 1 and len(_errors(resumed.stderr)) == 1, resumed.stderr[-3000:]
        assert "failed" in _errors(resumed.stderr)[0]
