"""`python -m tune_inat.final RESULTS_DIR [--top-k 3] [--seeds 3]`: from a finished search to one tested model.

1. Confirm the ranking without the test set: the top-k configurations are re-trained with
   several seeds on the training split and scored on the validation split (mean and standard
   deviation), since a 2,000-image validation set moves about a point by chance.
2. Re-train the winner (best mean) once on train + validation, for its epochs.
3. Evaluate it exactly once on the test set (`val/` of iNaturalist 12K): accuracy, per-class
   precision/recall/F1, confusion matrix and a 10 x 3 grid of test images.
4. Export one self-contained model file for `python -m tune_inat.predict`.
Everything goes to RESULTS_DIR/final/ and into the results' report.md. Plain PyTorch: no Ray.
The candidates are the search's own ranking (`results.rank_trials`, the search's metric and mode).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import matplotlib

if "ipykernel" not in sys.modules:  # files only, no display; a notebook keeps its own (inline) backend
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from tune_inat.analyze import load_search, markdown_table, summary_sections, text_table, write_plots, write_report  # noqa: E402
from tune_inat.cli import command_flags, command_parser, make_callable, parse_flags, run_command, setup_logging  # noqa: E402
from tune_inat.data.batches import DeviceBatches  # noqa: E402
from tune_inat.data.dataset import DataConfig, TestData, TrainValData, merge_validation, prepare_test, prepare_train_val  # noqa: E402
from tune_inat.engine import FineTuning, MixedPrecision, predict_probabilities, resolve_device  # noqa: E402
from tune_inat.errors import UserError  # noqa: E402
from tune_inat.models import fetch_weights, save_model_file  # noqa: E402
from tune_inat.results import COST_KEYS, percent, rank_trials, read_search_record  # noqa: E402
from tune_inat.settings import TrainConfig, plain, settings_of_row  # noqa: E402

log = logging.getLogger(__name__)

GRID_ROWS, GRID_COLUMNS = 10, 3


@dataclass(frozen=True)
class Candidate:
    """A configuration from the search, as it was trained there."""

    trial_id: str
    settings: TrainConfig
    search_val_acc: float
    epoch_seconds: float  # mean seconds per epoch in the search (for the estimate)


def top_candidates(
    trials: pd.DataFrame, k: int, mode: str = "max", epochs: pd.DataFrame | None = None
) -> list[Candidate]:
    """The k best completed trials (the search's own ranking), with the epochs they actually trained."""
    finished = trials[(trials["status"] == "completed") & trials["best_score"].notna()]
    if finished.empty:
        raise UserError("the search has no finished trials yet (none completed all its epochs)")
    seconds = (
        epochs.groupby("trial_id")["epoch_seconds"].mean()
        if epochs is not None and len(epochs)
        else pd.Series(dtype=float)
    )
    candidates: list[Candidate] = []
    seen: set[tuple] = set()
    for _, row in rank_trials(finished, mode).iterrows():
        settings = settings_of_row(row, f"trial {row['trial_id']}")
        key = tuple(sorted(replace(settings, seed=0).to_dict().items()))
        if key not in seen:  # a grid can hold the same configuration twice
            seen.add(key)
            candidates.append(
                Candidate(
                    row["trial_id"], settings, float(row["best_val_acc"]), float(seconds.get(row["trial_id"], math.nan))
                )
            )
        if len(candidates) == k:
            break
    return candidates


class Progress:
    """ "confirm 3/5: trial X seed 1, epoch 4/6, ~2 min left", from the search's own epoch times, then measured ones."""

    def __init__(self, planned: list[tuple[str, Candidate]]) -> None:
        self.planned = planned  # (what, candidate) of every run, in order
        self.run = 0
        self.started = time.monotonic()
        self.done_epochs = 0

    def pace(self, candidate: Candidate) -> float:
        """Seconds per epoch: as in the search, else as measured here so far."""
        if math.isfinite(candidate.epoch_seconds):
            return candidate.epoch_seconds
        return (time.monotonic() - self.started) / self.done_epochs if self.done_epochs else 0.0

    def estimate(self, run: int = 0, epochs_done: int = 0) -> float:
        """Seconds left from epoch `epochs_done` of run `run` to the end of the last run."""
        return sum(
            (c.settings.epochs - (epochs_done if i == run else 0)) * self.pace(c)
            for i, (_, c) in enumerate(self.planned[run:], start=run)
        )

    def epoch(self, metrics: dict[str, float]) -> None:
        self.done_epochs += 1
        what, candidate = self.planned[self.run]
        val = "-" if math.isnan(metrics["val_acc"]) else percent(metrics["val_acc"])
        log.info(
            "%s %d/%d: %s, epoch %d/%d, val_acc %s, ~%s left",
            what,
            self.run + 1,
            len(self.planned),
            candidate.trial_id,
            metrics["epoch"],
            candidate.settings.epochs,
            val,
            minutes(self.estimate(self.run, int(metrics["epoch"]))),
        )

    def next_run(self) -> None:
        self.run += 1


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def train_to_the_end(
    settings: TrainConfig, data: TrainValData, device: torch.device, progress: Progress | None = None
) -> FineTuning:
    run = FineTuning(settings, data, device)
    while not run.done:
        metrics = run.run_epoch()
        if progress is not None:
            progress.epoch(metrics)
    if progress is not None:
        progress.next_run()
    return run


def confirm(
    candidates: list[Candidate],
    data_for: dict[int, TrainValData],
    seeds: int,
    device: torch.device,
    progress: Progress | None = None,
) -> pd.DataFrame:
    """Each candidate re-trained with `seeds` seeds; one row per run with its final validation accuracy."""
    rows = []
    for candidate in candidates:
        for seed in range(seeds):
            run = train_to_the_end(
                replace(candidate.settings, seed=seed), data_for[candidate.settings.image_size], device, progress
            )
            rows.append({"trial_id": candidate.trial_id, "seed": seed, **run.last_metrics})
    return pd.DataFrame(rows)


def rank_confirmed(
    candidates: list[Candidate], runs: pd.DataFrame, metric: str = "val_acc", mode: str = "max"
) -> pd.DataFrame:
    """Candidates by the mean of the search's metric over their seeds (ties: the search's order)."""
    table = runs.groupby("trial_id", sort=False)[metric].agg(["mean", "std", "count"]).reset_index()
    table = table.rename(columns={"mean": f"{metric}_mean", "std": f"{metric}_std", "count": "seeds"})
    by_id = {c.trial_id: c for c in candidates}
    table["search_val_acc"] = table["trial_id"].map(lambda t: by_id[t].search_val_acc)
    for name in ("backbone", "image_size", "freeze_fraction", "freeze_form", "lr", "batch_size", "epochs"):
        table[name] = table["trial_id"].map(lambda t, n=name: getattr(by_id[t].settings, n))
    return table.sort_values(f"{metric}_mean", ascending=mode == "min", kind="stable").reset_index(drop=True)


def classification_report(
    labels: np.ndarray, predictions: np.ndarray, classes: Sequence[str]
) -> tuple[pd.DataFrame, np.ndarray]:
    """Per-class precision, recall, F1 and support, and the confusion matrix (rows: true class)."""
    n = len(classes)
    confusion = np.zeros((n, n), dtype=np.int64)
    np.add.at(confusion, (labels, predictions), 1)
    true_positive = np.diag(confusion).astype(float)
    predicted = confusion.sum(0).astype(float)
    actual = confusion.sum(1).astype(float)
    precision = np.divide(true_positive, predicted, out=np.zeros(n), where=predicted > 0)
    recall = np.divide(true_positive, actual, out=np.zeros(n), where=actual > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(n), where=(precision + recall) > 0)
    report = pd.DataFrame(
        {"class": list(classes), "precision": precision, "recall": recall, "f1": f1, "support": actual.astype(int)}
    )
    return report, confusion


def plot_confusion(confusion: np.ndarray, classes: Sequence[str], path: Path, title: str) -> None:
    shares = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1 + 0.75 * len(classes), 0.75 * len(classes) + 1.2))
    image = ax.imshow(100 * shares, cmap="Blues", vmin=0, vmax=100)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(
                j,
                i,
                str(confusion[i, j]),
                ha="center",
                va="center",
                fontsize=8,
                color="white" if shares[i, j] > 0.5 else "black",
            )
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="share of the true class (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def grid_rows(labels: np.ndarray, classes: Sequence[str], seed: int = 0) -> list[list[int]]:
    """Up to 3 test images of each class (indices into the test rows), seeded."""
    rng = np.random.default_rng(seed)
    picks = []
    for label in range(min(GRID_ROWS, len(classes))):
        members = np.flatnonzero(labels == label)
        picks.append(sorted(rng.choice(members, size=min(GRID_COLUMNS, len(members)), replace=False).tolist()))
    return picks


