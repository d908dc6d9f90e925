"""Ray's saved experiment state, read back and repaired so that `--resume` continues a search.

A crash, a kill or a full disk can leave Ray's state files truncated, or naming checkpoints Ray had
already replaced and deleted; Ray's own restore fails on both. These repairs run before
`Tuner.restore`, each one saying what it did in one warning line.
"""

from __future__ import annotations

import json
import logging
import pickle
import shutil
from pathlib import Path
from typing import Any

from tune_inat.place import TUNER_FILE, SearchPlace
from tune_inat.results import is_local

log = logging.getLogger(__name__)

RAY_STATE_FILES = {"experiment_state-": ".json", "search_gen_state-": ".json", "searcher-state-": ".pkl"}


def _readable(path: Path) -> bool:
    """Ray's state file parses whole (JSON, or a pickle; search_gen_state is a pickle despite its name)."""
    try:
        data = path.read_bytes()
        if not data:
            return False
        if path.name.startswith("experiment_state-"):
            json.loads(data)
        else:
            pickle.loads(data)
        return True
    except Exception:  # truncated or garbage: whatever the parser raises
        return False


def set_aside_broken_ray_state(place: SearchPlace) -> None:
    """Move away what a failed write (a full disk) left broken among Ray's state, so the restore can read the rest.

    Ray saves its state as three files per session (experiment, search generator, searcher); a session
    with any of them empty or truncated is set aside whole (renamed `.damaged-...`), so Ray falls back
    to the previous session's consistent set. Empty trial error files hold nothing and are removed.
    """
    if not is_local(place.experiment):
        return
    folder = Path(place.experiment.removeprefix("file://"))
    for path in [*folder.glob("trial_*/error.pkl"), *folder.glob("trial_*/error.txt")]:
        if path.stat().st_size == 0:
            path.unlink()
    sessions: dict[str, list[Path]] = {}
    for prefix, suffix in RAY_STATE_FILES.items():
        for path in folder.glob(f"{prefix}*{suffix}"):
            sessions.setdefault(path.name[len(prefix) : -len(suffix)], []).append(path)
    for session, paths in sessions.items():
        if not all(_readable(path) for path in paths):
            log.warning(
                "warning: Ray's saved state of session %s in %s is damaged (a write that failed?); set aside, "
                "resuming from the state before it",
                session,
                folder,
            )
            for path in paths:
                path.rename(path.with_name(f".damaged-{path.name}"))


def recover_replaced_checkpoints(place: SearchPlace) -> None:
    """Make Ray's saved state name checkpoints that exist again, where Ray had replaced and deleted them.

    Ray deletes a superseded checkpoint as soon as it registers the next one, and saves the experiment
    state that names the new one a moment later; a search killed in between resumes from a state that
    names deleted checkpoints, and Ray fails such a trial ("does not exist on storage anymore"). The
    trial's newest checkpoint on storage (a later epoch, with the whole metrics history) takes the
    deleted latest one's name, so the trial continues from there, its rows coming from that history; a
    deleted one the state keeps as best gets an empty folder, which Ray deletes in its turn.
    """
    if not is_local(place.experiment):
        return  # object storage: no renames there; Ray fails such a trial and says why
    for trial in saved_trials(place):
        latest = Path(trial.checkpoint.path) if trial.checkpoint is not None else None
        if latest is None or latest.exists():
            continue
        newer = sorted(path for path in latest.parent.glob("checkpoint_*") if path.name > latest.name)
        if not newer:
            continue  # nothing later to continue from: Ray fails the trial and says why
        log.warning(
            "warning: trial %s: Ray's saved state names %s, deleted just before the search stopped; the trial "
            "resumes from its newest checkpoint, %s (renamed %s)",
            trial.trial_id,
            latest.name,
            newer[-1].name,
            latest.name,
        )
        for superseded in newer[:-1]:  # named nowhere in Ray's state: nothing else would remove them
            shutil.rmtree(superseded, ignore_errors=True)
        newer[-1].rename(latest)
        for kept in trial.run_metadata.checkpoint_manager.best_checkpoint_results:
            Path(kept.checkpoint.path).mkdir(exist_ok=True)


def saved_trials(place: SearchPlace) -> list[Any]:
    """The trials as Ray last saved them (an interrupted trial stays unfinished there)."""
    from ray import tune

    if not place.has(place.experiment, TUNER_FILE):
        return []
    try:
        return list(tune.ExperimentAnalysis(place.experiment).trials)
    except Exception as err:  # no experiment state yet, or a damaged one: nothing more to recover
        log.debug("no saved trials in %s: %s", place.experiment, err)
        return []
