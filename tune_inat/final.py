"""`python -m tune_inat.final RESULTS_DIR [--top-k 3] [--seeds 3]`: from a finished search to one tested model.

1. Confirm the ranking without the test set: the top-k configurations are re-trained with
   several seeds on the training split and scored on the validation split (mean and standard
   deviation), since a 2,000-image validation set moves about a point by chance.
2. Re-train the winner (best mean) once on train + validation, for its epochs.
3. Evaluate it exactly once on the test set (`val/` of iNaturalist 12K): accuracy, per-class
   precision/recall/F1, confusion matrix and a 10 x 3 grid of test images.
4. Export one self-contained model file for `python -m tune_inat.predict`.
Everything goes to RESULTS_DIR/final/ and into the results' report.md. Plain PyTorch: no Ray.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from tune_inat.analyze import load_search, markdown_table, summary_sections, write_plots, write_report  # noqa: E402
from tune_inat.cli import setup_logging  # noqa: E402
from tune_inat.data.batches import DeviceBatches  # noqa: E402
from tune_inat.data.dataset import DataConfig, TestData, TrainValData, merge_validation, prepare_test, prepare_train_val  # noqa: E402
from tune_inat.engine import FIELD_TYPES, FineTuning, MixedPrecision, TrainConfig, predict_probabilities, resolve_device  # noqa: E402
from tune_inat.errors import UserError, cli_main  # noqa: E402
from tune_inat.models import fetch_weights, save_model_file  # noqa: E402

log = logging.getLogger(__name__)

SEARCH_INFO_FILE = "search.json"
GRID_ROWS, GRID_COLUMNS = 10, 3


@dataclass(frozen=True)
class Candidate:
    """A configuration from the search, as it was trained there."""

    trial_id: str
    settings: TrainConfig
    search_val_acc: float


def read_search_info(folder: Path) -> dict:
    path = folder / SEARCH_INFO_FILE
    if not path.is_file():
        raise UserError(f"{folder} has no {SEARCH_INFO_FILE}: it was not written by a tune-inat search")
    return json.loads(path.read_text())


def top_candidates(trials: pd.DataFrame, k: int, mode: str = "max") -> list[Candidate]:
    """The k best completed trials (by the search metric), with the epochs they actually trained."""
    finished = trials[(trials["status"] == "completed") & trials["best_score"].notna()]
    if finished.empty:
        raise UserError("the search has no finished trials yet (none completed all its epochs)")
    ranked = finished.sort_values("best_score", ascending=(mode == "min"))
    candidates: list[Candidate] = []
    seen: set[tuple] = set()
    for _, row in ranked.iterrows():
        values = {name: (row[name].item() if hasattr(row[name], "item") else row[name]) for name in FIELD_TYPES}
        values["epochs"] = int(row["max_epochs"])
        settings = TrainConfig.from_dict(values, f"trial {row['trial_id']}")
        key = tuple(sorted(replace(settings, seed=0).to_dict().items()))
        if key not in seen:  # a grid can hold the same configuration twice
            seen.add(key)
            candidates.append(Candidate(row["trial_id"], settings, float(row["best_val_acc"])))
        if len(candidates) == k:
            break
    return candidates


def train_to_the_end(settings: TrainConfig, data: TrainValData, device: torch.device) -> FineTuning:
    run = FineTuning(settings, data, device)
    while not run.done:
        metrics = run.run_epoch()
        log.info("  epoch %d/%d  train_acc %.1f%%  val_acc %s", metrics["epoch"], settings.epochs,
                 100 * metrics["train_acc"], "-" if math.isnan(metrics["val_acc"]) else f"{100 * metrics['val_acc']:.1f}%")
    return run


def confirm(candidates: list[Candidate], data_for: dict[int, TrainValData], seeds: int, device: torch.device) -> pd.DataFrame:
    """Each candidate re-trained with `seeds` seeds; one row per run with its final validation accuracy."""
    rows = []
    for candidate in candidates:
        for seed in range(seeds):
            log.info("confirming trial %s with seed %d", candidate.trial_id, seed)
            run = train_to_the_end(replace(candidate.settings, seed=seed), data_for[candidate.settings.image_size], device)
            rows.append({"trial_id": candidate.trial_id, "seed": seed, "val_acc": run.last_metrics["val_acc"]})
    return pd.DataFrame(rows)


def rank_confirmed(candidates: list[Candidate], runs: pd.DataFrame) -> pd.DataFrame:
    table = runs.groupby("trial_id")["val_acc"].agg(["mean", "std", "count"]).reset_index()
    table = table.rename(columns={"mean": "val_acc_mean", "std": "val_acc_std", "count": "seeds"})
    by_id = {c.trial_id: c for c in candidates}
    table["search_val_acc"] = table["trial_id"].map(lambda t: by_id[t].search_val_acc)
    for name in ("backbone", "image_size", "freeze_fraction", "lr", "batch_size", "epochs"):
        table[name] = table["trial_id"].map(lambda t, n=name: getattr(by_id[t].settings, n))
    return table.sort_values("val_acc_mean", ascending=False).reset_index(drop=True)


def classification_report(labels: np.ndarray, predictions: np.ndarray, classes: Sequence[str]) -> tuple[pd.DataFrame, np.ndarray]:
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
    report = pd.DataFrame({"class": list(classes), "precision": precision, "recall": recall, "f1": f1, "support": actual.astype(int)})
    return report, confusion


def plot_confusion(confusion: np.ndarray, classes: Sequence[str], path: Path, title: str) -> None:
    shares = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1 + 0.75 * len(classes), 0.75 * len(classes) + 1.2))
    image = ax.imshow(100 * shares, cmap="Blues", vmin=0, vmax=100)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, str(confusion[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if shares[i, j] > 0.5 else "black")
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


def plot_prediction_grid(squares: np.ndarray, labels: np.ndarray, predictions: np.ndarray, classes: Sequence[str],
                         picks: list[list[int]], path: Path, title: str) -> None:
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
            ax.set_title(f"{'✓' if ok else '✗'} true: {classes[labels[i]]}\npredicted: {classes[predictions[i]]}",
                         fontsize=9, color="green" if ok else "red")
    fig.suptitle(title, fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / (2.6 * len(picks))))  # leave room for the title
    fig.savefig(path, dpi=100)
    plt.close(fig)


def evaluate_once_on_test(run: FineTuning, test: TestData, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities and true labels of every test image: the only time the test set is read."""
    batches = DeviceBatches(test.cache.open_images(), test.cache.labels, test.rows, batch_size=128,
                            image_size=run.config.image_size, device=device, train=False)
    return predict_probabilities(run.model, batches.epoch(0), MixedPrecision(device))


