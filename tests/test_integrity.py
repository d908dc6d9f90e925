"""One search per name, resume is the same search, damaged files are one line, readers never see half a table."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import run_cli, write_image
from crash_helpers import SMALL_SEARCH, assert_complete, read_tables_until, start_search, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory):
    """A small finished search, run from the command line; tests copy it before damaging anything."""
    root = tmp_path_factory.mktemp("finished")
    env = {"TUNE_INAT_CACHE": str(root / "cache")}
    result = run_cli(
        "tune_inat.search",
        *SMALL_SEARCH,
        "--results",
        str(root / "results"),
        "--name",
        "done",
        env=env,
        timeout=600,
        cwd=root,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return root, root / "results" / "done", env


def _one_error(stderr: str) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return errors[0]


# -- one search per name -----------------------------------------------------------------------


def test_a_new_search_on_a_finished_name_is_refused(finished) -> None:
    root, folder, env = finished
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}
    again = run_cli(
        "tune_inat.search", *SMALL_SEARCH, "--results", str(folder.parent), "--name", "done", env=env, cwd=root
    )
    error = _one_error(again.stderr)
    assert again.returncode == 2 and "already holds a search named done" in error
    assert "--resume --name done" in error and "another --name" in error
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()} == before


def test_automatic_names_never_collide(finished) -> None:
    from tune_inat.place import SearchPlace, new_name
    from tune_inat.space import load_space

    root, folder, _ = finished
    spec = load_space("demo")
    taken = new_name(spec, str(root / "results"), None)
    (root / "results" / taken).mkdir()
    (root / "results" / taken / "search.json").write_text("{}")
    assert new_name(spec, str(root / "results"), None) == f"{taken}-2"
    assert not SearchPlace.of(str(root / "results"), f"{taken}-2").holds_a_search()


# -- resume is the same search -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "change"),
    [
        (["--space", "quick"], "parameters."),
        (["--set", "lr=0.01"], "parameters.lr"),
        (["--seed", "3"], "seed 0 -> 3"),
        (["--scheduler", "asha"], "scheduler 'fifo' -> 'asha'"),
    ],
)
def test_resume_with_another_space_or_setting_is_refused(
    finished, tmp_path: Path, flags: list[str], change: str
) -> None:
    root, folder, env = finished
    copy = tmp_path / "results" / "done"
    shutil.copytree(folder, copy)
    resumed = run_cli(
        "tune_inat.search",
        *SMALL_SEARCH,
        "--results",
        str(copy.parent),
        "--name",
        "done",
        "--resume",
        *flags,
        env=env,
        cwd=root,
    )
    error = _one_error(resumed.stderr)
    assert resumed.returncode == 2 and "--resume continues search done as it was started" in error and change in error


def test_resume_with_a_different_metric_file_is_refused(finished, tmp_path: Path) -> None:
    root, folder, env = finished
    copy = tmp_path / "results" / "done"
    shutil.copytree(folder, copy)
    space = tmp_path / "loss.yaml"
    text = (Path(__file__).parents[1] / "search_spaces" / "demo.yaml").read_text()
    space.write_text(text.replace("name: val_acc\n  goal: maximize", "name: val_loss\n  goal: minimize"))
    resumed = run_cli(
        "tune_inat.search",
        *SMALL_SEARCH,
        "--space",
        str(space),
        "--results",
        str(copy.parent),
        "--name",
        "done",
        "--resume",
        env=env,
        cwd=root,
    )
    assert resumed.returncode == 2 and "metric val_acc -> val_loss" in _one_error(resumed.stderr)


def test_resume_of_a_finished_search_changes_nothing(finished, tmp_path: Path) -> None:
    root, folder, env = finished
    copy = tmp_path / "results" / "done"
    shutil.copytree(folder, copy)
    resumed = run_cli(
        "tune_inat.search",
        "--resume",
        "--results",
        str(copy.parent),
        "--name",
        "done",
        "--quiet",
        "--no-wandb",
        env=env,
        timeout=600,
        cwd=root,
    )  # no --demo, no --space: the saved search
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_complete(copy, 2, 3)
    assert pd.read_parquet(copy / "epochs.parquet").equals(pd.read_parquet(folder / "epochs.parquet"))


# -- damaged files: one line naming the file, exit 2 ----------------------------------------------


def _damage(path: Path, how: str) -> None:
    if how == "garbage":
        path.write_bytes(b"\x00garbage\xff" * 50)
    elif how == "cut":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(b"")


@pytest.mark.parametrize("target", ["trials-part", "epochs-part", "search.json"])
@pytest.mark.parametrize("how", ["garbage", "cut"])
def test_damaged_results_file_is_one_line_in_analyze_and_final(
    finished, tmp_path: Path, target: str, how: str, capsys
) -> None:
    from tune_inat.analyze import main as analyze_main
    from tune_inat.final import main as final_main

    root, folder, env = finished
    copy = tmp_path / "done"
    shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("trial_*"))
    path = {
        "trials-part": next((copy / "trials.parquet").glob("part-*")),
        "epochs-part": next((copy / "epochs.parquet").glob("part-*")),
        "search.json": copy / "search.json",
    }[target]
    _damage(path, how)
    for command, main in (("analyze", analyze_main), ("final", final_main)):
        code = main([str(copy), "--quiet"])
        error = _one_error(capsys.readouterr().err)
        assert code == 2 and str(path) in error, (command, error)


def test_a_damaged_part_is_recovered_by_resume(finished, tmp_path: Path) -> None:
    """A cut part of epochs.parquet: --resume sets it aside and writes its rows again from the checkpoints."""
    root, folder, env = finished
    copy = tmp_path / "results" / "done"
    shutil.copytree(folder, copy)
    part = next((copy / "epochs.parquet").glob("part-*"))
    _damage(part, "cut")
    resumed = run_cli(
        "tune_inat.search",
        "--resume",
        "--results",
        str(copy.parent),
        "--name",
        "done",
        "--quiet",
        "--no-wandb",
        env=env,
        timeout=600,
        cwd=root,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{part}:" in resumed.stderr and "set aside" in resumed.stderr
    assert_complete(copy, 2, 3)


@pytest.mark.parametrize("how", ["garbage", "cut", "empty"])
def test_damaged_best_config_is_one_line_in_train(finished, tmp_path: Path, how: str) -> None:
    root, folder, env = finished
    config = tmp_path / "best_config.yaml"
    shutil.copy(folder / "best_config.yaml", config)
    _damage(config, how)
    result = run_cli("tune_inat.train", "--demo", "--config", str(config), "--epochs", "1", env=env, cwd=root)
    assert result.returncode == 2 and str(config) in _one_error(result.stderr)


def test_damaged_model_files_are_one_line_in_predict(finished, tmp_path: Path) -> None:
    root, folder, env = finished
    model = tmp_path / "model.pt"
    trained = run_cli(
        "tune_inat.train", "--demo", "--epochs", "1", "--image-size", "32", "--output", str(model), env=env, cwd=root
    )
    assert trained.returncode == 0, trained.stderr[-2000:]
    image = write_image(tmp_path / "photo.jpg", size=(64, 64))
    payload = torch.load(model, weights_only=True)
    cases = {
        "no-weights": ({k: v for k, v in payload.items() if k != "state_dict"}, "has no state_dict"),
        "classes": ({**payload, "classes": payload["classes"][:4]}, "class list has 4 names but its head 10 outputs"),
        "cut": (None, "is not a tune-inat model file"),
    }
    for case, (content, message) in cases.items():
        broken = tmp_path / f"{case}.pt"
        if content is None:
            broken.write_bytes(model.read_bytes()[:1000])
        else:
            torch.save(content, broken)
        result = run_cli("tune_inat.predict", str(broken), str(image), env=env, cwd=root)
        error = _one_error(result.stderr)
        assert result.returncode == 2 and str(broken) in error and message in error, (case, error)


def test_damaged_image_cache_is_rebuilt_with_one_warning(finished, tmp_path: Path) -> None:
    root, _, env = finished
    cache_root = Path(env["TUNE_INAT_CACHE"])
    entries = [p.parent for p in cache_root.glob("37px-400img-*/meta.json")]  # the search's 32 px training pool
    assert len(entries) == 1
    images = entries[0] / "images.npy"
    original = np.array(np.load(images, mmap_mode="r"))
    for damage in ("truncate-images", "cut-meta", "change-a-row"):
        if damage == "truncate-images":
            data = images.read_bytes()
            images.write_bytes(data[: len(data) // 2])
        elif damage == "cut-meta":
            meta = (entries[0] / "meta.json").read_text()
            (entries[0] / "meta.json").write_text(meta[: len(meta) // 2])
        else:
            array = np.load(images, mmap_mode="r+")
            array[0] = 255 - array[0]
            array.flush()
            del array
        check = run_cli(
            "tune_inat.data",
            "check",
            str(cache_root / "demo-data-v1"),
            "--image-size",
            "32",
            "--cache-dir",
            str(cache_root),
            env=env,
            cwd=root,
        )
        assert check.returncode == 0, check.stderr[-2000:]
        warnings = [line for line in check.stderr.splitlines() if "is damaged" in line]
        assert len(warnings) == 1 and "rebuilding it" in warnings[0], (damage, check.stderr[-2000:])
        assert np.array_equal(np.load(images, mmap_mode="r"), original)


def test_damaged_checkpoint_fails_its_trial_with_one_line(finished, tmp_path: Path) -> None:
    from tune_inat.trainable import TrialFailure, load_checkpoint

    root, folder, _ = finished
    checkpoint = next(folder.glob("trial_*/checkpoint_*"))
    copy = tmp_path / checkpoint.name
    shutil.copytree(checkpoint, copy)
    _damage(copy / "fine_tuning.pt", "cut")
    with pytest.raises(TrialFailure, match=r"checkpoint .*fine_tuning.pt is damaged"):
        load_checkpoint(copy, str(copy))


# -- readers never see half a table ---------------------------------------------------------------


def _split_cpus() -> tuple[set[int] | None, set[int] | None]:
    """One of this process's cores for the search, the others for its readers (none where there is only one)."""
    cpus = sorted(os.sched_getaffinity(0))
    return ({cpus[0]}, set(cpus[1:])) if len(cpus) > 1 else (None, None)


