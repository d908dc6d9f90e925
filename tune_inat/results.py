"""What a search writes for people and pandas: `epochs.parquet`, `trials.parquet`, the leaderboard.

`ParquetResults` is a Ray Tune callback running in the driver: every reported epoch becomes a
row of `epochs.parquet` (a folder of immutable part files that pandas reads as one table) and
updates its trial's row in `trials.parquet` (one file, replaced atomically), so `pd.read_parquet`
works at any moment of a running search. On `--resume` it reloads both and keys rows by
(trial_id, epoch), so nothing written is lost and no row is duplicated. The folder may be local
or any URI pyarrow's filesystems handle (s3://, gs://).
"""

from __future__ import annotations

import logging
import math
import netrc
import os
import time
import uuid
from dataclasses import fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import urlparse

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray import tune
from ray.air.integrations.wandb import WandbLoggerCallback

from tune_inat.engine import FIELD_TYPES, TrainConfig
from tune_inat.errors import UserError
from tune_inat.trainable import TrialFailure

log = logging.getLogger(__name__)

EPOCHS_FILE = "epochs.parquet"
TRIALS_FILE = "trials.parquet"
_ARROW = {str: pa.string(), int: pa.int64(), float: pa.float64(), bool: pa.bool_()}
TIMESTAMP = pa.timestamp("ms", tz="UTC")

KEY_COLUMNS = [
    ("experiment", pa.string(), "search name (the results sub-folder)"),
    ("trial_id", pa.string(), "Ray Tune trial id"),
]
CONFIG_COLUMNS = [(f.name, _ARROW[FIELD_TYPES[f.name]], "trial setting (see the settings table)") for f in fields(TrainConfig)]
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
    ("micro_batch_size", pa.int64(), "images per forward pass: batch_size, halved after an out-of-memory retry"),
    ("timestamp", TIMESTAMP, "when the epoch was reported (UTC)"),
]
TRIAL_COLUMNS = [
    ("status", pa.string(), "running, completed, stopped_early (by ASHA or the time budget), or error"),
    ("error", pa.string(), "one-line reason when status is error"),
    ("best_score", pa.float64(), "best value of the search metric over its epochs (val_acc by default)"),
    ("best_val_acc", pa.float64(), "best validation accuracy over its epochs"),
    ("last_val_acc", pa.float64(), "validation accuracy of its last epoch"),
    ("best_epoch", pa.int64(), "epoch of the best value of the search metric"),
    ("epochs_run", pa.int64(), "epochs reported"),
    ("max_epochs", pa.int64(), "epochs it would run if never stopped (epochs, capped by --max-epochs)"),
    ("wall_seconds", pa.float64(), "seconds the trial ran, restarts included"),
    ("gpu_seconds", pa.float64(), "sum of epoch seconds times GPU share"),
    ("trainable_parameters", pa.int64(), "parameters that train (freeze_fraction decides)"),
    ("startup_seconds", pa.float64(), "trial start to first training step: model build, cache open, weights"),
    ("started_at", TIMESTAMP, "first report or start (UTC)"),
    ("ended_at", TIMESTAMP, "completion or error (UTC); null while running"),
]
EPOCHS_SCHEMA = pa.schema([pa.field(n, t) for n, t, _ in KEY_COLUMNS + CONFIG_COLUMNS + EPOCH_COLUMNS])
TRIALS_SCHEMA = pa.schema([pa.field(n, t) for n, t, _ in KEY_COLUMNS + CONFIG_COLUMNS + TRIAL_COLUMNS])


def _now() -> datetime:
    return datetime.now(timezone.utc)


def absolute_location(location: str) -> str:
    """A URI as given, a local path made absolute: Ray's storage reads a bare relative path as a URI."""
    return location if "://" in location else os.path.abspath(location)


