"""`python -m tune_inat.search` and `tune_inat.search(...)`: the product's main job, a Ray Tune search over
fine-tuning recipes. `run_job` is the job; the command prints its report, the API returns a `SearchResult`.

Read top to bottom, like a Ray Tune example's `main`:
claim the search's name (a lock; a new name, or the same search to resume) -> plan (the space
file and flags, or on --resume the saved search) -> prepare the data (decode-once caches, weights)
-> connect to Ray and plan resources -> build (or restore) the Tuner -> run -> complete the
results from what Ray recorded -> summarise, write best_config.yaml, exit with a code that says
what happened (0 done, 1 the search failed, 2 bad input, 130 interrupted).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import pickle
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from tune_inat.cli import (
    add_data_arguments,
    command_flags,
    command_parser,
    data_config_from_args,
    make_callable,
    parse_flags,
    run_command,
    setup_logging,
)
from tune_inat.data.dataset import DataConfig, TrainValData, prepare_train_val
from tune_inat.errors import EXIT_INTERRUPTED, EXIT_SEARCH_FAILED, UserError
from tune_inat.place import Claim, SearchPlace, new_name, newest_search
from tune_inat.ray_state import recover_replaced_checkpoints, saved_trials, set_aside_broken_ray_state
from tune_inat.results import (
    BEST_CONFIG_FILE,
    EPOCHS_FILE,
    SEARCH_RECORD_FILE,
    STUDY_FILE,
    TRIALS_FILE,
    absolute_location,
    best_trial,
    check_writable,
    file_exists,
    format_leaderboard,
    is_local,
    leaderboard,
    read_results,
    read_search_record,
    resolve_folder,
    write_search_record,
    write_text,
)
from tune_inat.settings import settings_of_row, settings_yaml
from tune_inat.space import load_space, parse_duration, with_fixed, with_overrides
from tune_inat.spec import SearchSpec, differences, spec_from_dict
from tune_inat.strategies import SCHEDULERS, SEARCHERS, expands_grid

if TYPE_CHECKING:
    from tune_inat.searchers import StudyMirror

log = logging.getLogger(__name__)

# -- planning: what to search, and with which resources ----------------------------------------------


@dataclass(frozen=True)
class TrialResources:
    """What each trial reserves, and how many run at once."""

    cpus: float
    gpus: float
    max_concurrent: int


def plan_resources(spec: SearchSpec, nodes: list[dict[str, float]], warn: bool = True) -> TrialResources:
    """Check the asked-for resources against the cluster's nodes, before any trial starts."""
    options = spec.options
    node_gpus = [node.get("GPU", 0.0) for node in nodes]
    node_cpus = [node.get("CPU", 0.0) for node in nodes]
    gpus = options.gpus_per_trial
    if sum(node_gpus) == 0:
        if warn and (gpus is None or gpus > 0):
            log.warning("warning: no GPU in the Ray cluster: trials run on the CPU (slow; fine for the demo)")
        gpus = 0.0
    elif gpus is None:
        gpus = 0.25
    if gpus > max(node_gpus):
        raise UserError(f"gpus_per_trial {gpus:g} is more than any node has ({max(node_gpus):g} GPUs per node)")
    cpus = options.cpus_per_trial or (2.0 if gpus > 0 else 1.0)
    if cpus > max(node_cpus):
        raise UserError(f"cpus_per_trial {cpus:g} is more than any node has ({max(node_cpus):g} CPUs per node)")
    fits = sum(
        min(math.floor(c / cpus + 1e-9), math.floor(g / gpus + 1e-9) if gpus else sys.maxsize)
        for c, g in zip(node_cpus, node_gpus)
    )
    if fits == 0:
        raise UserError(f"no node has {cpus:g} CPUs and {gpus:g} GPUs free for one trial")
    max_concurrent = options.max_concurrent_trials or max(
        1, fits if expands_grid(spec) else min(fits, options.num_samples)
    )
    return TrialResources(cpus=cpus, gpus=gpus, max_concurrent=max_concurrent)


def local_node_resources() -> dict[str, float]:
    """What a local Ray would have: this machine's CPUs and CUDA GPUs (checked before starting Ray)."""
    import torch

    return {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}


def prefetch_weights(spec: SearchSpec) -> None:
    """Download ImageNet weights once in the driver (one clear line offline, naming all), never in trials."""
    from tune_inat.models import fetch_weights

    if "imagenet" in spec.values_of("weights"):
        fetch_weights(spec.values_of("backbone"), random_init_hint="--set weights=none")


def prepare_data(spec: SearchSpec, data_config: DataConfig) -> dict[int, TrainValData]:
    """Build (or find) the decode-once cache for every resolution the space can ask for."""
    return {size: prepare_train_val(data_config, size) for size in sorted(spec.image_sizes())}


