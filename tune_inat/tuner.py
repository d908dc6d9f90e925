"""The search on Ray Tune: the Tuner built (or restored) from the search's spec, run, and its outcome read back.

Ray stays here and in `ray_session`: the trainable gets plain data and a typed context; the
searcher and scheduler come from `strategies`; the results tables are completed from the state
Ray saved, so the exit code counts what Ray really recorded.
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tune_inat.console import STATUS_INTERVAL_S
from tune_inat.data.dataset import DataConfig, TrainValData
from tune_inat.errors import UserError
from tune_inat.gpu_monitor import sampling_gpus
from tune_inat.place import Claim, SearchPlace
from tune_inat.ray_state import recover_replaced_checkpoints, saved_trials, set_aside_broken_ray_state
from tune_inat.resources import TrialResources, plan_resources
from tune_inat.results import SEARCH_RECORD_FILE, STUDY_FILE, is_local, write_search_record
from tune_inat.spec import SearchSpec
from tune_inat.strategies import expands_grid

if TYPE_CHECKING:
    from tune_inat.packing import MemoryShares
    from tune_inat.searchers import StudyMirror

log = logging.getLogger(__name__)


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
    status_interval: float = STATUS_INTERVAL_S,
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
                interval=status_interval,
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


class MemoryResources:
    """Ray's per-trial resources from the trial's config (`tune.with_resources` calls it for each trial)."""

    def __init__(self, shares: MemoryShares) -> None:
        self.shares = shares

    def __call__(self, config: dict[str, Any]) -> Any:
        from ray.tune import PlacementGroupFactory

        return PlacementGroupFactory([self.shares(config)])


def memory_shares(spec: SearchSpec, data_config: DataConfig, resources: TrialResources) -> MemoryShares:
    """`--gpus-per-trial auto`: the training memory of every (backbone, size) of the space, measured on this
    driver's GPU (once, then cached), and each trial's share from it."""
    import torch

    from tune_inat.packing import probes_for

    if not torch.cuda.is_available():
        raise UserError(
            "--gpus-per-trial auto measures each backbone's training memory on the driver's GPU, and this driver "
            "has none (a CPU head node?): give a share, e.g. --gpus-per-trial 0.25, or run the driver on a GPU node"
        )
    pairs = sorted(spec.backbone_sizes())
    log.info("measuring the training memory of %d backbone and size pairs on the GPU (once, then cached)", len(pairs))
    probes = probes_for(pairs, data_config.cache_dir)
    total = torch.cuda.get_device_properties(0).total_memory / 2**20
    return MemoryShares(probes, total, resources.cpus)


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
    status_interval: float = STATUS_INTERVAL_S,
    worker_logs: bool = False,
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
            status_interval=status_interval,
            worker_logs=worker_logs,
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
    status_interval: float = STATUS_INTERVAL_S,
    worker_logs: bool = False,
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
        data_by_size=data_by_size,
        data_config=data_config,
        max_epochs=spec.max_epochs,
        before_epoch=before_epoch,
        worker_logs=worker_logs,
    )
    per_trial = {"cpu": resources.cpus, "gpu": resources.gpus}
    if resources.by_memory:
        per_trial = MemoryResources(memory_shares(spec, data_config, resources))
    trainable = tune.with_resources(tune.with_parameters(fine_tune_trial, context=context), per_trial)
    if resume:
        set_aside_broken_ray_state(place)
        recover_replaced_checkpoints(place)
        tuner = restore_tuner(spec, place, trainable)
    else:
        write_search_record(place.results, search_record(spec, data_config, place))
        try:
            tuner = build_tuner(
                spec,
                trainable,
                place,
                resources,
                wandb_project=wandb_project,
                verbose=verbose,
                status_interval=status_interval,
            )
        except OSError as err:  # the Tuner writes its tuner.pkl at once: a full disk fails here, before any trial
            planned = 1 if expands_grid(spec) else spec.options.num_samples
            return SearchOutcome(place, None, planned, 0, state_not_saved=err.strerror or str(err))
    state_failures, stop_signals = StateSaveFailures(), StopSignals()
    for handler in (state_failures, stop_signals):
        logging.getLogger("ray.tune").addHandler(handler)
    signal_log = logging.getLogger("ray.tune.tune")  # where Tune's signal handler logs, at WARNING
    signal_log_level = signal_log.level
    if signal_log.getEffectiveLevel() > logging.WARNING:  # a quiet Ray would not even create the record
        signal_log.setLevel(logging.WARNING)  # Ray's own handler still hides it (OnlyCritical) unless --verbose
    try:
        with sampling_gpus(place.results):  # what the GPUs did, once a second, into gpus.parquet
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