def test_tables_read_in_a_loop_during_a_search_never_fail_and_its_name_is_locked(tmp_path: Path) -> None:
    env = {"TUNE_INAT_CACHE": str(tmp_path / "cache")}
    args = [
        *SMALL_SEARCH,
        "--num-samples",
        "6",
        "--max-epochs",
        "6",
        "--max-concurrent-trials",
        "1",
        "--results",
        str(tmp_path / "results"),
        "--name",
        "read",
    ]
    folder = tmp_path / "results" / "read"
    # the search (one trial at a time) on one core, two readers on the other: reading in a no-sleep loop, in
    # processes of their own, as notebooks watching the search would
    search_cpus, reader_cpus = _split_cpus()
    process = start_search(args, tmp_path, env, search_cpus)
    wait_until(lambda: (folder / "search.json").exists(), process)
    for extra in ([], ["--resume"]):  # a second search, or a resume, on the running search's name
        second = run_cli("tune_inat.search", *args, *extra, env=env, cwd=tmp_path)
        error = _one_error(second.stderr)
        assert second.returncode == 2 and "search read is already running" in error
        assert f"pid {process.pid}" in error and "host" in error
    stop_file = tmp_path / "stop-reading"
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as readers:
        seen = [readers.submit(read_tables_until, str(folder), str(stop_file), reader_cpus) for _ in range(2)]
        try:
            out, err = process.communicate()
        finally:
            stop_file.touch()
        seen = [reader.result() for reader in seen]
    assert process.returncode == 0, err[-3000:]
    reads = sum(reader["reads"] for reader in seen)
    failures = [failure for reader in seen for failure in reader["failures"]]
    trial_counts = set().union(*(reader["trial_counts"] for reader in seen))
    shapes = set().union(*(reader["shapes"] for reader in seen))
    print(f"{reads} reads while the search ran ({', '.join(str(reader['reads']) for reader in seen)})")
    # tens of thousands of reads, and they saw the table grow several times: the reads raced the writes
    assert reads >= 20_000 and len(trial_counts) >= 3 and not failures, (reads, sorted(trial_counts), failures)
    assert (
        len({columns for table, columns in shapes if table == "trials.parquet"}) == 1
    )  # never a table without its columns
    assert_complete(folder, 6, 6)  # the refused searches took nothing of it


def test_results_folder_deleted_mid_search_is_said_and_rewritten(tmp_path: Path) -> None:
    env = {"TUNE_INAT_CACHE": str(tmp_path / "cache")}
    args = [*SMALL_SEARCH, "--max-epochs", "5", "--results", str(tmp_path / "results"), "--name", "gone"]
    folder = tmp_path / "results" / "gone"
    process = start_search(args, tmp_path, env)
    wait_until(lambda: any(folder.glob("epochs.parquet/part-*")), process)
    before = pd.read_parquet(folder / "epochs.parquet")
    while folder.exists():  # Ray may be writing into it: remove until it is gone
        shutil.rmtree(folder, ignore_errors=True)
    out, err = process.communicate(timeout=600)
    assert process.returncode == 1 and "was deleted while the search ran" in _one_error(err)
    after = pd.read_parquet(folder / "epochs.parquet")
    assert set(zip(before["trial_id"], before["epoch"])) <= set(zip(after["trial_id"], after["epoch"]))
    assert json.loads((folder / "search.json").read_text())["name"] == "gone"
    assert "Written:" not in out  # no summary of files that are not there