def search_record(spec: SearchSpec, data_config: DataConfig, place: SearchPlace) -> dict[str, Any]:
    """search.json: the search itself, so that --resume, analyze and final read the same search back."""
    return {
        "name": place.name,
        "space": spec.source,
        "metric": spec.metric,
        "mode": spec.mode,
        "searched": spec.searched(),
        "seed": spec.options.seed,
        "experiment_path": place.experiment,
        "data_root": str(data_config.root),
        "cache_dir": str(data_config.cache_dir),
        "val_fraction": data_config.val_fraction,
        "test_fraction": data_config.test_fraction,
        "split_seed": data_config.split_seed,
        "spec": spec.to_dict(),
    }


def trial_name(trial: Any) -> str:
    """Short trial names and folders, "trial_<number>_<id>" ("trial_003_1a2b3c4d"), not Tune's config-laden ones."""
    number = trial.experiment_tag.split("_", 1)[0]
    return f"trial_{int(number):03d}_{trial.trial_id}" if number.isdigit() else f"trial_{trial.trial_id}"


# -- running ---------------------------------------------------------------------------------------


@dataclass
class SearchOutcome:
    """How a search run ended, from what Ray saved and what the results tables hold."""

    place: SearchPlace
    grid: Any  # Ray's ResultGrid, or None when nothing ran
    unfinished: int  # trials left to run: not ended in Ray's saved state, or never started
    unwritten: int  # result rows that could not be written
    unwritten_message: str = ""
    state_not_saved: str = ""  # why Ray could not save its experiment state (so `unfinished` may be stale)
    folder_lost: bool = False  # the results folder was deleted while the search ran
    interrupted: bool = False  # Ray caught a stop signal (Ctrl-C, SIGINT, SIGUSR1) and ended the run early
    left: tuple[str, ...] = ()  # the unfinished trials as Ray saved them: "trial 3 (1a2b3c4d) PAUSED"


class StateSaveFailures(logging.Handler):
    """Notes Ray's own report that saving the experiment state failed (its syncer logs it and goes on)."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.reason = ""

    def emit(self, record: logging.LogRecord) -> None:
        if "Saving experiment state" in record.getMessage() or "snapshotting failed" in record.getMessage():
            error = record.exc_info[1] if record.exc_info else None
            self.reason = (str(error).strip().splitlines() or [type(error).__name__])[-1][:200] if error else "unknown"


class StopSignals(logging.Handler):
    """Notes that Ray's Tune caught a stop signal: it ends the run early and returns as if it had finished."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.caught = False

    def emit(self, record: logging.LogRecord) -> None:
        if "Stop signal received" in record.getMessage():
            self.caught = True


def param_space(spec: SearchSpec) -> dict[str, Any]:
    """Ray's `param_space`: the fixed settings, and the searched ones unless the searcher holds its own space.

    Ray does not keep it in tuner.pkl, so a restore passes it again, rebuilt from the saved search.
    """
    from tune_inat.space import searched_tune_space
    from tune_inat.strategies import searcher_entry

    space = {**spec.fixed(), "seed": spec.fixed().get("seed", spec.options.seed)}
    if not searcher_entry(spec.searcher).holds_space:
        space.update(searched_tune_space(spec))  # random and grid: Ray's variant generator samples the param space
    return space


def build_tuner(
    spec: SearchSpec,
    trainable: Any,
    place: SearchPlace,
    resources: TrialResources,
    *,
    wandb_project: str | None,
    verbose: int,
) -> Any:
    """A new Tuner: the space's searcher and scheduler, Parquet (+ wandb) callbacks, a checkpoint per epoch."""
    from ray import tune

    from tune_inat.callbacks import ParquetResults, wandb_callback
    from tune_inat.console import StatusReporter
    from tune_inat.space import searched_tune_space
    from tune_inat.strategies import scheduler_entry, searcher_entry

    searcher = searcher_entry(spec.searcher)
    storage_root, _, name = place.experiment.rpartition("/")
    return tune.Tuner(
        trainable,
        param_space=param_space(spec),
        tune_config=tune.TuneConfig(
            metric=spec.metric,
            mode=spec.mode,
            search_alg=searcher.build(spec, searched_tune_space(spec), resources.max_concurrent, study_mirror(place)),
            scheduler=scheduler_entry(spec.options.scheduler).build(spec),
            num_samples=1 if searcher.expands_grid else spec.options.num_samples,
            max_concurrent_trials=resources.max_concurrent,
            time_budget_s=spec.options.time_budget_s,
            trial_name_creator=trial_name,
            trial_dirname_creator=trial_name,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage_root,
            callbacks=[
                ParquetResults(place.results, place.name, spec.metric, spec.mode),
                *([wandb_callback(wandb_project, place.name)] if wandb_project else []),
            ],
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute=spec.metric, checkpoint_score_order=spec.mode
            ),  # the best checkpoint, and Ray always keeps the latest too
            failure_config=tune.FailureConfig(max_failures=spec.options.max_failures),
            verbose=verbose,
            progress_reporter=StatusReporter(  # used with RAY_AIR_NEW_OUTPUT=0, which the CLI sets
                spec.metric,
                spec.mode,
                spec.searched(),
                spec.max_epochs,
                1 if searcher.expands_grid else spec.options.num_samples,
                resources.max_concurrent,
            ),
        ),
    )


