"""`python -m tune_inat.search`: the product's main job, a Ray Tune search over fine-tuning recipes.

space file + CLI -> validated SearchSpec -> data cached once per resolution -> resources planned
against the Ray cluster -> Tuner (ASHA, Optuna TPE, Parquet + wandb callbacks) or Tuner.restore
-> leaderboard, best_config.yaml, paths of everything written.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import yaml

from tune_inat.cli import add_data_arguments, data_config_from_args, setup_logging
from tune_inat.data.dataset import DataConfig, TrainValData, prepare_train_val
from tune_inat.errors import EXIT_INTERRUPTED, UserError, cli_main
from tune_inat.models import fetch_weights
from tune_inat.space import SCHEDULERS, SEARCHERS, SearchSpec, load_space, parse_duration, with_fixed, with_overrides

log = logging.getLogger(__name__)

BEST_CONFIG_FILE = "best_config.yaml"


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
    trials = 1 if spec.searcher == "grid" else options.num_samples
    max_concurrent = options.max_concurrent_trials or max(1, min(fits, trials if spec.searcher != "grid" else fits))
    return TrialResources(cpus=cpus, gpus=gpus, max_concurrent=max_concurrent)


def local_node_resources() -> dict[str, float]:
    """What a local Ray would have: this machine's CPUs and CUDA GPUs (checked before starting Ray)."""
    import torch

    return {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}


def prefetch_weights(spec: SearchSpec) -> None:
    """Download ImageNet weights once in the driver (a clear error offline), never in trials."""
    if "imagenet" in spec.values_of("weights"):
        for backbone in spec.values_of("backbone"):
            fetch_weights(backbone)


def prepare_data(spec: SearchSpec, data_config: DataConfig) -> dict[int, TrainValData]:
    """Build (or find) the decode-once cache for every resolution the space can ask for."""
    return {size: prepare_train_val(data_config, size) for size in sorted(spec.image_sizes())}