def resolve_folder(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or a URI such as s3://bucket/dir; clear error if unsupported."""
    try:
        if "://" in uri:
            return pafs.FileSystem.from_uri(uri)
        return pafs.LocalFileSystem(), absolute_location(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as err:
        reason = str(err).splitlines()[0]
        raise UserError(f"cannot use {uri}: {reason} (is the filesystem for this URI installed and reachable?)") from err


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


def write_table_atomic(table: pa.Table, filesystem: pafs.FileSystem, path: str) -> None:
    """Write under a hidden temporary name, then rename: readers see the old file or the new one, never half.

    The temporary name starts with "." so pyarrow's dataset discovery (and pandas) skip it.
    """
    folder, _, name = path.rpartition("/")
    temporary = f"{folder}/.{name}.tmp-{uuid.uuid4().hex[:8]}"
    pq.write_table(table, temporary, filesystem=filesystem)
    filesystem.move(temporary, path)


def read_table(filesystem: pafs.FileSystem, path: str) -> pa.Table | None:
    if filesystem.get_file_info(path).type != pafs.FileType.File:
        return None
    return pq.read_table(path, filesystem=filesystem)


def trial_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The trial's full, typed settings (defaults filled in, aliases resolved)."""
    try:
        return TrainConfig.from_dict(config, "trial").to_dict()
    except UserError:  # never let a results row fail the search
        return {k: config.get(k) for k in FIELD_TYPES}


def error_reason(trial: Any) -> str:
    """One line for why a trial failed, from the exception Ray saved with the trial."""
    error = None
    local = getattr(trial, "pickled_error_file", None)
    try:
        if local and os.path.isfile(local):  # written before this callback; the storage copy may lag
            from ray import cloudpickle

            with open(local, "rb") as f:
                error = cloudpickle.load(f)
        else:
            error = trial.get_pickled_error()
    except Exception:  # an unreadable error file must not hide the status
        error = None
    cause = getattr(error, "cause", None) or error
    if cause is None:
        return "error (see the trial's error.txt)"
    if isinstance(cause, TrialFailure):  # already written as the line to show
        return str(cause)[:300]
    text = str(cause).strip().splitlines()
    message = text[-1] if text else ""
    return f"{type(cause).__name__}: {message}"[:300]


class ParquetResults(tune.Callback):
    """Keep `epochs.parquet` and `trials.parquet` of one experiment up to date as results arrive.

    `epochs.parquet` is a folder of immutable part files (pandas and pyarrow read it as one
    table): rows are only ever added, each part written under a hidden name and renamed into
    place, so a reader never sees a half-written or replaced file; new rows land within
    `flush_seconds`. `trials.parquet` (one row per trial, which changes as the trial runs) is one
    file replaced atomically when a trial starts, ends or fails, and otherwise at most every
    `trials_refresh_seconds`: pyarrow reads a file in two opens, so a replacement that falls
    between them could confuse a reader, and rare replacements make that practically never happen.
    """

    def __init__(self, folder: str, experiment: str, metric: str = "val_acc", mode: str = "max",
                 flush_seconds: float = 5.0, trials_refresh_seconds: float = 30.0) -> None:
        self.folder = folder
        self.experiment = experiment
        self.metric = metric
        self.mode = mode
        self.flush_seconds = flush_seconds
        self.trials_refresh_seconds = trials_refresh_seconds
        self._epochs: dict[str, dict[int, dict[str, Any]]] = {}  # trial_id -> epoch -> row
        self._trials: dict[str, dict[str, Any]] = {}
        self._unwritten: list[dict[str, Any]] = []
        self._trials_changed = False
        self._last_epochs_flush = 0.0
        self._last_trials_flush = 0.0

    # -- Ray Tune hooks -------------------------------------------------------------------
    def setup(self, **info: Any) -> None:
        """Start from what is on disk, so a resumed search keeps every row and adds none twice."""
        filesystem, folder = resolve_folder(self.folder)
        filesystem.create_dir(f"{folder}/{EPOCHS_FILE}", recursive=True)
        if not filesystem.get_file_info(pafs.FileSelector(f"{folder}/{EPOCHS_FILE}")):
            # an empty first part, so readers get the typed columns before the first epoch ends
            write_table_atomic(EPOCHS_SCHEMA.empty_table(), filesystem, f"{folder}/{EPOCHS_FILE}/part-0.parquet")
        for row in read_epochs_table(filesystem, folder).to_pylist():
            self._epochs.setdefault(row["trial_id"], {})[row["epoch"]] = row
        trials = read_table(filesystem, f"{folder}/{TRIALS_FILE}")
        for row in trials.to_pylist() if trials is not None else []:
            self._trials[row["trial_id"]] = row

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        row = self._trial_row(trial)
        if row["status"] not in ("completed", "stopped_early"):
            row.update(status="running", error=None, ended_at=None)
        self._flush(force=True)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if "epoch" not in result:
            return
        epoch = int(result["epoch"])
        known = self._epochs.setdefault(trial.trial_id, {})
        if epoch not in known:  # an epoch re-run after a crash keeps its first record
            row = {"experiment": self.experiment, "trial_id": trial.trial_id, **trial_settings(trial.config)}
            row.update({name: result.get(name) for name, _, _ in EPOCH_COLUMNS if name != "timestamp"})
            row["timestamp"] = _now()
            known[epoch] = row
            self._unwritten.append(row)
        summary = self._trial_row(trial)
        summary.update(
            status="running",
            max_epochs=result.get("max_epochs"),
            wall_seconds=result.get("time_total_s"),
            trainable_parameters=result.get("trainable_parameters"),
            startup_seconds=result.get("startup_seconds"),
        )
        self._summarise(summary)
        self._flush()

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        self._flush()  # rows never wait much longer than flush_seconds

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        row = self._trial_row(trial)
        self._summarise(row)
        finished = row["epochs_run"] is not None and row["max_epochs"] is not None and row["epochs_run"] >= row["max_epochs"]
        row.update(status="completed" if finished else "stopped_early", error=None, ended_at=_now())
        self._flush(force=True)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        row = self._trial_row(trial)
        self._summarise(row)
        row.update(status="error", error=error_reason(trial), ended_at=_now())
        self._flush(force=True)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self._flush(force=True)

    # -- rows -------------------------------------------------------------------------------
    def _trial_row(self, trial: Any) -> dict[str, Any]:
        self._trials_changed = True
        row = self._trials.get(trial.trial_id)
        if row is None:
            row = {name: None for name in TRIALS_SCHEMA.names}
            row.update(experiment=self.experiment, trial_id=trial.trial_id, status="running", started_at=_now())
            row.update(trial_settings(trial.config))
            self._trials[trial.trial_id] = row
        return row

    def _summarise(self, row: dict[str, Any]) -> None:
        epochs = [r for _, r in sorted(self._epochs.get(row["trial_id"], {}).items())]
        if not epochs:
            return
        scores = [(r[self.metric], r["epoch"]) for r in epochs if r.get(self.metric) is not None and not math.isnan(r[self.metric])]
        best = (max if self.mode == "max" else min)(scores) if scores else (None, None)
        accuracies = [r["val_acc"] for r in epochs if r.get("val_acc") is not None]
        row.update(
            best_score=best[0],
            best_val_acc=max(accuracies) if accuracies else None,
            last_val_acc=epochs[-1].get("val_acc"),
            best_epoch=best[1],
            epochs_run=epochs[-1]["epoch"],
            gpu_seconds=sum((r.get("epoch_seconds") or 0.0) * (r.get("gpu_share") or 0.0) for r in epochs),
        )

    def _flush(self, force: bool = False) -> None:
        now = time.monotonic()
        filesystem, folder = resolve_folder(self.folder)
        try:
            if self._unwritten and (force or now - self._last_epochs_flush >= self.flush_seconds):
                rows = sorted(self._unwritten, key=lambda r: (r["trial_id"], r["epoch"]))
                write_table_atomic(
                    pa.Table.from_pylist(rows, schema=EPOCHS_SCHEMA), filesystem,
                    f"{folder}/{EPOCHS_FILE}/part-{time.time_ns()}-{uuid.uuid4().hex[:6]}.parquet",
                )
                self._unwritten = []
                self._last_epochs_flush = now
            if self._trials_changed and (force or now - self._last_trials_flush >= self.trials_refresh_seconds):
                trials = sorted(self._trials.values(), key=lambda r: r["trial_id"])
                write_table_atomic(pa.Table.from_pylist(trials, schema=TRIALS_SCHEMA), filesystem, f"{folder}/{TRIALS_FILE}")
                self._trials_changed = False
                self._last_trials_flush = now
        except (OSError, pa.ArrowException) as err:  # a full disk must not kill the search; rows stay buffered
            log.warning("could not write results to %s: %s", self.folder, err)


def read_epochs_table(filesystem: pafs.FileSystem, folder: str) -> pa.Table:
    """All rows of `<folder>/epochs.parquet` (a folder of part files), with the documented schema."""
    path = f"{folder}/{EPOCHS_FILE}"
    if filesystem.get_file_info(path).type == pafs.FileType.NotFound:
        return EPOCHS_SCHEMA.empty_table()
    return pq.read_table(path, filesystem=filesystem, schema=EPOCHS_SCHEMA)


def read_results(folder: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(epochs, trials) DataFrames of one results folder (local or URI)."""
    filesystem, path = resolve_folder(folder)
    trials = read_table(filesystem, f"{path}/{TRIALS_FILE}")
    if trials is None:
        raise UserError(f"{folder} holds no search results ({TRIALS_FILE} missing)")
    return read_epochs_table(filesystem, path).to_pandas(), trials.to_pandas()


def leaderboard(trials: pd.DataFrame, columns: Iterable[str], mode: str = "max", top: int = 10) -> pd.DataFrame:
    """The best `top` trials by their best value of the search metric, with the searched settings."""
    ranked = trials.sort_values("best_score", ascending=(mode == "min"), na_position="last")
    shown = ["trial_id", *[c for c in columns if c in ranked.columns], "best_val_acc", "epochs_run", "max_epochs", "status"]
    return ranked[shown].head(top).reset_index(drop=True)


def format_leaderboard(board: pd.DataFrame) -> str:
    """A plain-text table: accuracy in %, floats short, status spelled out."""
    table = board.copy()
    table["best_val_acc"] = (100 * table["best_val_acc"]).map(lambda v: f"{v:.1f}%" if pd.notna(v) else "-")
    table["epochs"] = [f"{r}/{m}" if pd.notna(r) else "-" for r, m in zip(table.pop("epochs_run"), table.pop("max_epochs"))]
    for column in table.columns:
        if pd.api.types.is_float_dtype(table[column]):
            table[column] = table[column].map(lambda v: f"{v:.3g}")
    table.index = range(1, len(table) + 1)
    return table.to_string()


def wandb_is_logged_in() -> bool:
    """True when wandb has an API key: WANDB_API_KEY, or the ~/.netrc entry `wandb login` writes.

    Read without wandb's own API, which may reach for the network; the key itself is never shown.
    """
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


class TolerantWandbCallback(WandbLoggerCallback):
    """Ray's WandbLoggerCallback where wandb trouble (no network, bad key, full disk) is a warning, never a failed search."""

    _broken = False

    def _guard(self, method: str, *args: Any, **kwargs: Any) -> None:
        if self._broken:
            return
        try:
            getattr(super(), method)(*args, **kwargs)
        except Exception as err:
            self._broken = True
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            log.warning("wandb logging turned off for this search: %s", reason)

    def setup(self, *args: Any, **kwargs: Any) -> None:
        self._guard("setup", *args, **kwargs)

    def _start_logging_actor(self, trial: Any, exclude_results: list[str], **wandb_init_kwargs: Any) -> None:
        # Ray hands wandb the trial's staging folder, which it copies to the results folder when the
        # trial ends, possibly before wandb has flushed its last records. With local storage, write
        # the run straight into the trial's results folder instead, so nothing is lost.
        if isinstance(trial.storage.storage_filesystem, pafs.LocalFileSystem):
            wandb_init_kwargs["dir"] = trial.storage.trial_fs_path
        super()._start_logging_actor(trial, exclude_results, **wandb_init_kwargs)

    def log_trial_start(self, trial: Any) -> None:
        self._guard("log_trial_start", trial)

    def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
        self._guard("log_trial_result", iteration, trial, result)

    def log_trial_end(self, trial: Any, failed: bool = False) -> None:
        self._guard("log_trial_end", trial, failed)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self._guard("on_experiment_end", trials, **info)


def wandb_callback(project: str, experiment: str) -> TolerantWandbCallback:
    """One wandb run per trial, grouped by experiment, config logged, step = epoch (one report per epoch).

    The caller sets WANDB_MODE=offline in the driver's environment before Ray starts when there
    is no API key (see `search.configure_wandb`).
    """
    return TolerantWandbCallback(
        project=project,
        group=experiment,
        log_config=False,
        upload_timeout=300,  # at the end, wait at most this long for the runs to be written or uploaded
        excludes=["pid", "hostname", "node_ip", "date", "time_since_restore", "iterations_since_restore",
                  "checkpoint_dir_name", "timestamp"],
        resume="allow",  # a restored trial continues its run (same id) instead of clashing with it
        job_type="trial",
    )