def study_mirror(place: SearchPlace) -> StudyMirror | None:
    """results/<name>/optuna.db for a local results folder (SQLite cannot live in object storage: none there)."""
    from tune_inat.searchers import StudyMirror

    if not is_local(place.results):
        return None
    return StudyMirror(Path(place.results.removeprefix("file://")) / STUDY_FILE, place.name)


def restore_tuner(spec: SearchSpec, place: SearchPlace, trainable: Any) -> Any:
    """The interrupted search's Tuner; damaged state is one line."""
    from ray import tune

    try:
        return tune.Tuner.restore(
            place.experiment, trainable, resume_unfinished=True, resume_errored=False, param_space=param_space(spec)
        )
    except Exception as err:  # Ray raises many kinds for a damaged experiment folder
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise UserError(
            f"cannot resume {place.name}: Ray's experiment state in {place.experiment} is damaged "
            f"({reason}); its results stay in {place.results}; start a new search with another --name"
        ) from None


def run_search(
    spec: SearchSpec,
    data_config: DataConfig,
    data_by_size: dict[int, TrainValData],
    results_root: str,
    name: str,
    *,
    storage_root: str | None = None,
    resume: bool = False,
    wandb_project: str | None = None,
    verbose: int = 1,
    before_epoch: Any = None,
) -> SearchOutcome:
    """Claim the name, run (or resume) the search on the already-initialised Ray, complete its results."""
    place = SearchPlace.of(results_root, name, storage_root)
    with Claim(place, resume):
        return execute(
            spec,
            data_config,
            data_by_size,
            place,
            resume=resume,
            wandb_project=wandb_project,
            verbose=verbose,
            before_epoch=before_epoch,
        )


def execute(
    spec: SearchSpec,
    data_config: DataConfig,
    data_by_size: dict[int, TrainValData],
    place: SearchPlace,
    *,
    resume: bool,
    wandb_project: str | None,
    verbose: int,
    before_epoch: Any = None,
) -> SearchOutcome:
    """Run or resume the search (its name already claimed); then make the tables hold everything Ray recorded."""
    import ray
    from ray import tune

    from tune_inat.callbacks import complete_results, unwritten_message
    from tune_inat.console import trial_label, unfinished_trials
    from tune_inat.trainable import TrialContext, fine_tune_trial

    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    resources = plan_resources(spec, nodes)
    if len(nodes) > 1 and is_local(place.experiment):
        log.warning(
            "warning: %d nodes share this search: %s must be a folder every node mounts (NFS), "
            "or pass --storage-path s3://... / gs://...",
            len(nodes),
            place.experiment,
        )
    context = TrialContext(
        data_by_size=data_by_size, data_config=data_config, max_epochs=spec.max_epochs, before_epoch=before_epoch
    )
    trainable = tune.with_resources(
        tune.with_parameters(fine_tune_trial, context=context), {"cpu": resources.cpus, "gpu": resources.gpus}
    )
    if resume:
        set_aside_broken_ray_state(place)
        recover_replaced_checkpoints(place)
        tuner = restore_tuner(spec, place, trainable)
    else:
        write_search_record(place.results, search_record(spec, data_config, place))
        tuner = build_tuner(spec, trainable, place, resources, wandb_project=wandb_project, verbose=verbose)
    state_failures, stop_signals = StateSaveFailures(), StopSignals()
    for handler in (state_failures, stop_signals):
        logging.getLogger("ray.tune").addHandler(handler)
    signal_log = logging.getLogger("ray.tune.tune")  # where Tune's signal handler logs, at WARNING
    signal_log_level = signal_log.level
    if signal_log.getEffectiveLevel() > logging.WARNING:  # a quiet Ray would not even create the record
        signal_log.setLevel(logging.WARNING)  # Ray's own handler still hides it (OnlyCritical) unless --verbose
    try:
        grid = tuner.fit()
    except (EOFError, pickle.UnpicklingError) as err:
        # Ray builds its ResultGrid by unpickling each failed trial's error.pkl after the run; one left empty by a
        # failed write (a full disk) raises here although the run ended and its state was saved.
        log.warning(
            "warning: Ray could not read back a trial's error file (%s: %s); the results below come from "
            "the saved experiment state",
            type(err).__name__,
            err,
        )
        grid = None
    finally:
        signal_log.setLevel(signal_log_level)
        for handler in (state_failures, stop_signals):
            logging.getLogger("ray.tune").removeHandler(handler)
    folder_lost = not place.has(place.results, SEARCH_RECORD_FILE)
    if folder_lost:  # deleted under the running search: the record at least is written again
        write_search_record(place.results, search_record(spec, data_config, place))
    trials = saved_trials(place)
    results = complete_results(place.results, place.name, spec.metric, spec.mode, trials)
    left = unfinished_trials(trials)
    unfinished = len(left)
    if not expands_grid(spec) and not spec.options.time_budget_s:
        unfinished += max(0, spec.options.num_samples - len(trials))  # not even started yet
    # A failed save matters only if the saved state is behind: one that shows every trial ended was written after
    # them (Ray retries its saves, so a passing failure of one is followed by a good one).
    state_behind = unfinished > 0 or not trials
    return SearchOutcome(
        place,
        grid,
        unfinished,
        results.pending,
        unwritten_message(results) if results.pending else "",
        state_failures.reason if state_behind else "",
        folder_lost,
        stop_signals.caught,
        tuple(f"trial {trial_label(t)} {t.status}" for t in left),
    )


