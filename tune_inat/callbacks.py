"""The Ray Tune callbacks of a search: Parquet results that lose no row, and wandb runs that never fail it.

`ParquetResults` runs in the driver. Each reported epoch becomes a row of `epochs.parquet`, each
finished trial a row of `trials.parquet` (both append-only folders of parts, see `results.py`).
Rows wait at most `flush_seconds` in memory; whatever a crash keeps from being written is
recovered, because every checkpoint carries the trial's reported history (`epochs.json`): when a
search starts or resumes, and once more when it ends, `reconcile` adds every epoch Ray recorded
that the tables lack, and the final row of every trial Ray saw finish. A write that fails (a full
disk) keeps its rows in memory and is retried; `pending` says how many are still unwritten.
"""

from __future__ import annotations

import json
import logging
import netrc
import os
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import ray
from ray import tune
from ray.air.integrations.wandb import WANDB_ENV_VAR, WandbLoggerCallback, _clean_log, _QueueItem
from ray.air.util.node import _force_on_current_node

from tune_inat.console import trial_label
from tune_inat.results import (
    COST_KEYS,
    EPOCHS_FILE,
    EPOCHS_SCHEMA,
    PLACE_KEYS,
    REPORTED_EPOCH_KEYS,
    REPORTED_TIME_KEY,
    TRIALS_FILE,
    TRIALS_SCHEMA,
    DamagedFile,
    file_exists,
    read_part,
    resolve_folder,
    summarise_epochs,
    table_parts,
    typed_settings,
    utc,
    write_part,
)
from tune_inat.trainable import HISTORY_FILE, TrialFailure

log = logging.getLogger(__name__)


def _now() -> datetime:
    return datetime.now(timezone.utc)