def experiment_name(spec: SearchSpec, results_root: str, name: str | None, resume: bool) -> str:
    """The given name; for --resume without one, the newest restorable search of this space."""
    stem = Path(spec.source).stem
    if name:
        return name
    if not resume:
        return f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    if "://" in results_root:
        raise UserError("--resume with a remote --storage-path needs --name")
    candidates = sorted(Path(results_root).glob(f"{stem}-*/tuner.pkl"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise UserError(f"nothing to resume: no {stem}-* search in {results_root}")
    return candidates[-1].parent.name


def write_search_info(folder: str, spec: SearchSpec, data_config: DataConfig) -> None:
    """search.json: what `tune_inat.final` needs to rebuild the same splits (data, seeds, metric)."""
    from tune_inat.results import resolve_folder

    info = {
        "space": spec.source, "metric": spec.metric, "mode": spec.mode, "searched": searched_settings(spec),
        "data_root": str(data_config.root), "cache_dir": str(data_config.cache_dir),
        "val_fraction": data_config.val_fraction, "test_fraction": data_config.test_fraction,
        "split_seed": data_config.split_seed, "seed": spec.options.seed,
    }
    filesystem, path = resolve_folder(folder)
    filesystem.create_dir(path, recursive=True)
    with filesystem.open_output_stream(f"{path}/search.json") as out:
        out.write(json.dumps(info, indent=2).encode())


def trial_name(trial: Any) -> str:
    """Short trial names and folders, "trial_<number>_<id>" ("trial_003_1a2b3c4d"), instead of Tune's config-laden ones."""
    number = trial.experiment_tag.split("_", 1)[0]
    return f"trial_{int(number):03d}_{trial.trial_id}" if number.isdigit() else f"trial_{trial.trial_id}"


def searched_settings(spec: SearchSpec) -> list[str]:
    return [name for name, p in spec.parameters.items() if not p.is_fixed]


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
    faults: tuple = (),
) -> Any:
    """Run (or resume) the search on the already-initialised Ray cluster; returns the ResultGrid."""
    import ray
    from ray import tune

    from tune_inat.results import ParquetResults, absolute_location, wandb_callback
    from tune_inat.searchers import make_scheduler, make_searcher, num_samples
    from tune_inat.space import to_tune_space
    from tune_inat.trainable import TrialContext, fine_tune_trial

    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    resources = plan_resources(spec, nodes)
    storage = absolute_location(storage_root or results_root)
    if len(nodes) > 1 and "://" not in storage:
        log.warning("warning: %d nodes share this search: %s must be a folder every node mounts (NFS), "
                    "or pass --storage-path s3://... / gs://...", len(nodes), storage)
    context = TrialContext(data_by_size=data_by_size, data_config=data_config, max_epochs=spec.max_epochs, faults=faults)
    trainable = tune.with_resources(
        tune.with_parameters(fine_tune_trial, context=context), {"cpu": resources.cpus, "gpu": resources.gpus}
    )
    experiment_path = f"{storage.rstrip('/')}/{name}"
    if resume:
        if not tune.Tuner.can_restore(experiment_path):
            raise UserError(f"nothing to resume at {experiment_path}")
        tuner = tune.Tuner.restore(experiment_path, trainable, resume_unfinished=True, resume_errored=True)
        return tuner.fit()
    write_search_info(f"{results_root.rstrip('/')}/{name}", spec, data_config)
    param_space = to_tune_space(spec)
    param_space.setdefault("seed", spec.options.seed)
    tuner = tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=spec.metric,
            mode=spec.mode,
            search_alg=make_searcher(spec),
            scheduler=make_scheduler(spec),
            num_samples=num_samples(spec),
            max_concurrent_trials=resources.max_concurrent,
            time_budget_s=spec.options.time_budget_s,
            trial_name_creator=trial_name,
            trial_dirname_creator=trial_name,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage,
            callbacks=[
                ParquetResults(f"{results_root.rstrip('/')}/{name}", name, spec.metric, spec.mode),
                *([wandb_callback(wandb_project, name)] if wandb_project else []),
            ],
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute=spec.metric, checkpoint_score_order=spec.mode
            ),  # the best checkpoint, and Ray always keeps the latest too
            failure_config=tune.FailureConfig(max_failures=spec.options.max_failures),
            verbose=verbose,
            progress_reporter=tune.CLIReporter(
                parameter_columns=searched_settings(spec),
                metric_columns=["epoch", "train_loss", "val_loss", "val_acc"],
                sort_by_metric=True,
                max_progress_rows=15,
                max_error_rows=5,
                max_report_frequency=30,
            ),  # one status table every 30 s (used with RAY_AIR_NEW_OUTPUT=0, which the CLI sets)
        ),
    )
    return tuner.fit()


def summarise(spec: SearchSpec, folder: str, data_root: Path) -> str:
    """Leaderboard, what ASHA saved, the best config written as YAML, and the paths; as text."""
    from tune_inat.results import format_leaderboard, leaderboard, read_results, resolve_folder

    epochs, trials = read_results(folder)
    lines = []
    if trials.empty:
        return "no trial finished an epoch"
    board = leaderboard(trials, searched_settings(spec), spec.mode)
    lines.append(f"Leaderboard: top {len(board)} of {len(trials)} trials by {spec.metric}")
    lines.append(format_leaderboard(board))
    stopped = int((trials["status"] == "stopped_early").sum())
    errors = int((trials["status"] == "error").sum())
    budget = int(trials["max_epochs"].fillna(0).sum())
    lines.append(
        f"{stopped} of {len(trials)} trials stopped early; {len(epochs)} of {budget} trial-epochs run"
        + (f"; {errors} trials failed (see the error column of trials.parquet)" if errors else "")
    )
    scored = trials.dropna(subset=["best_score"])
    if scored.empty:
        return "\n".join(lines + ["no trial reported a score"])
    best = scored.sort_values("best_score", ascending=(spec.mode == "min")).iloc[0]
    settings = {name: _plain(best[name]) for name in _settings_columns()}
    settings["epochs"] = int(best["max_epochs"]) if best["max_epochs"] == best["max_epochs"] else settings["epochs"]
    filesystem, path = resolve_folder(folder)
    with filesystem.open_output_stream(f"{path}/{BEST_CONFIG_FILE}") as out:
        header = f"# best of search {best['experiment']}: trial {best['trial_id']}, val_acc {100 * best['best_val_acc']:.1f}%\n"
        out.write((header + yaml.safe_dump(settings, sort_keys=False)).encode())
    lines.append(
        f"Best: trial {best['trial_id']}, val_acc {100 * best['best_val_acc']:.1f}% at epoch {int(best['best_epoch'])}"
    )
    lines.append("Written:")
    lines.append(f"  {folder}/trials.parquet    one row per trial")
    lines.append(f"  {folder}/epochs.parquet    one row per trial and epoch")
    lines.append(f"  {folder}/{BEST_CONFIG_FILE}  re-run it: python -m tune_inat.train --data {data_root} --config {folder}/{BEST_CONFIG_FILE}")
    return "\n".join(lines)


