"""What a search writes: the Parquet files (schema, rows, statuses) and the wandb runs; live reads: test_integrity."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import wandb_offline
from conftest import REPO

from tune_inat.results import EPOCHS_SCHEMA, TRIALS_SCHEMA, read_results, resolve_folder, write_part


def test_parquet_files_have_the_documented_schema(demo_search) -> None:
    readme = (REPO / "docs" / "results.md").read_text()
    for name, schema in (("epochs.parquet", EPOCHS_SCHEMA), ("trials.parquet", TRIALS_SCHEMA)):
        written = pq.read_table(demo_search.folder / name).schema
        assert written.remove_metadata().equals(schema), name
        for field in schema:
            documented = f"| `{field.name}` | {field.type} |" in readme or f"`{field.name}` ({field.type})" in readme
            assert documented, f"docs/results.md does not document {name} column {field.name} as {field.type}"


def test_pandas_dtypes_are_typed(demo_search) -> None:
    epochs = pd.read_parquet(demo_search.folder / "epochs.parquet")
    assert pd.api.types.is_string_dtype(epochs["backbone"])
    assert epochs["lr"].dtype == "float64" and epochs["val_acc"].dtype == "float64"
    assert epochs["batch_size"].dtype == "int64" and epochs["epoch"].dtype == "int64"
    assert epochs["augment"].dtype == "bool"
    assert str(epochs["timestamp"].dtype).startswith("datetime64")


def test_one_epoch_row_per_reported_epoch(demo_search) -> None:
    epochs = pd.read_parquet(demo_search.folder / "epochs.parquet")
    assert not epochs.duplicated(["trial_id", "epoch"]).any()
    for result in demo_search.grid:
        reported = result.metrics_dataframe
        mine = epochs[epochs["trial_id"] == result.metrics["trial_id"]].sort_values("epoch")
        assert mine["epoch"].tolist() == reported["epoch"].tolist()
        assert mine["val_acc"].tolist() == pytest.approx(reported["val_acc"].tolist())


def test_trial_statuses_match_what_ray_did(demo_search) -> None:
    trials = pd.read_parquet(demo_search.folder / "trials.parquet").set_index("trial_id")
    for result in demo_search.grid:
        row = trials.loc[result.metrics["trial_id"]]
        ran_all = result.metrics["epoch"] == result.metrics["max_epochs"]
        assert row["status"] == ("completed" if ran_all else "stopped_early")
        assert row["epochs_run"] == result.metrics["epoch"]
        assert row["best_val_acc"] == pytest.approx(result.metrics_dataframe["val_acc"].max())
        assert pd.notna(row["ended_at"]) and row["wall_seconds"] > 0
    assert trials["startup_seconds"].notna().all() and (trials["trainable_parameters"] > 0).all()


def test_wandb_offline_runs_hold_every_epoch(demo_search) -> None:
    epochs = pd.read_parquet(demo_search.folder / "epochs.parquet")
    for trial_id, rows in epochs.groupby("trial_id"):
        run_files = list(demo_search.folder.glob(f"trial_*_{trial_id}/wandb/offline-run-*/run-*.wandb"))
        assert len(run_files) == 1, trial_id
        history = wandb_offline.history(run_files[0])
        assert [h["epoch"] for h in history] == rows.sort_values("epoch")["epoch"].tolist()
        assert [h["_step"] for h in history] == [h["epoch"] for h in history]  # step = epoch
        assert [h["val_acc"] for h in history] == pytest.approx(rows.sort_values("epoch")["val_acc"].tolist())
        config = wandb_offline.config(run_files[0])
        assert config["backbone"] == rows["backbone"].iloc[0] and config["lr"] == pytest.approx(rows["lr"].iloc[0])


def test_results_go_to_a_pyarrow_uri(demo_search, tmp_path: Path) -> None:
    """Results are written and read through pyarrow filesystems (file:// here; s3:// and gs:// the same way)."""
    uri = f"file://{tmp_path}/remote"
    filesystem, path = resolve_folder(uri)
    write_part(
        pq.read_table(demo_search.folder / "epochs.parquet").to_pylist(),
        EPOCHS_SCHEMA,
        filesystem,
        f"{path}/epochs.parquet",
    )
    write_part(
        pq.read_table(demo_search.folder / "trials.parquet").to_pylist(),
        TRIALS_SCHEMA,
        filesystem,
        f"{path}/trials.parquet",
    )
    results = read_results(uri)
    assert len(results.epochs) == len(pd.read_parquet(demo_search.folder / "epochs.parquet"))
    assert len(results.trials) == 8 and not list((tmp_path / "remote").rglob(".*tmp*"))


def test_epoch_rows_are_immutable_parts(demo_search) -> None:
    parts = sorted((demo_search.folder / "epochs.parquet").glob("*.parquet"))
    assert parts and all(p.name.startswith("part-") for p in parts)
    assert sum(pq.read_metadata(p).num_rows for p in parts) == len(
        pd.read_parquet(demo_search.folder / "epochs.parquet")
    )


def test_the_docs_pandas_snippets_run(demo_search, capsys) -> None:
    readme = (REPO / "docs" / "results.md").read_text()
    section = readme.split("## Analyse in pandas", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) >= 4
    namespace: dict = {}
    for block in blocks:
        code = re.sub(r'^folder = ".*?"', f'folder = "{demo_search.folder}"', block, flags=re.M)
        exec(compile(code, "docs/results.md", "exec"), namespace)
    assert set(namespace["best"]["backbone"]) == set(namespace["trials"]["backbone"])
    assert namespace["curves"].shape[1] == len(namespace["trials"])
    assert capsys.readouterr().out.strip()


# -- the Optuna study: optuna.db, read by Optuna's own tools ---------------------------------------


def test_the_study_holds_every_trial_as_the_tables_do_and_optuna_dashboard_serves_it(demo_search) -> None:
    """Each Optuna trial: its Ray id, COMPLETE when it ran every epoch and PRUNED when stopped early (Ray's stock
    integration says COMPLETE), every epoch's value as an intermediate value; and optuna-dashboard answers."""
    import json
    import shutil
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    import optuna

    url = f"sqlite:///{demo_search.folder / 'optuna.db'}"
    study = optuna.load_study(study_name="demo-test", storage=url)
    trials = pd.read_parquet(demo_search.folder / "trials.parquet").set_index("trial_id")
    epochs = pd.read_parquet(demo_search.folder / "epochs.parquet")
    states = {"completed": "COMPLETE", "stopped_early": "PRUNED"}
    assert len(study.trials) == len(trials)
    for trial in study.trials:
        trial_id = trial.user_attrs["ray_trial_id"]
        assert trial.state.name == states[trials.loc[trial_id, "status"]], trial_id
        curve = epochs[epochs["trial_id"] == trial_id].set_index("epoch")["val_acc"].to_dict()
        assert trial.intermediate_values == pytest.approx(curve), trial_id
    assert {t.state.name for t in study.trials} == {"COMPLETE", "PRUNED"}  # the demo stops some early

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    command = [shutil.which("optuna-dashboard", path=str(Path(sys.executable).parent)), url]
    dashboard = subprocess.Popen(
        [*command, "--host", "127.0.0.1", "--port", str(port), "--quiet"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline, studies = time.monotonic() + 60, None
        while studies is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as answer:
                    studies = json.load(answer)["study_summaries"]
            except OSError:
                assert dashboard.poll() is None and time.monotonic() < deadline, dashboard.stderr.read()[-2000:]
                time.sleep(0.5)
        (summary,) = studies
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{summary['study_id']}", timeout=30) as answer:
            served = json.load(answer)
    finally:
        dashboard.terminate()
        dashboard.wait(timeout=30)
    assert summary["study_name"] == "demo-test"
    assert sorted(t["state"] for t in served["trials"]) == sorted(t.state.name.capitalize() for t in study.trials)