# -- after the search ------------------------------------------------------------------------------


def exit_status(outcome: SearchOutcome, budget_spent: bool, resume_hint: str) -> tuple[int, str]:
    """The exit code of an ended run and its message: 0 only when every trial ended and every row is written.

    130 means a stop signal ended it early; a trial Ray left unfinished without one is a failure of the
    search (exit 1), named with the state Ray saved for it.
    """
    place = outcome.place
    if outcome.unwritten:
        return EXIT_SEARCH_FAILED, f"error: {outcome.unwritten_message}"
    if outcome.folder_lost:
        return EXIT_SEARCH_FAILED, (
            f"error: the results folder {place.results} was deleted while the search ran; every row this run saw "
            f"is written there again, but Ray's state in it is lost: start a new search to run the rest"
        )
    if outcome.state_not_saved:
        return EXIT_SEARCH_FAILED, (
            f"error: Ray could not save the search's state to {place.experiment} ({outcome.state_not_saved}); "
            f"free space there, then continue with: {resume_hint}"
        )
    if not outcome.unfinished or budget_spent:
        return 0, ""
    if outcome.interrupted:
        return EXIT_INTERRUPTED, (
            f"\ninterrupted with {outcome.unfinished} trials unfinished; results so far are in {place.results}\n"
            f"resume with: {resume_hint}"
        )
    named = ", ".join(outcome.left) or "none started"
    never_started = outcome.unfinished - len(outcome.left)
    return EXIT_SEARCH_FAILED, (
        f"error: the search ended without an interrupt, but Ray saved {outcome.unfinished} trials as unfinished "
        f"({named}{f'; {never_started} never started' if never_started and outcome.left else ''}); "
        f"results so far are in {place.results}; run the rest with: {resume_hint}"
    )


def write_best_config(place: SearchPlace, mode: str) -> str | None:
    """best_config.yaml: the best trial's recipe, which `python -m tune_inat.train --config` re-runs."""
    results = read_results(place.results)
    best = best_trial(results.trials, mode)
    if best is None:
        return None
    settings = settings_of_row(best, f"trial {best['trial_id']}")
    header = (
        f"best of search {place.name}: trial {best['trial_id']}, {results.metric} {best['best_score']:.4g} "
        f"(val_acc {100 * best['best_val_acc']:.1f}%) at epoch {int(best['best_epoch'])}"
    )
    filesystem, path = resolve_folder(place.results)
    write_text(filesystem, f"{path}/{BEST_CONFIG_FILE}", settings_yaml(settings, header))
    return f"{place.results}/{BEST_CONFIG_FILE}"


def summary(place: SearchPlace, data_root: Path, best_config: str | None) -> str:
    """Leaderboard, what early stopping saved, the best trial, and the paths of what was written."""
    results = read_results(place.results)
    trials = results.trials
    if trials.empty:
        return "no trial finished an epoch"
    board = leaderboard(trials, results.record.get("searched", []), results.mode)
    lines = [
        f"Leaderboard: top {len(board)} of {len(trials)} trials by {results.metric}",
        format_leaderboard(board, results.metric),
    ]
    stopped = int((trials["status"] == "stopped_early").sum())
    errors = int((trials["status"] == "error").sum())
    budget = int(trials["max_epochs"].fillna(0).sum())
    lines.append(
        f"{stopped} of {len(trials)} trials stopped early; {len(results.epochs)} of {budget} trial-epochs run"
        + (f"; {errors} trials failed (see the error column of trials.parquet)" if errors else "")
    )
    best = best_trial(trials, results.mode)
    if best is not None:
        lines.append(
            f"Best: trial {best['trial_id']} ({best['backbone']}), val_acc {100 * best['best_val_acc']:.1f}% "
            f"at epoch {int(best['best_epoch'])}"
        )
    lines.append("Written:")
    filesystem, path = resolve_folder(place.results)
    for name, what in ((TRIALS_FILE, "one row per trial"), (EPOCHS_FILE, "one row per trial and epoch")):
        if file_exists(filesystem, f"{path}/{name}"):
            lines.append(f"  {place.results}/{name}    {what}")
    if best_config and file_exists(filesystem, f"{path}/{BEST_CONFIG_FILE}"):
        lines.append(f"  {best_config}  re-run it: python -m tune_inat.train --data {data_root} --config {best_config}")
    lines.append("Next:")
    lines.append(f"  python -m tune_inat.analyze {place.results}     tables, plots, report.md")
    lines.append(f"  python -m tune_inat.final {place.results}       confirm the best, re-train, test once, export")
    return "\n".join(lines)