def _settings_columns() -> list[str]:
    from tune_inat.engine import FIELD_TYPES

    return list(FIELD_TYPES)


def _plain(value: Any) -> Any:
    """numpy scalars -> Python, for YAML."""
    return value.item() if hasattr(value, "item") else value


def unfinished_trials(experiment_path: str, spec: SearchSpec) -> int:
    """How many trials an ended search left to do, from the experiment state on disk (what --resume reads).

    After Ctrl-C Tune stops the running trials but saves them as pending, to be resumed.
    """
    from ray import tune

    trials = tune.ExperimentAnalysis(experiment_path).trials
    left = sum(t.status not in ("TERMINATED", "ERROR") for t in trials)
    if spec.searcher != "grid" and not spec.options.time_budget_s:
        left += max(0, spec.options.num_samples - len(trials))  # not even started yet
    return left


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


def connect_ray(address: str | None, dashboard: bool, worker_logs: bool) -> None:
    """Start a local Ray on 127.0.0.1, or join `address`; an unreachable cluster is one clear line."""
    if address is None:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # bind the local cluster to 127.0.0.1
    import ray

    if address is None:
        ray.init(include_dashboard=dashboard, dashboard_host="127.0.0.1", logging_level=logging.WARNING,
                 log_to_driver=worker_logs)
        return
    if address.startswith(("http://", "https://")):
        raise UserError(f"--address takes the cluster address HOST:PORT (GCS, port 6379 by default), not the "
                        f"dashboard URL {address}; that one is for `ray job submit --address`")
    if address != "auto" and not address.startswith("ray://"):
        host, _, port = address.rpartition(":")
        try:
            socket.create_connection((host or "127.0.0.1", int(port)), timeout=3).close()
        except (OSError, ValueError) as err:
            raise UserError(f"cannot reach a Ray cluster at {address} ({getattr(err, 'strerror', None) or err}); "
                            f"start one with `ray start --head` or check the address") from None
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=worker_logs)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise UserError(f"cannot connect to the Ray cluster at {address}: {str(err).splitlines()[0]}") from None


