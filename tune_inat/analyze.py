"""`python -m tune_inat.analyze RESULTS_DIR [RESULTS_DIR ...]`: tables, importance, plots, report.md.

Reads only the Parquet files a search writes, so it works on a finished search, a running one, or
one copied from a cluster. For each folder it prints the leaderboard, the best config per
backbone, the compute ASHA saved and which hyperparameters mattered (Optuna's PED-ANOVA on the
completed trials), writes PNG plots and a `report.md` beside the results; for several folders it
also compares them side by side.
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from tune_inat.engine import FIELD_TYPES  # noqa: E402
from tune_inat.errors import UserError, cli_main  # noqa: E402
from tune_inat.results import EPOCHS_FILE, TRIALS_FILE  # noqa: E402

LOG_SCALE = {"lr", "weight_decay", "backbone_lr_scale"}
MIN_TRIALS_FOR_IMPORTANCE = 10
PLOTS = {
    "learning_curves": "learning_curves.png",
    "parallel_coordinates": "parallel_coordinates.png",
    "accuracy_vs_lr": "accuracy_vs_lr.png",
    "accuracy_vs_freeze": "accuracy_vs_freeze_fraction.png",
}


@dataclass
class Search:
    """One search's results as DataFrames."""

    name: str
    folder: Path
    epochs: pd.DataFrame
    trials: pd.DataFrame

    @property
    def searched(self) -> list[str]:
        """Settings that vary between trials: what this search explored."""
        return [c for c in FIELD_TYPES if c in self.trials and self.trials[c].nunique(dropna=True) > 1]


def load_search(folder: Path) -> Search:
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"results folder {folder} does not exist")
    if not (folder / TRIALS_FILE).is_file() or not (folder / EPOCHS_FILE).exists():
        raise UserError(f"{folder} holds no search results ({TRIALS_FILE} and {EPOCHS_FILE} missing)")
    epochs = pd.read_parquet(folder / EPOCHS_FILE)
    trials = pd.read_parquet(folder / TRIALS_FILE)
    if trials.empty:
        raise UserError(f"{folder} holds no trials yet")
    return Search(folder.name, folder, epochs, trials)


# -- tables ---------------------------------------------------------------------------------


def leaderboard(search: Search, top: int = 10) -> pd.DataFrame:
    ranked = search.trials.sort_values("best_val_acc", ascending=False, na_position="last")
    columns = ["trial_id", *search.searched, "best_val_acc", "best_epoch", "epochs_run", "max_epochs", "status"]
    return ranked[columns].head(top).reset_index(drop=True)


def best_per_backbone(search: Search) -> pd.DataFrame:
    trials = search.trials.dropna(subset=["best_val_acc"])
    best = trials.loc[trials.groupby("backbone")["best_val_acc"].idxmax()]
    columns = ["backbone", "best_val_acc", "trial_id", *[c for c in search.searched if c != "backbone"]]
    return best[columns].sort_values("best_val_acc", ascending=False).reset_index(drop=True)


def compute_saved(search: Search) -> dict[str, float]:
    """Trial-epochs run versus running every trial to its last epoch (what ASHA saved)."""
    run = len(search.epochs)
    budget = int(search.trials["max_epochs"].fillna(0).sum())
    return {
        "trials": len(search.trials),
        "stopped_early": int((search.trials["status"] == "stopped_early").sum()),
        "trial_epochs_run": run,
        "trial_epochs_budget": budget,
        "saved_fraction": 1 - run / budget if budget else 0.0,
        "gpu_hours": float(search.trials["gpu_seconds"].fillna(0).sum()) / 3600,
        "trial_hours": float(search.trials["wall_seconds"].fillna(0).sum()) / 3600,
    }