def failure(place: SearchPlace) -> str | None:
    """One line when every trial failed (the search found nothing), else None."""
    results = read_results(place.results)
    trials = results.trials
    if len(trials) and (trials["status"] == "error").all():
        first = trials["error"].dropna()
        reason = f" (first: {first.iloc[0]})" if len(first) else ""
        return (
            f"all {len(trials)} trials of {place.name} failed{reason}; see the error column of "
            f"{place.results}/{TRIALS_FILE}, fix the cause and start a new search"
        )
    return None


def resume_command(argv: Sequence[str], name: str) -> str:
    """The command line that resumes this search: the same flags, plus --resume --name NAME."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--name":
            skip = True
            continue
        if arg.startswith("--name=") or arg == "--resume":
            continue
        kept.append(arg)
    return " ".join(["python -m tune_inat.search", *kept, "--resume", "--name", name])


class OnlyCritical(logging.Filter):
    """Ray's console lines (its warnings, its tracebacks of what it retries or survives) hidden; --verbose shows them.

    What matters reaches the user through this program's own one-line messages and the results tables.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.CRITICAL


def quiet_ray_console(verbose: bool) -> None:
    import ray  # noqa: F401  (importing Ray installs its console handler)

    shared = set(logging.getLogger().handlers)  # ours and test harnesses' (pytest adds them to Ray's logger too)
    for handler in [h for h in logging.getLogger("ray").handlers if h not in shared]:
        for existing in [f for f in handler.filters if isinstance(f, OnlyCritical)]:
            handler.removeFilter(existing)
        if not verbose:
            handler.addFilter(OnlyCritical())


def require_token_auth() -> None:
    """The search's own local Ray refuses strangers: token authentication on, whatever the environment says.

    Ray 2.60 cannot bind a local cluster to loopback: its GCS, raylet and workers listen on every
    interface. Its token authentication is what refuses a client from elsewhere; with
    RAY_AUTH_MODE=disabled (as older guides set it) anyone who reaches the machine could run code in it.
    """
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None and mode.lower() != "token":
        log.warning(
            "RAY_AUTH_MODE=%s is not used for the search's own local Ray: Ray listens on every interface, so it "
            "runs with token authentication (join it on purpose with RAY_AUTH_MODE=token and the token in "
            "~/.ray/auth_token, or start a cluster of your own and pass --address)",
            mode,
        )
    from ray._private.authentication.authentication_token_setup import _enable_token_auth

    _enable_token_auth()  # Ray's own switch: RAY_AUTH_MODE=token for this process and Ray's, config reloaded


def connect_ray(address: str | None, dashboard: bool, worker_logs: bool, verbose: bool = False) -> None:
    """Start a local Ray (token authentication on, dashboard on 127.0.0.1), or join `address`; an unreachable
    cluster is one clear line."""
    import ray

    level = logging.INFO if verbose else logging.ERROR  # Ray's own warnings (token auth, ...) only when verbose
    if address is None:
        require_token_auth()
        ray.init(
            include_dashboard=dashboard, dashboard_host="127.0.0.1", logging_level=level, log_to_driver=worker_logs
        )
        return
    if address.startswith(("http://", "https://")):
        raise UserError(
            f"--address takes the cluster address HOST:PORT (GCS, port 6379 by default), not the "
            f"dashboard URL {address}; that one is for `ray job submit --address`"
        )
    if address != "auto" and not address.startswith("ray://"):
        host, _, port = address.rpartition(":")
        try:
            socket.create_connection((host or "127.0.0.1", int(port)), timeout=3).close()
        except (OSError, ValueError) as err:
            raise UserError(
                f"cannot reach a Ray cluster at {address} ({getattr(err, 'strerror', None) or err}); "
                f"start one with `ray start --head` or check the address"
            ) from None
    try:
        ray.init(address=address, logging_level=level, log_to_driver=worker_logs)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise UserError(f"cannot connect to the Ray cluster at {address}: {str(err).splitlines()[0]}") from None


# -- the command line ---------------------------------------------------------------------------------