def clean_checkpoints(experiment_dir: str, metric: str, mode: str) -> tuple[str | None, int]:
    """Delete every checkpoint of a finished search but the best one; (kept path, bytes freed)."""
    from ray import tune

    from tune_inat.results import read_results

    _, trials = read_results(experiment_dir)
    unfinished = trials[~trials["status"].isin(["completed", "stopped_early", "error"])]
    if len(unfinished):
        raise UserError(f"{experiment_dir} is not finished ({len(unfinished)} trials unfinished): resume it first; "
                        f"its checkpoints are what --resume continues from")
    analysis = tune.ExperimentAnalysis(experiment_dir, default_metric=metric, default_mode=mode)
    best_trial = analysis.get_best_trial(metric, mode, scope="all")
    best = analysis.get_best_checkpoint(best_trial, metric, mode) if best_trial else None
    keep = Path(best.path).resolve() if best else None
    freed = 0
    for folder in Path(experiment_dir).glob("trial_*/checkpoint_*"):
        if folder.resolve() != keep:
            freed += sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
            shutil.rmtree(folder)
    return (str(keep) if keep else None), freed


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tune_inat.search",
        description="Search fine-tuning recipes with Ray Tune (ASHA early stopping, Optuna TPE).",
    )
    add_data_arguments(parser, required=False)
    parser.add_argument("--space", default=None, help="search space YAML (W&B sweep format) or a shipped name: default, quick, seed_sweep, demo (default: default; demo with --demo)")
    parser.add_argument("--name", default=None, help="experiment name (default <space>-<time>); --resume without it takes the newest of this space")
    parser.add_argument("--results", default="results", help="results folder or URI (default ./results)")
    parser.add_argument("--storage-path", default=None, help="where Ray keeps experiment state and checkpoints (default: the results folder); NFS path or s3:// / gs://")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted search (Tuner.restore)")
    options = parser.add_argument_group("search options (override the space file's tune_inat: block)")
    options.add_argument("--num-samples", type=int, default=None, help="number of trials (W&B run_cap)")
    options.add_argument("--max-epochs", type=int, default=None, help="cap on every trial's epochs; ASHA's max_t")
    options.add_argument("--scheduler", choices=SCHEDULERS, default=None)
    options.add_argument("--grace-period", type=int, default=None, help="ASHA: epochs before a trial can be stopped")
    options.add_argument("--reduction-factor", type=float, default=None, help="ASHA: keep 1/this at each rung")
    options.add_argument("--searcher", choices=SEARCHERS, default=None)
    options.add_argument("--gpus-per-trial", type=float, default=None, help="GPU share per trial, e.g. 0.25: four trials per GPU")
    options.add_argument("--cpus-per-trial", type=float, default=None)
    options.add_argument("--max-concurrent-trials", type=int, default=None)
    options.add_argument("--time-budget", default=None, help="stop launching and end the search after this long, e.g. 2h, 90m")
    options.add_argument("--seed", type=int, default=None, help="experiment seed (searcher and trials)")
    options.add_argument("--max-failures", type=int, default=None, help="retries of a failed trial from its last checkpoint (default 1)")
    options.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="fix a setting for every trial, replacing the space's entry (repeatable), e.g. --set weights=none")
    options.add_argument("--compile", action="store_true", help="torch.compile each trial's network (same as --set compile=true)")
    tracking = parser.add_argument_group("wandb")
    tracking.add_argument("--no-wandb", action="store_true", help="do not log to wandb")
    tracking.add_argument("--wandb-project", default="tune-inat", help="wandb project (default tune-inat)")
    cluster = parser.add_argument_group("Ray")
    cluster.add_argument("--address", default=None, help="join an existing Ray cluster: auto, or HOST:PORT (default: start a local one)")
    cluster.add_argument("--dashboard", action="store_true", help="start Ray's dashboard for a local cluster (on 127.0.0.1)")
    cluster.add_argument("--quiet", action="store_true", help="no progress table")
    cluster.add_argument("--worker-logs", action="store_true", help="show the trials' own log lines (hidden by default: errors are in the status table and trials.parquet)")
    parser.add_argument("--clean-checkpoints", action="store_true", help="after the search (or alone, for --name or the newest search of the space): delete every checkpoint but the best one")
    args = parser.parse_args(argv)
    if not (args.data or args.demo or args.clean_checkpoints):
        parser.error("one of the arguments --data --demo is required")
    return args


def parse_assignments(items: Sequence[str]) -> dict[str, Any]:
    """["weights=none", "image_size=32"] -> {"weights": "none", "image_size": 32} (values read as YAML)."""
    fixed = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise UserError(f"--set takes NAME=VALUE, got {item!r}")
        fixed[name.strip()] = yaml.safe_load(value) if value.strip() else ""
    return fixed


