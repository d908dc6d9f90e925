"""`python -m tune_inat.clean RESULTS_DIR`: free a finished search's disk, keeping the best trial's best checkpoint.

Each trial keeps two checkpoints while a search runs (its best and its last), which `--resume`
continues from. Once the search has finished they are only disk: this deletes all of them but the
best checkpoint of the search's best trial (by the search's own ranking).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from tune_inat.cli import command_parser, run_command
from tune_inat.errors import UserError
from tune_inat.results import best_trial, read_results


def clean_checkpoints(results_folder: str) -> tuple[str | None, int]:
    """Delete every checkpoint of a finished search but the best one; (kept path, bytes freed)."""
    from ray import tune

    results = read_results(results_folder)
    unfinished = results.trials[~results.trials["status"].isin(["completed", "stopped_early", "error"])]
    if len(unfinished):
        raise UserError(
            f"{results_folder} is not finished ({len(unfinished)} trials unfinished): resume it first; "
            f"its checkpoints are what --resume continues from"
        )
    # Ray's state beside the results (the default), else where the search recorded it (--storage-path)
    here = Path(results_folder) / "tuner.pkl"
    experiment = results_folder if here.is_file() else results.record.get("experiment_path", results_folder)
    if "://" in experiment:
        raise UserError(f"checkpoints at {experiment} are in object storage: delete them with its own tools")
    best = best_trial(results.trials, results.mode)
    keep = None
    if best is not None:
        analysis = tune.ExperimentAnalysis(experiment, default_metric=results.metric, default_mode=results.mode)
        trial = next((t for t in analysis.trials if t.trial_id == best["trial_id"]), None)
        checkpoint = analysis.get_best_checkpoint(trial, results.metric, results.mode) if trial else None
        keep = Path(checkpoint.path).resolve() if checkpoint else None
    freed = 0
    for folder in Path(experiment).glob("trial_*/checkpoint_*"):
        if folder.resolve() != keep:
            freed += sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
            shutil.rmtree(folder)
    return (str(keep) if keep else None), freed


def clean_parser() -> argparse.ArgumentParser:
    parser = command_parser("python -m tune_inat.clean", "Delete a finished search's checkpoints but the best one.")
    parser.add_argument(
        "folder", metavar="RESULTS_DIR", help="the search's results folder, e.g. results/demo-20261122-045202"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    def run(args: argparse.Namespace) -> int:
        kept, freed = clean_checkpoints(args.folder)
        print(f"{args.folder}: freed {freed / 2**20:.1f} MiB of checkpoints; kept the best: {kept}")
        return 0

    return run_command(clean_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