def run_final(folder: Path, top_k: int, seeds: int, device_name: str, data_root: Path | None, max_epochs: int | None) -> str:
    info = read_search_info(folder)
    search = load_search(folder)
    candidates = top_candidates(search.trials, top_k, info.get("mode", "max"))
    if max_epochs:
        candidates = [replace(c, settings=replace(c.settings, epochs=min(c.settings.epochs, max_epochs))) for c in candidates]
    data_config = DataConfig(root=data_root or Path(info["data_root"]), cache_dir=Path(info["cache_dir"]),
                             val_fraction=info["val_fraction"], test_fraction=info["test_fraction"], split_seed=info["split_seed"])
    for candidate in candidates:
        if candidate.settings.weights == "imagenet":
            fetch_weights(candidate.settings.backbone)
    device = resolve_device(device_name)
    data_for = {size: prepare_train_val(data_config, size) for size in {c.settings.image_size for c in candidates}}
    out = folder / "final"
    out.mkdir(exist_ok=True)

    runs = confirm(candidates, data_for, seeds, device)
    ranking = rank_confirmed(candidates, runs)
    ranking.to_csv(out / "confirmation.csv", index=False)
    winner = next(c for c in candidates if c.trial_id == ranking["trial_id"].iloc[0])
    log.info("re-training trial %s on train + validation", winner.trial_id)
    final_run = train_to_the_end(replace(winner.settings, seed=0), merge_validation(data_for[winner.settings.image_size]), device)

    test = prepare_test(data_config, winner.settings.image_size)
    probabilities, labels = evaluate_once_on_test(final_run, test, device)
    predictions = probabilities.argmax(1)
    accuracy = float((predictions == labels).mean())
    report, confusion = classification_report(labels, predictions, test.classes)
    report.to_csv(out / "per_class.csv", index=False)
    pd.DataFrame({"file": [test.cache.files[r] for r in test.rows], "true": [test.classes[i] for i in labels],
                  "predicted": [test.classes[i] for i in predictions], "probability": probabilities.max(1)}
                 ).to_csv(out / "test_predictions.csv", index=False)
    title = f"{winner.settings.backbone}: test accuracy {100 * accuracy:.1f}% ({len(labels)} images)"
    plot_confusion(confusion, test.classes, out / "confusion_matrix.png", title)
    squares = test.cache.open_images()[test.rows]
    plot_prediction_grid(squares, labels, predictions, test.classes, grid_rows(labels, test.classes), out / "test_predictions.png", title)
    save_model_file(out / "model.pt", final_run.model, test.classes, winner.settings.image_size, winner.settings.to_dict())

    summary = {"winner_trial": winner.trial_id, "settings": winner.settings.to_dict(), "test_accuracy": accuracy,
               "test_images": int(len(labels)), "test_set_evaluations": 1, "top_k": len(candidates), "seeds": seeds}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    markdown = "\n".join([
        f"Winner: trial `{winner.trial_id}` ({winner.settings.backbone}, {winner.settings.image_size} px, freeze "
        f"{winner.settings.freeze_fraction:.2f}, lr {winner.settings.lr:.2g}, batch {winner.settings.batch_size}, "
        f"{winner.settings.epochs} epochs), re-trained on train + validation.",
        "", f"**Test accuracy: {100 * accuracy:.2f}%** on {len(labels)} images, evaluated once.", "",
        f"Confirmation on the validation split ({seeds} seeds each):", "", markdown_table(ranking), "",
        "Per class on the test set:", "", markdown_table(report), "",
        "![confusion matrix](final/confusion_matrix.png)", "", "![test predictions](final/test_predictions.png)", "",
        "Model: `final/model.pt` (`python -m tune_inat.predict final/model.pt IMAGE`).",
    ])
    (out / "summary.md").write_text(markdown)
    write_report(search, summary_sections(search), write_plots(search))
    return (
        f"Confirmation on the validation split ({seeds} seeds each):\n{ranking.to_string(index=False)}\n\n"
        f"Winner: trial {winner.trial_id}; test accuracy {100 * accuracy:.2f}% on {len(labels)} images (evaluated once)\n"
        f"{report.to_string(index=False)}\n\nWritten to {out}: model.pt, summary.json, summary.md, confirmation.csv, "
        f"per_class.csv, test_predictions.csv, confusion_matrix.png, test_predictions.png; report.md updated"
    )


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tune_inat.final", description="Confirm the best configs, re-train the winner, test it once, export it.")
    parser.add_argument("folder", type=Path, metavar="RESULTS_DIR")
    parser.add_argument("--top-k", type=int, default=3, help="configurations to confirm (default 3)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per configuration (default 3)")
    parser.add_argument("--data", type=Path, default=None, help="dataset root, if it moved since the search")
    parser.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    parser.add_argument("--max-epochs", type=int, default=None, help="cap every run's epochs (a smoke test)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    setup_logging(args.debug)
    if args.top_k < 1 or args.seeds < 1:
        raise UserError("--top-k and --seeds must be at least 1")
    if not args.folder.is_dir():
        raise UserError(f"results folder {args.folder} does not exist")
    print(run_final(args.folder, args.top_k, args.seeds, args.device, args.data, args.max_epochs))
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(main))