class ResultsLog:
    """The rows of one search's two tables: those on disk, those waiting to be written."""

    def __init__(self, folder: str, experiment: str, metric: str, mode: str) -> None:
        self.folder = folder
        self.experiment = experiment
        self.metric = metric
        self.mode = mode
        self.epochs: dict[str, dict[int, dict[str, Any]]] = {}  # trial_id -> epoch -> row
        self.finished: dict[str, dict[str, Any]] = {}  # trial_id -> final trials row
        self._waiting_epochs: list[dict[str, Any]] = []
        self._waiting_trials: list[dict[str, Any]] = []
        self._wrote = False  # this log has written parts (so a missing table folder means it was deleted)
        self.write_error: str | None = None
        self.warned = False
        self.folder_lost = False

    @property
    def pending(self) -> int:
        """Rows not yet written."""
        return len(self._waiting_epochs) + len(self._waiting_trials)

    def load(self) -> None:
        """Read what is on disk; a damaged part is set aside (its rows come back from the checkpoints)."""
        filesystem, folder = resolve_folder(self.folder)
        for name, schema in ((EPOCHS_FILE, EPOCHS_SCHEMA), (TRIALS_FILE, TRIALS_SCHEMA)):
            path = f"{folder}/{name}"
            self._wrote = self._wrote or filesystem.get_file_info(path).type != pafs.FileType.NotFound
            if filesystem.get_file_info(path).type == pafs.FileType.File:  # an older single-file table
                parts = [path]
            else:
                parts = table_parts(filesystem, path)
            for part in parts:
                try:
                    rows = read_part(filesystem, part, schema).to_pylist()
                except DamagedFile as err:
                    aside = f"{part.rpartition('/')[0]}/.damaged-{part.rpartition('/')[2]}"
                    filesystem.move(part, aside)
                    log.warning("warning: %s; set aside as %s, its rows are recovered from the checkpoints", err, aside)
                    continue
                for row in rows:
                    if name == EPOCHS_FILE:
                        self.epochs.setdefault(row["trial_id"], {}).setdefault(row["epoch"], row)
                    else:
                        self.finished[row["trial_id"]] = row

    def add_epoch(self, trial_id: str, config: dict[str, Any], metrics: dict[str, Any]) -> None:
        """One reported epoch; an epoch already known (re-run after a crash) keeps its first record."""
        if "epoch" not in metrics:
            return
        known = self.epochs.setdefault(trial_id, {})
        epoch = int(metrics["epoch"])
        if epoch in known:
            return
        row = {"experiment": self.experiment, "trial_id": trial_id, **typed_settings(config)}
        row.update({name: metrics.get(name) for name in REPORTED_EPOCH_KEYS})
        row["timestamp"] = utc(metrics.get(REPORTED_TIME_KEY)) or _now()
        known[epoch] = row
        self._waiting_epochs.append(row)

    def finish(
        self, trial_id: str, config: dict[str, Any], last: dict[str, Any], status: str | None, error: str | None = None
    ) -> None:
        """The trial's final row, once: status None means completed or stopped early, by its epochs."""
        if trial_id in self.finished:
            return
        epochs = [row for _, row in sorted(self.epochs.get(trial_id, {}).items())]
        row = {name: None for name in TRIALS_SCHEMA.names}
        row.update(experiment=self.experiment, trial_id=trial_id, **typed_settings(config))
        row.update(summarise_epochs(epochs, self.metric, self.mode))
        row.update(
            max_epochs=last.get("max_epochs"),
            wall_seconds=last.get("time_total_s"),
            trainable_parameters=last.get("trainable_parameters"),
            startup_seconds=last.get("startup_seconds"),
            started_at=utc(last.get("started_at")),
            **{key: last.get(key) for key in (*COST_KEYS, *PLACE_KEYS)},
            ended_at=_now(),
        )
        if status is None:
            ran_all = (
                row["epochs_run"] is not None
                and row["max_epochs"] is not None
                and row["epochs_run"] >= row["max_epochs"]
            )
            status = "completed" if ran_all else "stopped_early"
        row.update(status=status, error=error)
        self.finished[trial_id] = row
        self._waiting_trials.append(row)

    def flush(self) -> bool:
        """Write every waiting row; on failure keep them for the next try. True when nothing waits."""
        filesystem, folder = resolve_folder(self.folder)
        if self._wrote and not self.folder_lost and not file_exists(filesystem, f"{folder}/{EPOCHS_FILE}"):
            log.warning(
                "warning: the results folder %s was deleted while the search ran; writing every row this "
                "search knows again",
                self.folder,
            )
            self.folder_lost = True
            self._waiting_epochs = [row for rows in self.epochs.values() for row in rows.values()]
            self._waiting_trials = list(self.finished.values())
        if not self.pending:
            return True
        try:
            if self._waiting_epochs:
                rows = sorted(self._waiting_epochs, key=lambda r: (r["trial_id"], r["epoch"]))
                write_part(rows, EPOCHS_SCHEMA, filesystem, f"{folder}/{EPOCHS_FILE}")
                self._waiting_epochs = []
                self._wrote = True
            if self._waiting_trials:
                write_part(
                    sorted(self._waiting_trials, key=lambda r: r["trial_id"]),
                    TRIALS_SCHEMA,
                    filesystem,
                    f"{folder}/{TRIALS_FILE}",
                )
                self._waiting_trials = []
                self._wrote = True
        except (OSError, pa.ArrowException) as err:  # a full or vanished disk must not kill the search
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            if not self.warned:
                log.warning(
                    "warning: cannot write results to %s (%s); keeping %d rows in memory and retrying",
                    self.folder,
                    reason,
                    self.pending,
                )
                self.warned = True
            self.write_error = reason
            return False
        if self.warned:
            log.warning("results written to %s again", self.folder)
            self.warned = False
        self.write_error = None
        return True


def checkpoint_history(trial: Any) -> list[dict[str, Any]]:
    """The reported metrics of every epoch up to the trial's latest checkpoint ([] when none or unreadable)."""
    checkpoint = getattr(trial, "checkpoint", None)
    if checkpoint is None:
        return []
    try:
        with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{HISTORY_FILE}") as stream:
            history = json.loads(stream.read().decode())
    except FileNotFoundError:
        return []
    except (OSError, ValueError, pa.ArrowException) as err:
        log.warning(
            "warning: %s/%s is damaged (%s); its epochs cannot be recovered",
            checkpoint.path,
            HISTORY_FILE,
            str(err).splitlines()[0][:120],
        )
        return []
    return [entry for entry in history if isinstance(entry, dict)] if isinstance(history, list) else []