def plot_prediction_grid(
    squares: np.ndarray,
    labels: np.ndarray,
    predictions: np.ndarray,
    classes: Sequence[str],
    picks: list[list[int]],
    path: Path,
    title: str,
) -> None:
    fig, axes = plt.subplots(len(picks), GRID_COLUMNS, figsize=(3 * GRID_COLUMNS, 2.6 * len(picks)), squeeze=False)
    for r, row in enumerate(picks):
        for c in range(GRID_COLUMNS):
            ax = axes[r][c]
            ax.axis("off")
            if c >= len(row):
                continue
            i = row[c]
            ok = predictions[i] == labels[i]
            ax.imshow(squares[i])
            ax.set_title(
                f"{'✓' if ok else '✗'} true: {classes[labels[i]]}\npredicted: {classes[predictions[i]]}",
                fontsize=9,
                color="green" if ok else "red",
            )
    fig.suptitle(title, fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / (2.6 * len(picks))))  # leave room for the title
    fig.savefig(path, dpi=100)
    plt.close(fig)


def evaluate_once_on_test(run: FineTuning, test: TestData, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities and true labels of every test image: the only time the test set is read."""
    batches = DeviceBatches(
        test.cache.open_images(),
        test.cache.labels,
        test.rows,
        batch_size=128,
        image_size=run.config.image_size,
        device=device,
        train=False,
    )
    return predict_probabilities(run.model, batches.epoch(0), MixedPrecision(device))


@dataclass(frozen=True)
class Constraints:
    """Where the model will run: limits a candidate must meet (None: no limit)."""

    max_latency_ms: float | None = None  # one image, batch 1
    latency_device: str = "cpu"  # whose latency: the CPU's or the GPU's the search measured
    max_params: int | None = None
    max_gflop: float | None = None  # FLOPs of one forward pass, as the trials table counts them

    def limits(self) -> list[tuple[str, str, float]]:
        """(flag, column, limit) of each limit set."""
        found = [
            ("--max-latency-ms", f"{self.latency_device}_latency_ms_b1", self.max_latency_ms),
            ("--max-params", "total_parameters", self.max_params),
            ("--max-gflops", "forward_gflop", self.max_gflop),
        ]
        return [(flag, column, limit) for flag, column, limit in found if limit is not None]


def _amount(column: str, value: float) -> str:
    """A cost as people read it: 21.3M parameters, 4.1 ms, 0.58 GFLOP."""
    if column == "total_parameters":
        return f"{value / 1e6:.1f}M parameters"
    if column == "forward_gflop":
        return f"{value:.3g} GFLOP"
    return f"{value:.3g} ms"


def _limit(limit: float) -> str:
    """A limit as it was given on the command line."""
    return str(limit) if isinstance(limit, int) else f"{limit:g}"


def apply_constraints(trials: pd.DataFrame, constraints: Constraints) -> tuple[pd.DataFrame, list[str]]:
    """The trials that meet every limit, and one line per limit saying which trials it removed."""
    kept, notes = trials, []
    for flag, column, limit in constraints.limits():
        if trials[column].isna().all():
            raise UserError(
                f"{flag}: this search recorded no {column} (a search before costs were measured, or no "
                f"{constraints.latency_device.upper()} in it)"
            )
        over = kept[~(kept[column] <= limit)]
        kept = kept[kept[column] <= limit]
        if len(over):
            shown = ", ".join(
                f"{r['trial_id']} ({r['backbone']} {int(r['image_size'])}px: {_amount(column, r[column])})"
                for _, r in over.head(5).iterrows()
            )
            more = ", ..." if len(over) > 5 else ""
            notes.append(f"{flag} {_limit(limit)} removed {len(over)} trials: {shown}{more}")
    completed = kept[kept["status"] == "completed"]
    if completed.empty and constraints.limits():
        limits = " ".join(f"{flag} {_limit(limit)}" for flag, _, limit in constraints.limits())
        cheapest = trials[trials["status"] == "completed"].sort_values(constraints.limits()[0][1]).head(1)
        hint = (
            f"; the cheapest completed trial is {cheapest['trial_id'].iloc[0]} at "
            f"{_amount(constraints.limits()[0][1], cheapest[constraints.limits()[0][1]].iloc[0])}"
            if len(cheapest)
            else ""
        )
        raise UserError(f"no completed trial meets {limits}{hint}")
    return kept, notes


def cost_line(cost: dict) -> str:
    """What the exported model costs, as the search measured it."""
    if cost.get("total_parameters") is None:
        return ""
    line = (
        f"It has {cost['total_parameters'] / 1e6:.1f}M parameters ({cost['model_mb']:.0f} MB), "
        f"{cost['forward_gflop']:.2f} GFLOP per image, {cost['cpu_latency_ms_b1']:.1f} ms per image on "
        f"{cost['latency_cpu']}"
    )
    if cost.get("gpu_latency_ms_b1") is not None and cost["gpu_latency_ms_b1"] == cost["gpu_latency_ms_b1"]:
        line += f", {cost['gpu_latency_ms_b1']:.2f} ms on {cost['latency_gpu']}"
    return line + "."


def run_final(
    folder: Path,
    top_k: int,
    seeds: int,
    device_name: str,
    data_root: Path | None,
    max_epochs: int | None,
    constraints: Constraints = Constraints(),
) -> str:
    info = read_search_record(str(folder))
    search = load_search(folder)
    allowed, removed = apply_constraints(search.trials, constraints)
    for note in removed:
        log.info(note)
    candidates = top_candidates(allowed, top_k, search.mode, search.epochs)
    if max_epochs:
        candidates = [
            replace(c, settings=replace(c.settings, epochs=min(c.settings.epochs, max_epochs))) for c in candidates
        ]
    data_config = DataConfig(
        root=data_root or Path(info["data_root"]),
        cache_dir=Path(info["cache_dir"]),
        val_fraction=info["val_fraction"],
        test_fraction=info["test_fraction"],
        split_seed=info["split_seed"],
    )
    fetch_weights([c.settings.backbone for c in candidates if c.settings.weights == "imagenet"])
    device = resolve_device(device_name)
    data_for = {size: prepare_train_val(data_config, size) for size in {c.settings.image_size for c in candidates}}
    out = folder / "final"
    out.mkdir(exist_ok=True)

    plan = [("confirm", c) for c in candidates for _ in range(seeds)] + [("re-train", candidates[0])]
    progress = Progress(plan)
    epochs = sum(c.settings.epochs for _, c in plan)
    log.info(
        "final: %d candidates x %d seeds, then the winner re-trained on train + validation: %d runs, %d epochs, "
        "about %s (from the search's epoch times)",
        len(candidates),
        seeds,
        len(plan),
        epochs,
        minutes(progress.estimate()),
    )
    runs = confirm(candidates, data_for, seeds, device, progress)
    ranking = rank_confirmed(candidates, runs, search.metric, search.mode)
    ranking.to_csv(out / "confirmation.csv", index=False)
    winner = next(c for c in candidates if c.trial_id == ranking["trial_id"].iloc[0])
    progress.planned[-1] = ("re-train", winner)
    final_run = train_to_the_end(
        replace(winner.settings, seed=0), merge_validation(data_for[winner.settings.image_size]), device, progress
    )

    test = prepare_test(data_config, winner.settings.image_size)
    probabilities, labels = evaluate_once_on_test(final_run, test, device)
    predictions = probabilities.argmax(1)
    accuracy = float((predictions == labels).mean())
    report, confusion = classification_report(labels, predictions, test.classes)
    report.to_csv(out / "per_class.csv", index=False)
    pd.DataFrame(
        {
            "file": [test.cache.files[r] for r in test.rows],
            "true": [test.classes[i] for i in labels],
            "predicted": [test.classes[i] for i in predictions],
            "probability": probabilities.max(1),
        }
    ).to_csv(out / "test_predictions.csv", index=False)
    title = f"{winner.settings.backbone}: test accuracy {100 * accuracy:.1f}% ({len(labels)} images)"
    plot_confusion(confusion, test.classes, out / "confusion_matrix.png", title)
    squares = test.cache.open_images()[test.rows]
    plot_prediction_grid(
        squares, labels, predictions, test.classes, grid_rows(labels, test.classes), out / "test_predictions.png", title
    )
    save_model_file(
        out / "model.pt", final_run.model, test.classes, winner.settings.image_size, winner.settings.to_dict()
    )

    winner_row = search.trials.set_index("trial_id").loc[winner.trial_id]
    summary = {
        "winner_trial": winner.trial_id,
        "settings": winner.settings.to_dict(),
        "cost": {key: plain(winner_row[key]) for key in COST_KEYS if key in winner_row},
        "constraints": {flag: limit for flag, _, limit in constraints.limits()},
        "test_accuracy": accuracy,
        "test_images": int(len(labels)),
        "test_set_evaluations": 1,
        "top_k": len(candidates),
        "seeds": seeds,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    markdown = "\n".join(
        [
            f"Winner: trial `{winner.trial_id}` ({winner.settings.backbone}, {winner.settings.image_size} px, "
            f"{winner.settings.describe_freezing()}, lr {winner.settings.lr:.2g}, batch {winner.settings.batch_size}, "
            f"{winner.settings.epochs} epochs), re-trained on train + validation.",
            "",
            f"**Test accuracy: {100 * accuracy:.1f}%** on {len(labels)} images, evaluated once.",
            "",
            f"Confirmation on the validation split ({seeds} seeds each):",
            "",
            markdown_table(ranking),
            "",
            "Per class on the test set:",
            "",
            markdown_table(report),
            "",
            "![confusion matrix](final/confusion_matrix.png)",
            "",
            "![test predictions](final/test_predictions.png)",
            "",
            "Model: `final/model.pt` (`python -m tune_inat.predict final/model.pt IMAGE`). "
            + cost_line(summary["cost"]),
        ]
    )
    (out / "summary.md").write_text(markdown)
    write_report(search, summary_sections(search), write_plots(search))
    return (
        f"Confirmation on the validation split ({seeds} seeds each):\n{text_table(ranking)}\n\n"
        f"Winner: trial {winner.trial_id}; test accuracy {100 * accuracy:.1f}% on {len(labels)} images "
        f"(evaluated once)\n"
        f"{text_table(report)}\n\nWritten to {out}: model.pt, summary.json, summary.md, confirmation.csv, "
        f"per_class.csv, test_predictions.csv, confusion_matrix.png, test_predictions.png; report.md updated"
    )


def final_parser() -> argparse.ArgumentParser:
    parser = command_parser(
        "python -m tune_inat.final", "Confirm the best configurations, re-train the winner, test it once, export it."
    )
    parser.add_argument("folder", type=Path, metavar="RESULTS_DIR", help="a finished search's results folder")
    parser.add_argument("--top-k", type=int, default=3, help="configurations to confirm")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per configuration")
    parser.add_argument("--data", type=Path, default=None, help="dataset root, if it moved since the search")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to train")
    parser.add_argument("--max-epochs", type=int, default=None, help="cap every run's epochs (a smoke test)")
    limits = parser.add_argument_group("where the model will run (candidates must meet every limit given)")
    limits.add_argument(
        "--max-latency-ms",
        type=float,
        default=None,
        help="milliseconds per image at batch 1, as the search measured them",
    )
    limits.add_argument(
        "--latency-device",
        choices=["cpu", "gpu"],
        default="cpu",
        help="whose latency --max-latency-ms limits: the CPU's or the GPU's",
    )
    limits.add_argument("--max-params", type=int, default=None, help="parameters of the whole model")
    limits.add_argument(
        "--max-gflops",
        type=float,
        default=None,
        help="billions of FLOPs per image (2 per multiply-add, the trials table's forward_gflop)",
    )
    return parser


def final_from_args(args: argparse.Namespace) -> str:
    """The command's work on its parsed flags; returns what it prints."""
    if args.top_k < 1 or args.seeds < 1:
        raise UserError("--top-k and --seeds must be at least 1")
    if not args.folder.is_dir():
        raise UserError(f"results folder {args.folder} does not exist")
    constraints = Constraints(args.max_latency_ms, args.latency_device, args.max_params, args.max_gflops)
    return run_final(args.folder, args.top_k, args.seeds, args.device, args.data, args.max_epochs, constraints)


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(final_parser(), lambda args: print(final_from_args(args)), argv)


@dataclass(frozen=True)
class FinalResult:
    """What `final` wrote: the tested model and its summary (summary.json)."""

    path: Path  # the final/ folder
    summary: dict[str, Any]
    report: str  # what the command prints

    @property
    def model(self) -> Path:
        return self.path / "model.pt"

    @property
    def test_accuracy(self) -> float:
        return float(self.summary["test_accuracy"])


def run(results: str | Path, **options: Any) -> FinalResult:
    """`tune_inat.final(results, top_k=1, seeds=1, ...)`: the command from Python, its flags as keywords."""
    parser = final_parser()
    args = parse_flags(parser, [str(results), *command_flags(parser, options)])
    setup_logging(args.debug, args.quiet)
    report = final_from_args(args)
    folder = Path(results) / "final"
    return FinalResult(folder, json.loads((folder / "summary.json").read_text()), report)


make_callable(__name__, run)  # tune_inat.final(...) is the API, python -m tune_inat.final the command

if __name__ == "__main__":
    sys.exit(main())
