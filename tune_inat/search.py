"""`python -m tune_inat.search` and `tune_inat.search(...)`: the product's main job, a Ray Tune search over
fine-tuning recipes. This module is the command line: its flags, read into a `job.SearchRequest`; the
job itself (claim, plan, prepare, run, report) is `job.run_job`, the same for the API and the command.

Exit codes: 0 done, 1 the search failed, 2 bad input, 130 interrupted (the resume command is printed).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from tune_inat.cli import (
    add_data_arguments,
    command_flags,
    command_parser,
    make_callable,
    parse_flags,
    run_command,
    setup_logging,
)
from tune_inat.errors import UserError
from tune_inat.job import SearchRequest, run_job, space_name, spec_of
from tune_inat.packing import GPUS_AUTO
from tune_inat.results import absolute_location
from tune_inat.space import parse_duration
from tune_inat.strategies import SCHEDULERS, SEARCHERS


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
        type=gpu_share_flag,
        default=None,
        help="GPU share per trial, e.g. 0.25: four trials per GPU; auto: each trial the share its measured training "
        "memory needs (default 0.25 where there are GPUs)",
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
    output = next(group for group in parser._action_groups if group.title == "output")
    output.add_argument(
        "--status-interval",
        type=positive_seconds,
        default=30.0,
        metavar="SECONDS",
        help="seconds between status blocks (in a notebook: one block, updated in place)",
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


def gpu_share_flag(text: str) -> float | str:
    if text == GPUS_AUTO:
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a GPU share (e.g. 0.25) or auto, got {text}") from None


def positive_seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def parse_assignments(items: Sequence[str]) -> dict[str, Any]:
    """["weights=none", "image_size=32"] -> {"weights": "none", "image_size": 32} (values read as YAML)."""
    fixed = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise UserError(f"--set takes NAME=VALUE, got {item!r}")
        fixed[name.strip()] = yaml.safe_load(value) if value.strip() else ""
    return fixed


def request_from_args(args: argparse.Namespace, argv: Sequence[str]) -> SearchRequest:
    """The parsed flags as the job's typed request (`argv` is kept for the resume hint)."""
    fixed = parse_assignments(args.set)
    if args.compile:
        fixed["compile"] = True
    overrides = {
        "num_samples": args.num_samples,
        "max_epochs": args.max_epochs,
        "scheduler": args.scheduler,
        "searcher": args.searcher,
        "gpus_per_trial": args.gpus_per_trial,
        "cpus_per_trial": args.cpus_per_trial,
        "max_concurrent_trials": args.max_concurrent_trials,
        "time_budget_s": parse_duration(args.time_budget, "--time-budget") if args.time_budget else None,
        "seed": args.seed,
        "reproducible": args.reproducible,
        "warm_start": absolute_location(args.warm_start) if args.warm_start else None,
        "max_failures": args.max_failures,
        "split_seed": args.split_seed,
        "val_fraction": args.val_fraction,
        "scheduler_options": {
            k: v
            for k, v in (("grace_period", args.grace_period), ("reduction_factor", args.reduction_factor))
            if v is not None
        },
    }
    return SearchRequest(
        data=args.data,
        demo=args.demo,
        cache_dir=args.cache_dir,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        split_seed=args.split_seed,
        space=args.space,
        fixed=fixed,
        overrides=overrides,
        results=args.results,
        storage_path=args.storage_path,
        name=args.name,
        resume=args.resume,
        address=args.address,
        dashboard=args.dashboard,
        worker_logs=args.worker_logs,
        verbose=args.verbose or args.debug,
        quiet=args.quiet,
        status_interval=args.status_interval,
        wandb=not args.no_wandb,
        wandb_project=args.wandb_project,
        clean_checkpoints=args.clean_checkpoints,
        command=tuple(argv),
    )


def show_plan(request: SearchRequest) -> int:
    """--plan: how the file was read and what the search would spend; exit 0, or 2 with every problem."""
    from tune_inat.plan import plan_lines
    from tune_inat.resources import local_node_resources, plan_resources
    from tune_inat.space import read_space_file

    reading = read_space_file(space_name(request))
    spec = spec_of(request, base=reading.spec if request.space is None else None)
    resources = plan_resources(spec, [local_node_resources()], warn=False)
    print("\n".join(plan_lines(reading, spec, resources.cpus, resources.gpus, resources.max_concurrent)))
    return 0


def search(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """The command: the job, then its report; the exit code says how it went."""
    request = request_from_args(args, argv)
    if args.plan:
        return show_plan(request)
    job = run_job(request)
    if job.message:
        print(job.message, file=sys.stderr)
    if job.report:
        print(job.report)
    return job.code


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(search_parser(), lambda args: search(args, list(sys.argv[1:] if argv is None else argv)), argv)


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
    job = run_job(request_from_args(args, flags))
    return SearchResult(job.place.name, job.place.results, job.code, job.message, job.report)


make_callable(__name__, run)  # tune_inat.search(...) is the API, python -m tune_inat.search the command

if __name__ == "__main__":
    sys.exit(main())
