"""What a search writes: the Parquet files (schema, rows, statuses, live reads) and the wandb runs."""

from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import wandb_offline
from conftest import REPO

from tune_inat.data.dataset import DataConfig
from tune_inat.results import EPOCHS_SCHEMA, TRIALS_SCHEMA, read_results, resolve_folder, write_part
from tune_inat.search import prepare_data, run_search
from tune_inat.space import load_space, with_fixed, with_overrides


def test_parquet_files_have_the_documented_schema(demo_search) -> None:
    readme = (REPO / "README.md").read_text()
    for name, schema in (("epochs.parquet", EPOCHS_SCHEMA), ("trials.parquet", TRIALS_SCHEMA)):
        written = pq.read_table(demo_search.folder / name).schema
        assert written.remove_metadata().equals(schema), name
        for field in schema:
            documented = f"| `{field.name}` | {field.type} |" in readme or f"`{field.name}` ({field.type})" in readme
            assert documented, f"README does not document {name} column {field.name} as {field.type}"


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


def test_files_read_correctly_while_the_search_runs(ray_cluster, demo_root: Path, tmp_path: Path) -> None:
    spec = with_fixed(load_space("demo"), {"backbone": "resnet18", "image_size": 32})
    spec = with_overrides(spec, num_samples=3, max_epochs=3, scheduler="fifo")
    data_config = DataConfig(demo_root, tmp_path / "cache", progress=False)
    data = prepare_data(spec, data_config)
    folder = tmp_path / "live"
    secret = "k" * 40
    os.environ["WANDB_API_KEY"] = secret  # must never reach the results
    outcome: dict = {}

    def search() -> None:
        try:
            outcome["grid"] = run_search(spec, data_config, data, str(tmp_path), "live", verbose=0, wandb_project="t")
        except BaseException as err:  # surfaced below
            outcome["error"] = err

    worker = threading.Thread(target=search)
    worker.start()
    reads_while_running = 0
    try:
        while worker.is_alive():
            if (folder / "epochs.parquet").exists():
                epochs = pd.read_parquet(folder / "epochs.parquet")
                assert list(epochs.columns) == EPOCHS_SCHEMA.names
                finished = pd.read_parquet(folder / "trials.parquet") if (folder / "trials.parquet").exists() else []
                assert len(finished) <= 3
                if len(epochs) and len(finished) < 3:
                    reads_while_running += 1
            time.sleep(0.1)
    finally:
        worker.join()
        del os.environ["WANDB_API_KEY"]
    assert "error" not in outcome, outcome.get("error")
    assert reads_while_running > 0
    final = pd.read_parquet(folder / "epochs.parquet")
    assert len(final) == 9 and (pd.read_parquet(folder / "trials.parquet")["status"] == "completed").all()
    for path in folder.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


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


def test_readme_pandas_snippets_run(demo_search, capsys) -> None:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Analyse in pandas", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) >= 4
    namespace: dict = {}
    for block in blocks:
        code = re.sub(r'^folder = ".*?"', f'folder = "{demo_search.folder}"', block, flags=re.M)
        exec(compile(code, "README.md", "exec"), namespace)
    assert set(namespace["best"]["backbone"]) == set(namespace["trials"]["backbone"])
    assert namespace["curves"].shape[1] == len(namespace["trials"])
    assert capsys.readouterr().out.strip()