def importance(search: Search) -> tuple[pd.Series | None, str]:
    """Hyperparameter importance on the completed trials (Optuna's PED-ANOVA), with a trust note."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution
    from optuna.trial import create_trial

    completed = search.trials[(search.trials["status"] == "completed") & search.trials["best_score"].notna()]
    names = [n for n in search.searched if completed[n].nunique() > 1] if len(completed) else []
    if len(completed) < 3 or not names:
        return None, f"only {len(completed)} completed trials varying in {len(names)} settings: no importance computed"
    distributions = {}
    for name in names:
        values = completed[name]
        if FIELD_TYPES[name] in (int, float) and values.nunique() > 4:
            low, high = float(search.trials[name].min()), float(search.trials[name].max())
            distributions[name] = FloatDistribution(low, high, log=name in LOG_SCALE and low > 0)
        else:
            distributions[name] = CategoricalDistribution(sorted(search.trials[name].dropna().unique().tolist(), key=str))
    study = optuna.create_study(direction="maximize")
    for _, row in completed.iterrows():
        params = {n: (float(row[n]) if isinstance(d, FloatDistribution) else _plain(row[n])) for n, d in distributions.items()}
        study.add_trial(create_trial(params=params, distributions=distributions, value=float(row["best_val_acc"])))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            scores = optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.PedAnovaImportanceEvaluator(), normalize=True
            )
        except (ValueError, RuntimeError) as err:
            return None, f"importance could not be computed: {err}"
    note = "PED-ANOVA on completed trials (share of explained variation in accuracy)"
    if len(completed) < MIN_TRIALS_FOR_IMPORTANCE:
        note += f"; only {len(completed)} completed trials: too few to trust, treat as a hint"
    return pd.Series(scores, name="importance").sort_values(ascending=False), note


def _plain(value: object) -> object:
    return value.item() if hasattr(value, "item") else value


# -- plots ----------------------------------------------------------------------------------


def _style_for(status: str) -> dict:
    if status == "stopped_early":
        return {"linestyle": "--", "alpha": 0.45, "linewidth": 1.0}
    if status == "error":
        return {"linestyle": ":", "alpha": 0.6, "linewidth": 1.0, "color": "tab:red"}
    return {"linestyle": "-", "alpha": 0.8, "linewidth": 1.3}


def plot_learning_curves(search: Search, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(9, 5.5))
    best_id = search.trials.sort_values("best_val_acc", ascending=False)["trial_id"].iloc[0]
    statuses = dict(zip(search.trials["trial_id"], search.trials["status"]))
    for trial_id, rows in search.epochs.sort_values("epoch").groupby("trial_id"):
        if trial_id == best_id:
            continue
        ax.plot(rows["epoch"], 100 * rows["val_acc"], color="tab:gray" if statuses.get(trial_id) == "stopped_early" else "tab:blue",
                **{k: v for k, v in _style_for(statuses.get(trial_id, "")).items() if k != "color" or statuses.get(trial_id) == "error"})
    best = search.epochs[search.epochs["trial_id"] == best_id].sort_values("epoch")
    best_trial = search.trials.set_index("trial_id").loc[best_id]
    ax.plot(best["epoch"], 100 * best["val_acc"], color="tab:orange", linewidth=3, marker="o",
            label=f"best: {best_id} ({best_trial['backbone']}, {100 * best_trial['best_val_acc']:.1f}%)")
    ax.plot([], [], color="tab:blue", label="completed")
    ax.plot([], [], color="tab:gray", linestyle="--", label="stopped early (ASHA)")
    if (search.trials["status"] == "error").any():
        ax.plot([], [], color="tab:red", linestyle=":", label="failed")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(f"{search.name}: validation accuracy per epoch, {len(search.trials)} trials")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _axis_values(series: pd.Series, name: str) -> tuple[np.ndarray, list[float], list[str]]:
    """Values mapped to [0, 1] for a parallel-coordinates axis, with tick positions and labels."""
    if FIELD_TYPES.get(name) in (int, float) and series.nunique() > 1 and not series.isna().any():
        values = series.astype(float).to_numpy()
        log = name in LOG_SCALE and values.min() > 0
        scaled = np.log10(values) if log else values
        low, high = scaled.min(), scaled.max()
        positions = (scaled - low) / (high - low) if high > low else np.full(len(values), 0.5)
        ticks = np.linspace(low, high, 3)
        labels = [f"{10 ** t:.2g}" if log else f"{t:.3g}" for t in ticks]
        return positions, [0.0, 0.5, 1.0], labels
    categories = sorted(series.astype(str).unique())
    index = {c: i for i, c in enumerate(categories)}
    span = max(1, len(categories) - 1)
    positions = np.array([index[str(v)] / span for v in series])
    return positions, [i / span for i in range(len(categories))], categories


def plot_parallel_coordinates(search: Search, path: Path) -> None:
    names = search.searched or ["backbone"]
    trials = search.trials.dropna(subset=["best_val_acc"]).sort_values("best_val_acc")
    fig, ax = plt.subplots(figsize=(max(7, 1.8 * (len(names) + 1)), 5.5))
    columns = [_axis_values(trials[name], name) for name in names]
    accuracy = 100 * trials["best_val_acc"].to_numpy()
    norm = plt.Normalize(accuracy.min(), accuracy.max() if accuracy.max() > accuracy.min() else accuracy.min() + 1)
    cmap = plt.get_cmap("viridis")
    acc_positions = norm(accuracy)
    for i in range(len(trials)):
        ys = [col[0][i] for col in columns] + [acc_positions[i]]
        ax.plot(range(len(names) + 1), ys, color=cmap(norm(accuracy[i])), alpha=0.85, linewidth=1.6)
    for x, (name, (_, ticks, labels)) in enumerate(zip(names, columns)):
        ax.axvline(x, color="black", linewidth=0.8)
        for tick, label in zip(ticks, labels):
            ax.text(x + 0.03, tick, label, fontsize=8, va="center")
    ax.axvline(len(names), color="black", linewidth=0.8)
    for value in np.linspace(norm.vmin, norm.vmax, 3):
        ax.text(len(names) + 0.03, norm(value), f"{value:.0f}%", fontsize=8, va="center")
    ax.set_xticks(range(len(names) + 1), [*names, "best val acc"], rotation=15)
    ax.set_yticks([])
    ax.set_xlim(-0.2, len(names) + 0.6)
    ax.set_title(f"{search.name}\nhyperparameters of each trial (one line each), coloured by best validation accuracy", fontsize=11)
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="best validation accuracy (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_accuracy_against(search: Search, setting: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 5))
    trials = search.trials.dropna(subset=["best_val_acc"])
    for (backbone, rows), color in zip(trials.groupby("backbone"), plt.get_cmap("tab10").colors):
        for stopped, marker_face in ((False, color), (True, "none")):
            part = rows[(rows["status"] == "stopped_early") == stopped]
            if not part.empty:
                ax.scatter(part[setting], 100 * part["best_val_acc"], s=45, edgecolors=color, facecolors=marker_face,
                           label=f"{backbone}{' (stopped early)' if stopped else ''}")
    if setting in LOG_SCALE and (trials[setting] > 0).all():
        ax.set_xscale("log")
    ax.set_xlabel(f"{setting}{' (log scale)' if ax.get_xscale() == 'log' else ''}")
    ax.set_ylabel("best validation accuracy (%)")
    ax.set_title(f"{search.name}: best validation accuracy against {setting}, per backbone")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_plots(search: Search) -> dict[str, Path]:
    paths = {key: search.folder / name for key, name in PLOTS.items()}
    plot_learning_curves(search, paths["learning_curves"])
    plot_parallel_coordinates(search, paths["parallel_coordinates"])
    plot_accuracy_against(search, "lr", paths["accuracy_vs_lr"])
    plot_accuracy_against(search, "freeze_fraction", paths["accuracy_vs_freeze"])
    return paths


def plot_comparison(searches: list[Search], path: Path) -> None:
    """Best accuracy so far against trial-epochs spent, one line per search: anytime performance."""
    fig, ax = plt.subplots(figsize=(8, 5))
    for search in searches:
        epochs = search.epochs.sort_values("timestamp")
        best_so_far = 100 * epochs["val_acc"].cummax().to_numpy()
        ax.step(np.arange(1, len(epochs) + 1), best_so_far, where="post", label=f"{search.name} ({len(search.trials)} trials)")
    ax.set_xlabel("trial-epochs spent (cumulative)")
    ax.set_ylabel("best validation accuracy so far (%)")
    ax.set_title("Searches compared: best accuracy against compute spent")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- text -----------------------------------------------------------------------------------


def _format(value: object, column: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if column in ("best_val_acc", "last_val_acc"):
        return f"{100 * float(value):.1f}%"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def markdown_table(frame: pd.DataFrame) -> str:
    columns = list(frame.columns)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for _, row in frame.iterrows():
        lines.append("| " + " | ".join(_format(row[c], c) for c in columns) + " |")
    return "\n".join(lines)


def text_table(frame: pd.DataFrame) -> str:
    shown = frame.copy()
    for column in shown.columns:
        shown[column] = [_format(v, column) for v in shown[column]]
    shown.index = range(1, len(shown) + 1)
    return shown.to_string()


def summary_sections(search: Search) -> list[tuple[str, str, str]]:
    """(title, console text, markdown) for each part of the analysis."""
    saved = compute_saved(search)
    saved_text = (
        f"{saved['trial_epochs_run']} of {saved['trial_epochs_budget']} trial-epochs run "
        f"({100 * saved['saved_fraction']:.0f}% saved by early stopping; {saved['stopped_early']} of "
        f"{saved['trials']} trials stopped early); {saved['trial_hours']:.2f} trial-hours, {saved['gpu_hours']:.2f} GPU-hours"
    )
    board = leaderboard(search)
    per_backbone = best_per_backbone(search)
    scores, note = importance(search)
    importance_frame = scores.rename_axis("setting").reset_index() if scores is not None else None
    return [
        ("Leaderboard", text_table(board), markdown_table(board)),
        ("Best per backbone", text_table(per_backbone), markdown_table(per_backbone)),
        ("Compute", saved_text, saved_text),
        ("Hyperparameter importance",
         (text_table(importance_frame) + "\n" if importance_frame is not None else "") + note,
         (markdown_table(importance_frame) + "\n\n" if importance_frame is not None else "") + f"_{note}_"),
    ]


def write_report(search: Search, sections: list[tuple[str, str, str]], plots: dict[str, Path]) -> Path:
    lines = [f"# Search `{search.name}`", ""]
    for title, _, markdown in sections:
        lines += [f"## {title}", "", markdown, ""]
    lines += ["## Plots", ""]
    for key, path in plots.items():
        lines += [f"![{key.replace('_', ' ')}]({path.name})", ""]
    final = search.folder / "final" / "summary.md"
    if final.is_file():
        lines += ["## Final model", "", final.read_text(), ""]
    report = search.folder / "report.md"
    report.write_text("\n".join(lines))
    return report


def analyze(folders: Sequence[Path], comparison_dir: Path | None = None) -> str:
    """Analyse each folder (tables, PNGs, report.md); compare them when there are several."""
    searches = [load_search(folder) for folder in folders]
    output = []
    for search in searches:
        sections = summary_sections(search)
        plots = write_plots(search)
        report = write_report(search, sections, plots)
        output.append(f"=== {search.name} ({search.folder})")
        for title, text, _ in sections:
            output += [f"\n{title}:", text]
        output.append(f"\nWritten: {report} and {', '.join(p.name for p in plots.values())}")
    if len(searches) > 1:
        rows = []
        for search in searches:
            saved = compute_saved(search)
            best = search.trials.sort_values("best_val_acc", ascending=False).iloc[0]
            rows.append({"search": search.name, "trials": saved["trials"], "best_val_acc": best["best_val_acc"],
                         "best_backbone": best["backbone"], "trial_epochs": saved["trial_epochs_run"],
                         "stopped_early": saved["stopped_early"], "trial_hours": saved["trial_hours"]})
        table = pd.DataFrame(rows)
        target = comparison_dir or searches[0].folder.parent / "comparison"
        target.mkdir(parents=True, exist_ok=True)
        plot_comparison(searches, target / "comparison.png")
        (target / "comparison.md").write_text(
            "# Searches compared\n\n" + markdown_table(table) + "\n\n![best accuracy against compute](comparison.png)\n"
        )
        output += ["\n=== Compared", text_table(table), f"Written: {target / 'comparison.md'}, {target / 'comparison.png'}"]
    return "\n".join(output)


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tune_inat.analyze", description="Tables, plots and a report of one or more searches.")
    parser.add_argument("folders", nargs="+", type=Path, metavar="RESULTS_DIR")
    parser.add_argument("--comparison-dir", type=Path, default=None, help="where the comparison of several searches goes (default: <first>/../comparison)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    print(analyze(args.folders, args.comparison_dir))
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(main))
