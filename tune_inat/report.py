"""How a search ended, told to the user: the exit code and its one line, the leaderboard, best_config.yaml.

Exit codes: 0 done, 1 the search failed (every trial failed, rows unwritten, Ray left trials
unfinished), 130 a stop signal ended it early (the resume command is printed).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tune_inat.errors import EXIT_INTERRUPTED, EXIT_SEARCH_FAILED
from tune_inat.place import SearchPlace
from tune_inat.results import (
    BEST_CONFIG_FILE,
    EPOCHS_FILE,
    TRIALS_FILE,
    best_trial,
    file_exists,
    format_leaderboard,
    leaderboard,
    read_results,
    resolve_folder,
    write_text,
)
from tune_inat.settings import settings_of_row, settings_yaml

if TYPE_CHECKING:
    from tune_inat.tuner import SearchOutcome  # (importing it would import Ray)


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