def search_parser() -> argparse.ArgumentParser:
    parser = command_parser(
        "python -m tune_inat.search", "Search fine-tuning recipes with Ray Tune (ASHA early stopping, Optuna TPE)."
    )
    add_data_arguments(parser, required=False)
    search = parser.add_argument_group("the search")
    search.add_argument(
        "--space",
        default=None,
        metavar="FILE|NAME",
        help="search space YAML (W&B sweep format) or a shipped name: default, quick, seed_sweep, demo "
        "(default: default; demo with --demo; on --resume the saved one)",
    )
    search.add_argument(
        "--name",
        default=None,
        help="search name (default <space>-<date>-<time>); --resume without it takes the newest of the space",
    )
    search.add_argument("--results", default="results", help="results folder or URI")
    search.add_argument(
        "--storage-path",
        default=None,
        metavar="PATH|URI",
        help="where Ray keeps experiment state and "
        "checkpoints (default: the results folder); NFS path or s3:// / gs://",
    )
    search.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted search, with its saved space and settings (Tuner.restore)",
    )
    search.add_argument(
        "--plan",
        action="store_true",
        help="show how the space file was read (each key -> our setting), the trials, the scheduler's rungs, "
        "the resources and the most trial-epochs, then exit (no Ray, no training)",
    )
    search.add_argument(
        "--clean-checkpoints",
        action="store_true",
        help="when the search has finished, delete every "
        "checkpoint but the best one (also: python -m tune_inat.clean RESULTS_DIR)",
    )
    options = parser.add_argument_group("search options (override the space file's tune_inat: block)")
    options.add_argument("--num-samples", type=int, default=None, help="number of trials (W&B run_cap)")
    options.add_argument(
        "--max-epochs", type=int, default=None, help="cap on every trial's epochs; the scheduler's max_t"
    )
    options.add_argument(
        "--scheduler",
        choices=list(SCHEDULERS),
        default=None,
        help="; ".join(f"{s.name}: {s.help}" for s in SCHEDULERS.values()) + " (default: the space's, else asha)",
    )
    options.add_argument("--grace-period", type=int, default=None, help="asha: epochs before a trial can be stopped")
    options.add_argument(
        "--reduction-factor", type=float, default=None, help="asha: keep 1/this of the trials at each rung"
    )
    options.add_argument(
        "--searcher",
        choices=list(SEARCHERS),
        default=None,
        help="; ".join(f"{s.name}: {s.help}" for s in SEARCHERS.values()) + " (default: from the space's method)",
    )
    options.add_argument(
        "--gpus-per-trial",
        type=float,
        default=None,
        help="GPU share per trial, e.g. 0.25: four trials per GPU (default 0.25 where there are GPUs)",
    )
    options.add_argument(
        "--cpus-per-trial",
        type=float,
        default=None,
        help="CPUs each trial reserves (default 2 with GPUs, 1 without; a GPU share alone reserves none)",
    )
    options.add_argument(
        "--max-concurrent-trials",
        type=int,
        default=None,
        help="trials running at once (default: as many as the resources fit)",
    )
    options.add_argument(
        "--time-budget", default=None, help="stop launching and end the search after this long, e.g. 2h, 90m"
    )
    options.add_argument("--seed", type=int, default=None, help="experiment seed (searcher and trials; default 0)")
    options.add_argument(
        "--warm-start",
        default=None,
        metavar="RESULTS_DIR",
        help="an earlier search on the same data: its finished trials teach the searcher before its first "
        "suggestion, and its best recipes run first",
    )
    options.add_argument(
        "--reproducible",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="take every searcher and scheduler decision in trial order, so the same seed, space and "
        "resources give the same trials, stops and winner (slower: trials wait at rungs); "
        "default: the space's (the demo space: on)",
    )
    options.add_argument(
        "--max-failures", type=int, default=None, help="retries of a failed trial from its last checkpoint (default 1)"
    )
    options.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="fix a setting for every trial, replacing the space's entry (repeatable), e.g. --set weights=none",
    )
    options.add_argument(
        "--compile", action="store_true", help="torch.compile each trial's network (same as --set compile=true)"
    )
    tracking = parser.add_argument_group("wandb")
    tracking.add_argument("--no-wandb", action="store_true", help="do not log to wandb")
    tracking.add_argument("--wandb-project", default="tune-inat", help="wandb project")
    cluster = parser.add_argument_group("Ray")
    cluster.add_argument(
        "--address", default=None, help="join an existing Ray cluster: auto, or HOST:PORT (default: start a local one)"
    )
    cluster.add_argument(
        "--dashboard", action="store_true", help="start Ray's dashboard for a local cluster (on 127.0.0.1)"
    )
    cluster.add_argument(
        "--worker-logs",
        action="store_true",
        help="show the trials' own log lines (hidden by default: errors are in the status table and trials.parquet)",
    )
    return parser


def parse_assignments(items: Sequence[str]) -> dict[str, Any]:
    """["weights=none", "image_size=32"] -> {"weights": "none", "image_size": 32} (values read as YAML)."""
    fixed = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise UserError(f"--set takes NAME=VALUE, got {item!r}")
        fixed[name.strip()] = yaml.safe_load(value) if value.strip() else ""
    return fixed


def build_spec(args: argparse.Namespace, base: SearchSpec | None = None) -> SearchSpec:
    """The space file (or `base`, a saved search) with the command line's fixed settings and options on top."""
    fixed = parse_assignments(args.set)
    if args.compile:
        fixed["compile"] = True
    spec = (
        base
        if base is not None and args.space is None
        else load_space(args.space or ("demo" if args.demo else "default"))
    )
    rungs = {
        k: v
        for k, v in (("grace_period", args.grace_period), ("reduction_factor", args.reduction_factor))
        if v is not None
    }
    return with_overrides(
        with_fixed(spec, fixed),
        scheduler_options=rungs,
        num_samples=args.num_samples,
        max_epochs=args.max_epochs,
        scheduler=args.scheduler,
        searcher=args.searcher,
        gpus_per_trial=args.gpus_per_trial,
        cpus_per_trial=args.cpus_per_trial,
        max_concurrent_trials=args.max_concurrent_trials,
        time_budget_s=parse_duration(args.time_budget, "--time-budget") if args.time_budget else None,
        seed=args.seed,
        reproducible=args.reproducible,
        warm_start=absolute_location(args.warm_start) if args.warm_start else None,
        max_failures=args.max_failures,
        split_seed=args.split_seed,
        val_fraction=args.val_fraction,
    )


