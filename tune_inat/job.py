"""One search job, top to bottom: claim its name, plan it, prepare the data, run it on Ray, tell how it went.

`run_job` takes a typed `SearchRequest` (what the command's flags or the API's keywords ask) and
returns a `SearchRun` (the exit code, its one line, the report); the command prints them, the API
wraps them in a `SearchResult`. No argparse here, no printing.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tune_inat.cli import data_config_from_args
from tune_inat.data.dataset import DataConfig, TrainValData, prepare_train_val
from tune_inat.errors import EXIT_INTERRUPTED, EXIT_SEARCH_FAILED, UserError
from tune_inat.place import Claim, SearchPlace, new_name, newest_search
from tune_inat.ray_session import quiet_ray_environment, ray_is_running, ray_session
from tune_inat.ray_state import set_aside_broken_ray_state
from tune_inat.report import exit_status, failure, resume_command, summary, write_best_config
from tune_inat.resources import local_node_resources, plan_resources
from tune_inat.results import EPOCHS_FILE, SEARCH_RECORD_FILE, check_writable, read_results, read_search_record
from tune_inat.space import load_space, with_fixed, with_overrides
from tune_inat.spec import SearchSpec, differences, spec_from_dict

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SearchRequest:
    """A search as asked for: the space and what the command line (or the API's keywords) set on top of it."""

    data: Path | None = None  # the dataset root; or demo, or on resume the saved one
    demo: bool = False
    cache_dir: Path | None = None
    val_fraction: float | None = None
    test_fraction: float | None = None
    split_seed: int | None = None
    space: str | None = None  # a file or a shipped name; None: default (demo with demo=True; on resume the saved)
    fixed: dict[str, Any] = field(default_factory=dict)  # --set NAME=VALUE: one value for every trial
    overrides: dict[str, Any] = field(default_factory=dict)  # the search options given (`space.with_overrides`)
    results: str = "results"
    storage_path: str | None = None
    name: str | None = None
    resume: bool = False
    address: str | None = None
    dashboard: bool = False
    worker_logs: bool = False
    verbose: bool = False  # the libraries' own console lines
    quiet: bool = False  # no status blocks
    status_interval: float = 30.0  # seconds between status blocks
    wandb: bool = True
    wandb_project: str = "tune-inat"
    clean_checkpoints: bool = False
    command: tuple[str, ...] = ()  # the command's flags, for the resume hint


@dataclass(frozen=True)
class SearchRun:
    """How one search job ended: where it lives, its exit code, and what the command prints."""

    place: SearchPlace
    code: int
    message: str = ""  # why the code is not 0 (the command prints it to stderr)
    report: str = ""  # the summary and the next commands (stdout)


def space_name(request: SearchRequest) -> str:
    return request.space or ("demo" if request.demo else "default")


def spec_of(request: SearchRequest, base: SearchSpec | None = None) -> SearchSpec:
    """The space file (or `base`, a saved search) with the request's fixed settings and options on top."""
    spec = base if base is not None and request.space is None else load_space(space_name(request))
    return with_overrides(with_fixed(spec, request.fixed), **request.overrides)


def run_job(request: SearchRequest) -> SearchRun:
    """The whole job: claim, plan, prepare, run on Ray, complete the results, report."""
    if not (request.data or request.demo or request.resume):
        raise UserError("one of --data DIR or --demo is required (or --resume, to continue a saved search)")
    quiet_ray_environment(request.verbose)
    check_writable(request.results, "results folder")
    if request.storage_path:
        check_writable(request.storage_path, "--storage-path")
    place = SearchPlace.of(request.results, search_name(request), request.storage_path)
    with Claim(place, request.resume):
        spec, data_config, resume = plan(request, place)
        address = request.address or os.environ.get("RAY_ADDRESS")
        if address is None and not ray_is_running():  # impossible resources fail before Ray starts
            plan_resources(spec, [local_node_resources()], warn=False)
        if spec.options.warm_start and not resume:
            from tune_inat.warm import warm_start

            for note in warm_start(spec, spec.options.warm_start, data_config.root).notes:
                log.info(note)
        prefetch_weights(spec)
        data_by_size = prepare_data(spec, data_config)
        wandb_mode = configure_wandb(request.wandb)
        before_epoch = fault_hook()
        start = time.monotonic()
        try:
            with ray_session(address, request.dashboard, request.worker_logs, request.verbose):
                from tune_inat.tuner import execute

                outcome = execute(
                    spec,
                    data_config,
                    data_by_size,
                    place,
                    resume=resume,
                    verbose=0 if request.quiet else 1,
                    wandb_project=request.wandb_project if wandb_mode else None,
                    before_epoch=before_epoch,
                    status_interval=request.status_interval,
                    worker_logs=request.worker_logs,
                )
        except KeyboardInterrupt:
            hint = resume_hint(request, place)
            return SearchRun(
                place, EXIT_INTERRUPTED, f"\ninterrupted; results so far are in {place.results}\nresume with: {hint}"
            )
    budget_spent = bool(spec.options.time_budget_s) and time.monotonic() - start >= spec.options.time_budget_s
    code, message = exit_status(outcome, budget_spent, resume_hint(request, place))
    if code:
        return SearchRun(place, code, message)
    failed = failure(place)
    if failed:
        return SearchRun(place, EXIT_SEARCH_FAILED, f"error: {failed}")
    return SearchRun(place, 0, report=report(request, place, data_config.root, spec.mode, wandb_mode))


def search_name(request: SearchRequest) -> str:
    """The name given; else on resume the newest search of the space, else a new one (<space>-<date>-<time>)."""
    if request.name:
        return request.name
    if request.resume:
        return newest_search(Path(request.space).stem if request.space else space_name(request), request.results)
    return new_name(spec_of(request), request.results, request.storage_path)


def plan(request: SearchRequest, place: SearchPlace) -> tuple[SearchSpec, DataConfig, bool]:
    """What to run: a new search from the request, or the saved one exactly; and whether Ray's state resumes."""
    if not request.resume:
        spec = spec_of(request)
        return spec, data_config_from_args(request, spec.options.val_fraction, spec.options.split_seed), False
    if not place.has(place.results, SEARCH_RECORD_FILE):
        raise UserError(
            f"nothing to resume: {place.results} holds no search (it stopped before writing "
            f"{SEARCH_RECORD_FILE}); start it afresh: the same command without --resume"
        )
    spec, data_config = resumed_plan(request, place)
    set_aside_broken_ray_state(place)
    if place.restorable():
        return spec, data_config, True
    if place.has(place.results, EPOCHS_FILE) and len(read_results(place.results).epochs):
        raise UserError(
            f"cannot resume {place.name}: Ray saved no experiment state in {place.experiment} before the search "
            f"stopped; its results stay in {place.results}; start a new search with another --name"
        )
    log.info("search %s stopped before Ray saved its state and before any epoch ended: starting it afresh", place.name)
    return spec, data_config, False


def resumed_plan(request: SearchRequest, place: SearchPlace) -> tuple[SearchSpec, DataConfig]:
    """The saved search, exactly: a request that would change it is refused in one line."""
    record = read_search_record(place.results)
    saved = spec_from_dict(record.get("spec"), f"{place.results}/{SEARCH_RECORD_FILE}")
    changes = differences(saved, spec_of(request, base=saved))
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
    if request.data or request.demo or request.cache_dir:
        given = data_config_from_args(request, saved.options.val_fraction, saved.options.split_seed)
        if given.root != data_config.root:
            raise UserError(
                f"--resume continues search {place.name} on {data_config.root}, not {given.root}; "
                f"resume without --data, or start a new search with another --name"
            )
        data_config = replace(data_config, cache_dir=given.cache_dir)
    return saved, data_config


def prefetch_weights(spec: SearchSpec) -> None:
    """Download ImageNet weights once in the driver (one clear line offline, naming all), never in trials."""
    from tune_inat.models import fetch_weights

    if "imagenet" in spec.values_of("weights"):
        fetch_weights(spec.values_of("backbone"), random_init_hint="--set weights=none")


def prepare_data(spec: SearchSpec, data_config: DataConfig) -> dict[int, TrainValData]:
    """Build (or find) the decode-once cache for every resolution the space can ask for."""
    return {size: prepare_train_val(data_config, size) for size in sorted(spec.image_sizes())}


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


def resume_hint(request: SearchRequest, place: SearchPlace) -> str:
    return resume_command(request.command, place.name)


def report(request: SearchRequest, place: SearchPlace, data_root: Path, mode: str, wandb_mode: str | None) -> str:
    """The summary of a finished search, best_config.yaml written, and what else was kept or freed."""
    lines = [summary(place, data_root, write_best_config(place, mode))]
    if wandb_mode == "offline":
        lines.append(
            f"  wandb runs saved offline; upload them with: wandb sync {place.experiment}/trial_*/wandb/offline-run-*"
        )
    if request.clean_checkpoints:
        from tune_inat.clean import clean_checkpoints

        kept, freed = clean_checkpoints(place.results)
        lines.append(f"  checkpoints: freed {freed / 2**20:.1f} MiB; kept the best: {kept}")
    return "\n".join(lines)
