"""What a search writes for people and pandas, and the one way to read and rank it. No Ray, no torch.

A search's results folder holds two Parquet tables, each a folder of immutable part files that
pandas and pyarrow read as one table:

- `epochs.parquet`: one row per trial and epoch, added as epochs are reported;
- `trials.parquet`: one row per finished trial (completed, stopped early, failed), added when the
  trial ends.

Rows are only ever added, each part written under a hidden name and renamed into place, so a
reader never meets a half-written or replaced file (pyarrow sizes a file when it lists it and
opens it again to read: a file replaced in between reads as garbage). `search.json` records the
search itself (space, metric, mode, data, seeds), so that `--resume`, `analyze` and `final` read
the same search back. `rank_trials` is the only ordering of trials by "best".
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from tune_inat.errors import UserError
from tune_inat.settings import FIELD_TYPES, TrainConfig, plain

EPOCHS_FILE = "epochs.parquet"
TRIALS_FILE = "trials.parquet"
SEARCH_RECORD_FILE = "search.json"
STUDY_FILE = "optuna.db"  # the Optuna study (optuna searcher, local results): optuna-dashboard reads it
BEST_CONFIG_FILE = "best_config.yaml"
_ARROW = {str: pa.string(), int: pa.int64(), float: pa.float64(), bool: pa.bool_()}
TIMESTAMP = pa.timestamp("ms", tz="UTC")
FINISHED_STATUSES = ("completed", "stopped_early", "error")

KEY_COLUMNS = [
    ("experiment", pa.string(), "search name (the results sub-folder)"),
    ("trial_id", pa.string(), "Ray Tune trial id"),
]
CONFIG_COLUMNS = [(name, _ARROW[kind], "trial setting (see the settings table)") for name, kind in FIELD_TYPES.items()]
EPOCH_COLUMNS = [
    ("epoch", pa.int64(), "epoch number, from 1"),
    ("train_loss", pa.float64(), "mean training loss of the main head (label smoothing included)"),
    ("train_acc", pa.float64(), "training accuracy, 0..1, on augmented images"),
    ("val_loss", pa.float64(), "cross-entropy on the validation split (no smoothing)"),
    ("val_acc", pa.float64(), "validation accuracy, 0..1"),
    ("current_lr", pa.float64(), "head learning rate at the end of the epoch"),
    ("epoch_seconds", pa.float64(), "wall seconds of the epoch (training + validation)"),
    ("images_per_second", pa.float64(), "training images per second"),
    ("peak_gpu_memory_mb", pa.float64(), "peak GPU memory of the trial in the epoch, MiB (NaN on CPU)"),
    ("gpu_share", pa.float64(), "share of a GPU Ray reserved for the trial (0 for CPU trials)"),
    ("cpus", pa.float64(), "CPUs Ray reserved for the trial"),
    ("micro_batch_size", pa.int64(), "images per forward pass: batch_size, halved after an out-of-memory retry"),
    ("timestamp", TIMESTAMP, "when the trial reported the epoch (UTC)"),
]
TRIAL_COLUMNS = [
    ("status", pa.string(), "completed, stopped_early (by the scheduler), or error"),
    ("error", pa.string(), "one-line reason when status is error"),
    ("best_score", pa.float64(), "best value of the search metric over its epochs (val_acc by default)"),
    ("best_val_acc", pa.float64(), "best validation accuracy over its epochs"),
    ("last_val_acc", pa.float64(), "validation accuracy of its last epoch"),
    ("best_epoch", pa.int64(), "epoch of the best value of the search metric"),
    ("epochs_run", pa.int64(), "epochs reported"),
    ("max_epochs", pa.int64(), "epochs it would run if never stopped (epochs, capped by --max-epochs)"),
    ("wall_seconds", pa.float64(), "seconds the trial ran, restarts included"),
    ("gpu_seconds", pa.float64(), "sum of epoch seconds times GPU share"),
    ("trainable_parameters", pa.int64(), "parameters that train (freeze_fraction or freeze_form decides)"),
    (
        "frozen_parameter_share",
        pa.float64(),
        "share of the model's parameters frozen, 0..1 (what the freezing came to)",
    ),
    ("startup_seconds", pa.float64(), "trial start to first training step: model build, cache open, weights"),
    ("total_parameters", pa.int64(), "parameters of the whole model (what the exported file holds)"),
    (
        "forward_gflop",
        pa.float64(),
        "billions of FLOPs of one forward pass of one image, 2 per multiply-add "
        "(PyTorch's FLOP counter; torchvision's published GFLOPS count multiply-adds, half as many)",
    ),
    ("model_mb", pa.float64(), "size of the model's saved weights, MB"),
    ("cpu_latency_ms_b1", pa.float64(), "median ms of one forward pass of 1 image on the CPU (see latency_cpu)"),
    ("cpu_latency_ms_b64", pa.float64(), "median ms of one forward pass of 64 images on the CPU"),
    ("latency_cpu", pa.string(), "the CPU the latencies were measured on, and its threads"),
    ("gpu_latency_ms_b1", pa.float64(), "median ms of one forward pass of 1 image on the trial's GPU (NaN without)"),
    ("gpu_latency_ms_b64", pa.float64(), "median ms of one forward pass of 64 images on the trial's GPU"),
    ("latency_gpu", pa.string(), "the GPU the latencies were measured on (null without)"),
    ("node_id", pa.string(), "the Ray node the trial last ran on"),
    ("node_host", pa.string(), "that node's host name"),
    ("device_name", pa.string(), "the GPU model the trial trained on, or the CPU model"),
    ("gpu_uuid", pa.string(), "the UUID of the GPU the trial last ran on (gpus.parquet's samples of it); null on CPU"),
    ("worker_pid", pa.int64(), "the process id of the trial's last run (on its node)"),
    ("started_at", TIMESTAMP, "when the trial started (UTC)"),
    ("ended_at", TIMESTAMP, "when the trial ended (UTC)"),
]
EPOCHS_SCHEMA = pa.schema([pa.field(n, t) for n, t, _ in KEY_COLUMNS + CONFIG_COLUMNS + EPOCH_COLUMNS])
TRIALS_SCHEMA = pa.schema([pa.field(n, t) for n, t, _ in KEY_COLUMNS + CONFIG_COLUMNS + TRIAL_COLUMNS])

# What the trainable reports each epoch, and where it lands: every key is a column of one table.
REPORTED_EPOCH_KEYS = tuple(name for name, _, _ in EPOCH_COLUMNS if name != "timestamp")
COST_KEYS = (
    "total_parameters",
    "forward_gflop",
    "model_mb",
    "cpu_latency_ms_b1",
    "cpu_latency_ms_b64",
    "latency_cpu",
    "gpu_latency_ms_b1",
    "gpu_latency_ms_b64",
    "latency_gpu",
)
PLACE_KEYS = ("node_id", "node_host", "device_name", "gpu_uuid", "worker_pid")
REPORTED_TRIAL_KEYS = (
    "max_epochs",
    "trainable_parameters",
    "frozen_parameter_share",
    "startup_seconds",
    "started_at",
    *COST_KEYS,
    *PLACE_KEYS,
)
REPORTED_TIME_KEY = "reported_at"  # unix seconds, becomes `timestamp`


def utc(seconds: float | None) -> datetime | None:
    """Unix seconds as an aware UTC datetime (None stays None)."""
    return None if seconds is None else datetime.fromtimestamp(float(seconds), timezone.utc)


# -- locations --------------------------------------------------------------------------------


def absolute_location(location: str) -> str:
    """A URI as given, a local path made absolute: Ray's storage reads a bare relative path as a URI."""
    return location if "://" in location else os.path.abspath(os.path.expanduser(location))