def resumed_plan(args: argparse.Namespace, place: SearchPlace) -> tuple[SearchSpec, DataConfig]:
    """The saved search, exactly: a command line that would change it is refused in one line."""
    record = read_search_record(place.results)
    saved = spec_from_dict(record.get("spec"), f"{place.results}/{SEARCH_RECORD_FILE}")
    changes = differences(saved, build_spec(args, base=saved))
    if changes:
        raise UserError(
            f"--resume continues search {place.name} as it was started; the command line changes "
            f"{'; '.join(changes[:3])}. Resume without those flags, or start a new search with another --name"
        )
    data_config = DataConfig(
        root=Path(record["data_root"]),
        cache_dir=Path(record["cache_dir"]),
        val_fraction=record["val_fraction"],
        test_fraction=record["test_fraction"],
        split_seed=record["split_seed"],
    )
    if args.data or args.demo or args.cache_dir:
        given = data_config_from_args(args, saved.options.val_fraction, saved.options.split_seed)
        if given.root != data_config.root:
            raise UserError(
                f"--resume continues search {place.name} on {data_config.root}, not {given.root}; "
                f"resume without --data, or start a new search with another --name"
            )
        data_config = replace(data_config, cache_dir=given.cache_dir)
    return saved, data_config


def quiet_ray_environment(verbose: bool = False) -> None:
    """Ray's console: our status block instead of its boxes and tables; its own log lines only when verbose."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the legacy output engine, which takes our reporter
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("TUNE_WARN_SLOW_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)


def configure_wandb(enabled: bool) -> str | None:
    """wandb mode for this search, set in the driver's environment before Ray starts.

    Online when wandb has an API key (WANDB_API_KEY or `wandb login`), else offline; an explicit
    WANDB_MODE is respected. Returns the mode, or None when wandb is off.
    """
    if not enabled:
        return None
    from tune_inat.callbacks import wandb_is_logged_in

    if "WANDB_MODE" not in os.environ and not wandb_is_logged_in():
        os.environ["WANDB_MODE"] = "offline"
    return os.environ.get("WANDB_MODE", "online")


def fault_hook() -> Any:
    """The test-only fault injector when TUNE_INAT_FAULTS is set (see `tune_inat.faults`), else None."""
    from tune_inat.faults import FAULTS_VARIABLE, FaultInjector, parse_faults

    if not os.environ.get(FAULTS_VARIABLE):
        return None
    try:
        return FaultInjector(parse_faults(os.environ[FAULTS_VARIABLE]))
    except ValueError as err:
        raise UserError(f"{FAULTS_VARIABLE}: {err}") from None


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(search_parser(), lambda args: search(args, list(sys.argv[1:] if argv is None else argv)), argv)


def show_plan(args: argparse.Namespace) -> int:
    """--plan: how the file was read and what the search would spend; exit 0, or 2 with every problem."""
    from tune_inat.plan import plan_lines
    from tune_inat.space import read_space_file

    reading = read_space_file(args.space or ("demo" if args.demo else "default"))
    spec = build_spec(args, base=reading.spec if args.space is None else None)
    resources = plan_resources(spec, [local_node_resources()], warn=False)
    print("\n".join(plan_lines(reading, spec, resources.cpus, resources.gpus, resources.max_concurrent)))
    return 0


@dataclass(frozen=True)
class SearchRun:
    """How one search job ended: where it lives, its exit code, and what the command prints."""

    place: SearchPlace
    code: int
    message: str = ""  # why the code is not 0 (the command prints it to stderr)
    report: str = ""  # the summary and the next commands (stdout)


def search(args: argparse.Namespace, argv: list[str]) -> int:
    """The command: the job, then its report; the exit code says how it went."""
    if args.plan:
        return show_plan(args)
    job = run_job(args, argv)
    if job.message:
        print(job.message, file=sys.stderr)
    if job.report:
        print(job.report)
    return job.code


def run_job(args: argparse.Namespace, argv: list[str]) -> SearchRun:
    """The whole job: claim, plan, prepare, run, complete, summarise. Joins a Ray already started in this process
    (a notebook's), else starts its own and stops it at the end."""
    if not (args.data or args.demo or args.resume):
        raise UserError("one of --data DIR or --demo is required (or --resume, to continue a saved search)")
    quiet_ray_environment(args.verbose or args.debug)
    check_writable(args.results, "results folder")
    if args.storage_path:
        check_writable(args.storage_path, "--storage-path")
    spec = None if args.resume else build_spec(args)
    if args.resume:
        stem = Path(args.space).stem if args.space else ("demo" if args.demo else "default")
        name = args.name or newest_search(stem, args.results)
    else:
        name = args.name or new_name(spec, args.results, args.storage_path)
    place = SearchPlace.of(args.results, name, args.storage_path)
    with Claim(place, args.resume):
        resume = args.resume
        if resume:
            if not place.has(place.results, SEARCH_RECORD_FILE):
                raise UserError(
                    f"nothing to resume: {place.results} holds no search (it stopped before writing "
                    f"{SEARCH_RECORD_FILE}); start it afresh: the same command without --resume"
                )
            spec, data_config = resumed_plan(args, place)
            set_aside_broken_ray_state(place)
            if not place.restorable():
                if place.has(place.results, EPOCHS_FILE) and len(read_results(place.results).epochs):
                    raise UserError(
                        f"cannot resume {name}: Ray saved no experiment state in {place.experiment} "
                        f"before the search stopped; its results stay in {place.results}; start a new "
                        f"search with another --name"
                    )
                log.info(
                    "search %s stopped before Ray saved its state and before any epoch ended: starting it afresh", name
                )
                resume = False
        else:
            data_config = data_config_from_args(args, spec.options.val_fraction, spec.options.split_seed)
        import ray

        address = args.address or os.environ.get("RAY_ADDRESS")
        joined = address is None and ray.is_initialized()  # a notebook's own Ray (or a test session's): its cluster
        if address is None and not joined:
            plan_resources(spec, [local_node_resources()], warn=False)  # impossible resources fail before Ray starts
        if spec.options.warm_start and not resume:
            from tune_inat.warm import warm_start

            for note in warm_start(spec, spec.options.warm_start, data_config.root).notes:
                log.info(note)
        prefetch_weights(spec)
        data_by_size = prepare_data(spec, data_config)
        wandb_mode = configure_wandb(not args.no_wandb)
        before_epoch = fault_hook()
        quiet_ray_console(args.verbose or args.debug)
        if not joined:
            connect_ray(address, args.dashboard, args.worker_logs, args.verbose or args.debug)
            quiet_ray_console(args.verbose or args.debug)  # ray.init may have set up its handler anew
        start = time.monotonic()
        try:
            outcome = execute(
                spec,
                data_config,
                data_by_size,
                place,
                resume=resume,
                verbose=0 if args.quiet else 1,
                wandb_project=args.wandb_project if wandb_mode else None,
                before_epoch=before_epoch,
            )
        except KeyboardInterrupt:
            message = f"\ninterrupted; results so far are in {place.results}\nresume with: {resume_command(argv, name)}"
            return SearchRun(place, EXIT_INTERRUPTED, message)
        finally:
            if not joined:
                ray.shutdown()
    budget_spent = bool(spec.options.time_budget_s) and time.monotonic() - start >= spec.options.time_budget_s
    code, message = exit_status(outcome, budget_spent, resume_command(argv, name))
    if code:
        return SearchRun(place, code, message)
    failed = failure(place)
    if failed:
        return SearchRun(place, EXIT_SEARCH_FAILED, f"error: {failed}")
    report = [summary(place, data_config.root, write_best_config(place, spec.mode))]
    if wandb_mode == "offline":
        report.append(
            f"  wandb runs saved offline; upload them with: wandb sync {place.experiment}/trial_*/wandb/offline-run-*"
        )
    if args.clean_checkpoints:
        from tune_inat.clean import clean_checkpoints

        kept, freed = clean_checkpoints(place.results)
        report.append(f"  checkpoints: freed {freed / 2**20:.1f} MiB; kept the best: {kept}")
    return SearchRun(place, 0, report="\n".join(report))


# -- the Python API -----------------------------------------------------------------------------------


def run(data: str | Path | None = None, space: str | Path | dict | None = None, **options: Any) -> Any:
    """`tune_inat.search(...)`: the command from Python, its flags as keyword arguments (`max_epochs=2` is
    `--max-epochs 2`, `set={"weights": "none"}` is `--set weights=none`, `no_wandb=True` is `--no-wandb`;
    `space` also takes a W&B sweep as a dict). Returns a `SearchResult`; bad input raises `UserError` with the
    command's one-line message; an interrupt (a kernel's too) ends the search as Ctrl-C does (`exit_code` 130;
    `resume=True` continues it)."""
    from tune_inat.api import SearchResult, space_file

    if isinstance(space, dict):
        space = space_file(space, options.get("results", "results"))
    parser = search_parser()
    flags = command_flags(parser, {"data": data, "space": space, **options})
    args = parse_flags(parser, flags)
    setup_logging(args.debug, args.quiet)
    if args.plan:
        raise UserError("plan=True is for the command line; read a space with tune_inat.space.read_space_file")
    job = run_job(args, flags)
    return SearchResult(job.place.name, job.place.results, job.code, job.message, job.report)


make_callable(__name__, run)  # tune_inat.search(...) is the API, python -m tune_inat.search the command

if __name__ == "__main__":
    sys.exit(main())