def build_spec(args: argparse.Namespace) -> SearchSpec:
    fixed = parse_assignments(args.set)
    if args.compile:
        fixed["compile"] = True
    spec = with_fixed(load_space(args.space or ("demo" if args.demo else "default")), fixed)
    return with_overrides(
        spec,
        num_samples=args.num_samples,
        max_epochs=args.max_epochs,
        scheduler=args.scheduler,
        grace_period=args.grace_period,
        reduction_factor=args.reduction_factor,
        searcher=args.searcher,
        gpus_per_trial=args.gpus_per_trial,
        cpus_per_trial=args.cpus_per_trial,
        max_concurrent_trials=args.max_concurrent_trials,
        time_budget_s=parse_duration(args.time_budget, "--time-budget") if args.time_budget else None,
        seed=args.seed,
        max_failures=args.max_failures,
        split_seed=args.split_seed,
        val_fraction=args.val_fraction,
    )


def quiet_ray_environment() -> None:
    """Ray's console: one periodic status table instead of a box per result; no snapshot-rate warnings."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)


def configure_wandb(enabled: bool) -> str | None:
    """wandb mode for this search, set in the driver's environment before Ray starts.

    Online when wandb has an API key (WANDB_API_KEY or `wandb login`), else offline; an explicit
    WANDB_MODE is respected. Returns the mode, or None when wandb is off.
    """
    if not enabled:
        return None
    from tune_inat.results import wandb_is_logged_in

    if "WANDB_MODE" not in os.environ and not wandb_is_logged_in():
        os.environ["WANDB_MODE"] = "offline"
    return os.environ.get("WANDB_MODE", "online")


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    setup_logging(args.debug)
    quiet_ray_environment()
    spec = build_spec(args)
    from tune_inat.results import absolute_location, check_writable

    storage = absolute_location(args.storage_path or args.results).rstrip("/")

    check_writable(args.results, "results folder")
    if args.storage_path:
        check_writable(args.storage_path, "--storage-path")
    name = experiment_name(spec, storage, args.name, args.resume or (args.clean_checkpoints and not (args.data or args.demo)))
    folder = f"{args.results.rstrip('/')}/{name}"
    if not (args.data or args.demo):  # --clean-checkpoints alone
        kept, freed = clean_checkpoints(f"{storage}/{name}", spec.metric, spec.mode)
        print(f"{name}: freed {freed / 2**20:.1f} MiB of checkpoints; kept the best: {kept}")
        return 0
    address = args.address or os.environ.get("RAY_ADDRESS")
    if address is None:
        plan_resources(spec, [local_node_resources()], warn=False)  # impossible resources fail before Ray starts
    data_config = data_config_from_args(args, spec.options.val_fraction, spec.options.split_seed)
    prefetch_weights(spec)
    data_by_size = prepare_data(spec, data_config)
    wandb_mode = configure_wandb(not args.no_wandb)
    from tune_inat.trainable import parse_faults

    try:
        faults = parse_faults(os.environ.get("TUNE_INAT_FAULTS"))  # test-only fault injection
    except ValueError as err:
        raise UserError(f"TUNE_INAT_FAULTS: {err}") from None

    import ray

    connect_ray(address, args.dashboard, args.worker_logs)
    try:
        run_search(
            spec, data_config, data_by_size, args.results, name,
            storage_root=args.storage_path, resume=args.resume, verbose=0 if args.quiet else 1,
            wandb_project=args.wandb_project if wandb_mode else None, faults=faults,
        )  # fmt: skip
    except KeyboardInterrupt:
        print(f"\ninterrupted; results so far are in {folder}\nresume with: {resume_command(argv, name)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        ray.shutdown()
    unfinished = unfinished_trials(f"{storage}/{name}", spec)
    if unfinished:
        print(f"\ninterrupted with {unfinished} trials unfinished; results so far are in {folder}\n"
              f"resume with: {resume_command(argv, name)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(summarise(spec, folder, data_config.root))
    if wandb_mode == "offline":
        print(f"  wandb runs saved offline; upload them with: wandb sync {storage}/{name}/trial_*/wandb/offline-run-*")
    if args.clean_checkpoints:
        kept, freed = clean_checkpoints(f"{storage}/{name}", spec.metric, spec.mode)
        print(f"  checkpoints: freed {freed / 2**20:.1f} MiB; kept the best: {kept}")
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(main))