def is_local(location: str) -> bool:
    return "://" not in location or location.startswith("file://")


def resolve_folder(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or a URI such as s3://bucket/dir; clear error if unsupported."""
    try:
        if "://" in uri:
            return pafs.FileSystem.from_uri(uri)
        return pafs.LocalFileSystem(), absolute_location(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as err:
        reason = str(err).splitlines()[0]
        raise UserError(
            f"cannot use {uri}: {reason} (is the filesystem for this URI installed and reachable?)"
        ) from err


def check_writable(location: str, what: str) -> None:
    """Fail now, in one line, if `location` cannot hold results: a local folder must take a file."""
    resolve_folder(location)
    if "://" in location:
        return  # remote stores are checked by their first write; their credentials are theirs
    folder = Path(location).expanduser()
    probe = folder / f".tune-inat-write-test-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise UserError(f"{what} {folder} is not writable ({err.strerror})") from err


def file_exists(filesystem: pafs.FileSystem, path: str) -> bool:
    return filesystem.get_file_info(path).type != pafs.FileType.NotFound


# -- writing ----------------------------------------------------------------------------------


def write_part(rows: list[dict[str, Any]], schema: pa.Schema, filesystem: pafs.FileSystem, folder: str) -> str:
    """Add `rows` to the table folder `folder` as a new immutable part; returns its path.

    Written under a hidden name (which readers skip) and renamed into place; the folder itself
    appears with its first part (never empty, so a reader always finds the columns). A failed write
    removes what it left, so a full disk never leaves a file that breaks a later read.
    """
    name = f"part-{time.time_ns()}-{uuid.uuid4().hex[:6]}.parquet"
    table = pa.Table.from_pylist(rows, schema=schema)
    if file_exists(filesystem, folder):
        temporary = f"{folder}/.{name}.tmp"
        try:
            pq.write_table(table, temporary, filesystem=filesystem)
            filesystem.move(temporary, f"{folder}/{name}")
        except BaseException:
            _remove(filesystem, temporary, is_folder=False)
            raise
        return f"{folder}/{name}"
    parent, _, base = folder.rstrip("/").rpartition("/")
    staging = f"{parent}/.{base}.new-{uuid.uuid4().hex[:8]}"  # the folder with its first part, then renamed
    try:
        filesystem.create_dir(staging, recursive=True)
        pq.write_table(table, f"{staging}/{name}", filesystem=filesystem)
        filesystem.move(staging, folder)
    except BaseException:
        _remove(filesystem, staging, is_folder=True)
        raise
    return f"{folder}/{name}"


def _remove(filesystem: pafs.FileSystem, path: str, is_folder: bool) -> None:
    try:
        filesystem.delete_dir(path) if is_folder else filesystem.delete_file(path)
    except (OSError, pa.ArrowException):
        pass


def write_text(filesystem: pafs.FileSystem, path: str, text: str) -> None:
    """Write a small text file whole: a hidden temporary file, then a rename."""
    folder, _, name = path.rpartition("/")
    temporary = f"{folder}/.{name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with filesystem.open_output_stream(temporary) as out:
            out.write(text.encode())
        filesystem.move(temporary, path)
    except BaseException:
        _remove(filesystem, temporary, is_folder=False)
        raise


# -- reading ----------------------------------------------------------------------------------


def table_parts(filesystem: pafs.FileSystem, folder: str) -> list[str]:
    """The visible part files of a table folder, in the order they were written."""
    if filesystem.get_file_info(folder).type != pafs.FileType.Directory:
        return []
    infos = filesystem.get_file_info(pafs.FileSelector(folder))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File and not i.base_name.startswith((".", "_")))


def read_part(filesystem: pafs.FileSystem, path: str, schema: pa.Schema) -> pa.Table:
    """One part (or an older single-file table), through one open handle; a damaged file is one UserError."""
    try:
        with filesystem.open_input_file(path) as handle:
            table = pq.read_table(handle)
        return with_columns_added_since(table, schema).select(schema.names).cast(schema)
    except (pa.ArrowException, OSError, KeyError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DamagedFile(path, f"not a readable Parquet file of this table ({reason[:150]})") from None


def with_columns_added_since(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """A table written before some columns existed: a newer setting at its default (what the trial ran with),
    any other new column null. A table with none of the key columns stays as it is (and fails as damaged)."""
    if not all(name in table.column_names for name, _, _ in KEY_COLUMNS):
        return table
    defaults = TrainConfig().to_dict()
    for field in schema:
        if field.name not in table.column_names:
            value = defaults.get(field.name)
            table = table.append_column(field, pa.array([value] * table.num_rows, type=field.type))
    return table


class DamagedFile(UserError):
    """A results file a crash or a person damaged: names the file and the problem."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path


def read_table_folder(filesystem: pafs.FileSystem, path: str, schema: pa.Schema) -> pa.Table:
    """Every row of a table folder (or of an older single-file table) with the documented schema."""
    info = filesystem.get_file_info(path)
    if info.type == pafs.FileType.File:
        return read_part(filesystem, path, schema)
    parts = [read_part(filesystem, part, schema) for part in table_parts(filesystem, path)]
    return pa.concat_tables(parts) if parts else schema.empty_table()


@dataclass(frozen=True)
class SearchResults:
    """One search's tables and record, as read back: what analyze, final and the summary use."""

    folder: str
    epochs: pd.DataFrame
    trials: pd.DataFrame  # finished trials, then unfinished ones summarised from their epochs
    metric: str
    mode: str
    record: dict[str, Any]

    @property
    def name(self) -> str:
        return self.folder.rstrip("/").rpartition("/")[2]

    def ranked(self) -> pd.DataFrame:
        return rank_trials(self.trials, self.mode)


def read_results(folder: str) -> SearchResults:
    """The results of one search (local folder or URI); damaged files are one line naming the file."""
    filesystem, path = resolve_folder(folder)
    if filesystem.get_file_info(path).type != pafs.FileType.Directory:
        raise UserError(f"results folder {folder} does not exist")
    record = read_search_record(folder) if file_exists(filesystem, f"{path}/{SEARCH_RECORD_FILE}") else {}
    if not file_exists(filesystem, f"{path}/{EPOCHS_FILE}") and not file_exists(filesystem, f"{path}/{TRIALS_FILE}"):
        raise UserError(f"{folder} holds no search results ({EPOCHS_FILE} and {TRIALS_FILE} missing)")
    metric, mode = record.get("metric", "val_acc"), record.get("mode", "max")
    epochs = read_table_folder(filesystem, f"{path}/{EPOCHS_FILE}", EPOCHS_SCHEMA).to_pandas()
    epochs = epochs.sort_values(["trial_id", "epoch", "timestamp"]).drop_duplicates(["trial_id", "epoch"])
    finished = read_table_folder(filesystem, f"{path}/{TRIALS_FILE}", TRIALS_SCHEMA).to_pandas()
    finished = finished.sort_values("ended_at").drop_duplicates("trial_id", keep="last")
    unfinished = [
        unfinished_trial_row(rows.to_dict("records"), metric, mode)
        for trial_id, rows in epochs.groupby("trial_id", sort=True)
        if trial_id not in set(finished["trial_id"])
    ]
    trials = finished
    if unfinished:
        extra = pa.Table.from_pylist(unfinished, schema=TRIALS_SCHEMA).to_pandas()
        trials = pd.concat([finished, extra], ignore_index=True) if len(finished) else extra
    return SearchResults(folder, epochs.reset_index(drop=True), trials.reset_index(drop=True), metric, mode, record)


# -- one trial's summary, from its epoch rows -----------------------------------------------------


def summarise_epochs(epochs: list[Mapping[str, Any]], metric: str, mode: str) -> dict[str, Any]:
    """The trials-table fields that follow from a trial's epoch rows (sorted by epoch)."""
    if not epochs:
        return {}

    def number(value: Any) -> float | None:
        return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)

    scores = [(number(r.get(metric)), int(r["epoch"])) for r in epochs if number(r.get(metric)) is not None]
    if scores:
        best = max(scores, key=lambda s: (s[0], -s[1])) if mode == "max" else min(scores, key=lambda s: (s[0], s[1]))
    else:
        best = (None, None)
    accuracies = [number(r.get("val_acc")) for r in epochs if number(r.get("val_acc")) is not None]
    return {
        "best_score": best[0],
        "best_val_acc": max(accuracies) if accuracies else None,
        "last_val_acc": number(epochs[-1].get("val_acc")),
        "best_epoch": best[1],
        "epochs_run": int(epochs[-1]["epoch"]),
        "gpu_seconds": sum((r.get("epoch_seconds") or 0.0) * (r.get("gpu_share") or 0.0) for r in epochs),
    }


def unfinished_trial_row(epochs: list[Mapping[str, Any]], metric: str, mode: str) -> dict[str, Any]:
    """A provisional trials row for a trial still running (or interrupted): status "unfinished"."""
    first = epochs[0]
    row = {name: first.get(name) for name in TRIALS_SCHEMA.names if name in first and name not in ("status",)}
    row.update(summarise_epochs(epochs, metric, mode), status="unfinished")
    return row


# -- ranking: the one definition of "best" ---------------------------------------------------------


def rank_trials(trials: pd.DataFrame, mode: str) -> pd.DataFrame:
    """Trials from best to worst by their best value of the search metric (`best_score`), in the search's mode.

    Ties go to the trial that reached its score in fewer epochs, then to the older trial id, so
    the order (and the winner) never depends on the order rows were written. Trials without a
    score come last.
    """
    ranked = trials.assign(
        _unscored=trials["best_score"].isna(), _score=trials["best_score"] if mode == "min" else -trials["best_score"]
    )
    ranked = ranked.sort_values(["_unscored", "_score", "best_epoch", "trial_id"], na_position="last", kind="stable")
    return ranked.drop(columns=["_unscored", "_score"]).reset_index(drop=True)


def best_trial(trials: pd.DataFrame, mode: str, completed_only: bool = False) -> pd.Series | None:
    """The best scored trial (completed ones only if asked), or None."""
    pool = trials[trials["status"] == "completed"] if completed_only else trials
    pool = pool.dropna(subset=["best_score"])
    return None if pool.empty else rank_trials(pool, mode).iloc[0]


def leaderboard(trials: pd.DataFrame, columns: Iterable[str], mode: str = "max", top: int = 10) -> pd.DataFrame:
    """The best `top` trials, with the searched settings."""
    ranked = rank_trials(trials, mode)
    shown = [
        "trial_id",
        *[c for c in columns if c in ranked.columns],
        "best_score",
        "best_val_acc",
        "epochs_run",
        "max_epochs",
        "status",
    ]
    return ranked[shown].head(top).reset_index(drop=True)


def percent(value: Any) -> str:
    """An accuracy (0..1) as people read it: one decimal and a percent sign; "-" when missing."""
    return "-" if value is None or pd.isna(value) else f"{100 * float(value):.1f}%"


def format_value(value: Any, column: str) -> str:
    """A table cell as people read it: accuracies (any column named *acc*) in %, one decimal; floats short."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return "-"
    if "acc" in column and isinstance(value, (int, float)) and not isinstance(value, bool):
        return percent(value)
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def name_scores(frame: pd.DataFrame, metric: str) -> pd.DataFrame:
    """`best_score` named for what it is (best_val_loss, ...); dropped where it repeats best_val_acc."""
    if "best_score" not in frame:
        return frame
    if metric == "val_acc" and "best_val_acc" in frame:
        return frame.drop(columns=["best_score"])
    return frame.rename(columns={"best_score": f"best_{metric}"})


def format_leaderboard(board: pd.DataFrame, metric: str = "val_acc") -> str:
    """A plain-text table: accuracies in %, floats short, epochs as run/max."""
    table = name_scores(board, metric)
    table["epochs"] = [
        f"{int(r)}/{int(m)}" if pd.notna(r) and pd.notna(m) else "-"
        for r, m in zip(table.pop("epochs_run"), table.pop("max_epochs"))
    ]
    for column in table.columns:
        table[column] = [format_value(v, column) for v in table[column]]
    table.index = range(1, len(table) + 1)
    return table.to_string()


# -- the search record: search.json --------------------------------------------------------------


def write_search_record(folder: str, record: dict[str, Any]) -> None:
    filesystem, path = resolve_folder(folder)
    filesystem.create_dir(path, recursive=True)
    write_text(filesystem, f"{path}/{SEARCH_RECORD_FILE}", json.dumps(record, indent=2))


def read_search_record(folder: str) -> dict[str, Any]:
    """search.json of a results folder; missing or damaged is one UserError naming the file."""
    filesystem, path = resolve_folder(folder)
    where = f"{folder.rstrip('/')}/{SEARCH_RECORD_FILE}"
    try:
        with filesystem.open_input_stream(f"{path}/{SEARCH_RECORD_FILE}") as stream:
            text = stream.read().decode()
    except FileNotFoundError:
        raise UserError(f"{folder} has no {SEARCH_RECORD_FILE}: it was not written by a tune-inat search") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DamagedFile(where, f"cannot be read ({str(err).splitlines()[0][:120]})") from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise DamagedFile(where, f"damaged JSON ({err.msg} at line {err.lineno})") from None
    required = ("metric", "mode", "data_root", "cache_dir", "val_fraction", "test_fraction", "split_seed")
    if not isinstance(record, dict) or any(key not in record for key in required):
        missing = [key for key in required if not isinstance(record, dict) or key not in record]
        raise DamagedFile(where, f"not a search record (missing {', '.join(missing[:3])})")
    if record["mode"] not in ("max", "min"):
        raise DamagedFile(where, f"mode must be max or min, got {record['mode']!r}")
    return record


def config_of(row: Mapping[str, Any]) -> dict[str, Any]:
    """The settings columns of a row as plain Python values."""
    return {name: plain(row[name]) for name in FIELD_TYPES if name in row}


def typed_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's full, typed settings (defaults filled in, aliases resolved), never failing a results row."""
    try:
        return TrainConfig.from_dict(dict(config), "trial").to_dict()
    except UserError:
        return {k: config.get(k) for k in FIELD_TYPES}