def reconcile(results: ResultsLog, trials: Iterable[Any]) -> None:
    """Add what Ray recorded and the tables lack: every checkpointed epoch, every finished trial's row."""
    for trial in trials:
        history = checkpoint_history(trial)
        for metrics in history:
            results.add_epoch(trial.trial_id, trial.config, metrics)
        last = {**(history[-1] if history else {}), **(trial.last_result or {})}
        if trial.status == "TERMINATED":
            results.finish(trial.trial_id, trial.config, last, None)
        elif trial.status == "ERROR":
            results.finish(trial.trial_id, trial.config, last, "error", error_reason(trial))


def error_reason(trial: Any) -> str:
    """One line for why a trial failed, from the exception Ray saved with the trial."""
    error = None
    local = getattr(trial, "pickled_error_file", None)
    try:
        if local and os.path.isfile(local) and os.path.getsize(local):  # the storage copy may lag
            from ray import cloudpickle

            with open(local, "rb") as f:
                error = cloudpickle.load(f)
        else:
            error = trial.get_pickled_error()
    except Exception:  # an unreadable or empty error file must not hide the status
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
    """Keep `epochs.parquet` and `trials.parquet` of one search up to date as results arrive."""

    def __init__(
        self, folder: str, experiment: str, metric: str = "val_acc", mode: str = "max", flush_seconds: float = 5.0
    ) -> None:
        self.results = ResultsLog(folder, experiment, metric, mode)
        self.flush_seconds = flush_seconds
        self._reconciled = False
        self._last_flush = 0.0

    def setup(self, **info: Any) -> None:
        self.results.load()

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        if not self._reconciled:  # a resumed search: what the last run could not write
            reconcile(self.results, trials)
            self._reconciled = True
            self._flush(force=True)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        known = self.results.epochs.get(trial.trial_id, {})
        before = known[max(known)]["micro_batch_size"] if known else None
        self.results.add_epoch(trial.trial_id, trial.config, result)
        if before and result.get("micro_batch_size") and result["micro_batch_size"] < before:
            log.warning(
                "trial %s ran out of GPU memory: it goes on with micro-batches of %d (the same effective batch)",
                trial_label(trial),
                result["micro_batch_size"],
            )
        self._flush()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.results.finish(trial.trial_id, trial.config, trial.last_result or {}, None)
        self._flush(force=True)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        reason = error_reason(trial)
        log.warning("trial %s failed: %s", trial_label(trial), reason)
        self.results.finish(trial.trial_id, trial.config, trial.last_result or {}, "error", reason)
        self._flush(force=True)

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        log.warning("trial %s failed (%s); retrying from its last checkpoint", trial_label(trial), error_reason(trial))

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        self._flush()

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self._flush(force=True)

    def _flush(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.results.pending and (force or now - self._last_flush >= self.flush_seconds):
            self.results.flush()
            self._last_flush = now


def complete_results(folder: str, experiment: str, metric: str, mode: str, trials: Iterable[Any]) -> ResultsLog:
    """After a search (or when there is nothing left to run): make the tables hold everything Ray recorded.

    `trials` as saved in the experiment state (an ended search's unfinished trials stay unfinished).
    Returns the log, whose `pending` rows could not be written.
    """
    results = ResultsLog(folder, experiment, metric, mode)
    results.load()
    reconcile(results, trials)
    results.flush()
    return results


# -- wandb ----------------------------------------------------------------------------------------


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
    """Ray's WandbLoggerCallback, off the driver's critical path, and never failing a search.

    wandb trouble (no network, bad key, full disk) is one warning and turns wandb off for the search.
    """

    _broken = False

    def _guard(self, action: Callable[[], Any]) -> None:
        if self._broken:
            return
        try:
            action()
        except Exception as err:
            self._broken = True
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            log.warning("wandb logging turned off for this search: %s", reason)

    def setup(self, *args: Any, **kwargs: Any) -> None:
        self._guard(lambda: super(TolerantWandbCallback, self).setup(*args, **kwargs))

    def _start_logging_actor(self, trial: Any, exclude_results: list[str], **wandb_init_kwargs: Any) -> None:
        # Ray hands wandb the trial's staging folder, which it copies to the results folder when the
        # trial ends, possibly before wandb has flushed its last records. With local storage, write
        # the run straight into the trial's results folder instead, so nothing is lost.
        if isinstance(trial.storage.storage_filesystem, pafs.LocalFileSystem):
            wandb_init_kwargs["dir"] = trial.storage.trial_fs_path
        if not self._remote_logger_class:  # Ray's restarts its actors forever, and its core worker warns of that
            env = {WANDB_ENV_VAR: os.environ[WANDB_ENV_VAR]} if WANDB_ENV_VAR in os.environ else {}
            self._remote_logger_class = ray.remote(
                num_cpus=0, **_force_on_current_node(), max_restarts=0, runtime_env={"env_vars": env}
            )(self._logger_actor_cls)
        super()._start_logging_actor(trial, exclude_results, **wandb_init_kwargs)

    def log_trial_start(self, trial: Any) -> None:
        self._guard(lambda: super(TolerantWandbCallback, self).log_trial_start(trial))

    def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
        """Ray's version waits for the trial's queue actor to take each result (seconds for the first one),
        and the driver, so every trial, waited with it. Sent without waiting instead: one caller's calls
        to one actor run in the order they were made."""

        def send() -> None:
            if trial not in self._trial_logging_actors:
                self.log_trial_start(trial)
            clean = _clean_log(result, video_kwargs=self.video_kwargs, image_kwargs=self.image_kwargs)
            self._trial_queues[trial].actor.put.remote((_QueueItem.RESULT, clean), None)

        self._guard(send)

    def log_trial_end(self, trial: Any, failed: bool = False) -> None:
        self._guard(lambda: super(TolerantWandbCallback, self).log_trial_end(trial, failed))

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        """Close every run still open (an interrupted search's too), then wait for them a bounded time.

        Ray waits `upload_timeout` for runs whose trials never ended: 5 minutes after a Ctrl-C.
        Offline runs are already on disk; closing them takes seconds.
        """

        def finish_all() -> None:
            for trial in list(self._trial_queues):
                self._trial_queues[trial].actor.put.remote((_QueueItem.END, None), None)
            self._cleanup_logging_actors(timeout=self._upload_timeout, kill_on_timeout=True)

        self._guard(finish_all)


def wandb_callback(project: str, experiment: str) -> TolerantWandbCallback:
    """One wandb run per trial, grouped by experiment, config logged, step = epoch (one report per epoch).

    The caller sets WANDB_MODE=offline in the driver's environment before Ray starts when there
    is no API key (see `search.configure_wandb`).
    """
    offline = os.environ.get("WANDB_MODE") == "offline"
    return TolerantWandbCallback(
        project=project,
        group=experiment,
        log_config=False,
        # at the end, wait at most this long for the runs to be closed (offline: a few seconds each, more on a busy
        # machine; a run killed before it closed lost its history once in CI at 20 s) or uploaded
        upload_timeout=120 if offline else 300,
        excludes=[
            "pid",
            "hostname",
            "node_ip",
            "date",
            "time_since_restore",
            "iterations_since_restore",
            "checkpoint_dir_name",
            "timestamp",
            REPORTED_TIME_KEY,
            "started_at",
        ],
        resume="allow",  # a restored trial continues its run (same id) instead of clashing with it
        job_type="trial",
    )


def unwritten_message(results: ResultsLog) -> str:
    return (
        f"{results.pending} result rows could not be written to {results.folder} ({results.write_error}); "
        f"free space there, then run the same command with --resume to write them from the checkpoints"
    )
