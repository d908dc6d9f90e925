"""`python -m tune_inat.analyze RESULTS_DIR [RESULTS_DIR ...]`: tables, importance, plots, report.md.

Reads only what a search writes (`results.read_results`: the Parquet tables and search.json), so it
works on a finished search, a running one, or one copied from a cluster, and it imports no Ray.
Every "best" is `results.rank_trials` by the search's own metric and mode. For each folder it
prints the leaderboard, the best config per backbone, the compute early stopping saved and which
hyperparameters mattered (Optuna's PED-ANOVA on the completed trials), writes PNG plots and a
`report.md` beside the results; for several folders it also compares them side by side.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

if "ipykernel" not in sys.modules:  # files only, no display; a notebook keeps its own (inline) backend
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from tune_inat.cli import command_parser, run_command  # noqa: E402
from tune_inat.errors import UserError  # noqa: E402
from tune_inat.results import SearchResults, format_value, name_scores, rank_trials, read_results  # noqa: E402
from tune_inat.settings import FIELD_TYPES, plain  # noqa: E402

log = logging.getLogger(__name__)

LOG_SCALE = {"lr", "weight_decay", "backbone_lr_scale"}
MIN_TRIALS_FOR_IMPORTANCE = 10
GPU_PLOT = "gpu_utilization.png"
PLOTS = {
    "learning_curves": "learning_curves.png",
    "parallel_coordinates": "parallel_coordinates.png",
    "accuracy_vs_lr": "accuracy_vs_lr.png",
    "accuracy_vs_freeze": "accuracy_vs_freeze_fraction.png",
    "pareto": "pareto_front.png",
}
COSTS = {"cpu_latency_ms_b1": "CPU latency, batch 1 (ms)", "total_parameters": "parameters"}


@dataclass
class Search:
    """One search's results, and the local folder its plots and report go to."""

    results: SearchResults
    folder: Path

    @property
    def name(self) -> str:
        return self.results.name

    @property
    def epochs(self) -> pd.DataFrame:
        return self.results.epochs

    @property
    def trials(self) -> pd.DataFrame:
        return self.results.trials

    @property
    def metric(self) -> str:
        return self.results.metric

    @property
    def mode(self) -> str:
        return self.results.mode

    def ranked(self) -> pd.DataFrame:
        return rank_trials(self.trials, self.mode)

    @property
    def searched(self) -> list[str]:
        """Settings that vary between trials: what this search explored."""
        return [c for c in FIELD_TYPES if c in self.trials and self.trials[c].nunique(dropna=True) > 1]

    @property
    def score_label(self) -> str:
        return f"best {self.metric}"


def load_search(folder: Path | str, output: Path | None = None) -> Search:
    """A search's results (a local folder or a URI); plots go beside them, or to `output` for a URI."""
    results = read_results(str(folder))
    if results.trials.empty:
        raise UserError(f"{folder} holds no trials yet")
    local = Path(str(folder)) if "://" not in str(folder) else (output or Path("analysis")) / results.name
    local.mkdir(parents=True, exist_ok=True)
    return Search(results, local)


def scores_in_percent(search: Search) -> pd.Series:
    """The search metric of each trial as plotted: accuracies in %, losses as they are."""
    return 100 * search.trials["best_score"] if search.metric.endswith("_acc") else search.trials["best_score"]


# -- tables ---------------------------------------------------------------------------------


def leaderboard(search: Search, top: int = 10) -> pd.DataFrame:
    columns = [
        "trial_id",
        *search.searched,
        "best_score",
        "best_val_acc",
        "best_epoch",
        "epochs_run",
        "max_epochs",
        "status",
    ]
    return search.ranked()[columns].head(top).reset_index(drop=True)


def best_per_backbone(search: Search) -> pd.DataFrame:
    """Each backbone's best trial by the search's ranking, best backbone first."""
    ranked = search.ranked().dropna(subset=["best_score"])
    best = ranked.drop_duplicates("backbone", keep="first")
    columns = ["backbone", "best_score", "best_val_acc", "trial_id", *[c for c in search.searched if c != "backbone"]]
    return best[columns].reset_index(drop=True)


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
            distributions[name] = CategoricalDistribution(
                sorted(search.trials[name].dropna().unique().tolist(), key=str)
            )
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created" line
    study = optuna.create_study(direction="maximize" if search.mode == "max" else "minimize")
    for _, row in completed.iterrows():
        params = {
            n: (float(row[n]) if isinstance(d, FloatDistribution) else plain(row[n])) for n, d in distributions.items()
        }
        study.add_trial(create_trial(params=params, distributions=distributions, value=float(row["best_score"])))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            scores = optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.PedAnovaImportanceEvaluator(), normalize=True
            )
        except (ValueError, RuntimeError) as err:
            return None, f"importance could not be computed: {err}"
    note = f"PED-ANOVA on completed trials (share of explained variation in {search.metric})"
    if len(completed) < MIN_TRIALS_FOR_IMPORTANCE:
        note += f"; only {len(completed)} completed trials: too few to trust, treat as a hint"
    return pd.Series(scores, name="importance").sort_values(ascending=False), note


# -- plots ----------------------------------------------------------------------------------


def _style_for(status: str) -> dict:
    if status == "stopped_early":
        return {"linestyle": "--", "alpha": 0.45, "linewidth": 1.0}
    if status == "error":
        return {"linestyle": ":", "alpha": 0.6, "linewidth": 1.0, "color": "tab:red"}
    return {"linestyle": "-", "alpha": 0.8, "linewidth": 1.3}


def plot_learning_curves(search: Search, path: Path) -> None:
    fig = learning_curves_figure(search)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def learning_curves_figure(search: Search) -> Any:
    """Every trial's validation accuracy per epoch, the best highlighted (a notebook shows it; analyze saves it)."""
    fig, ax = plt.subplots(figsize=(9, 5.5))
    best_id = search.ranked()["trial_id"].iloc[0]
    statuses = dict(zip(search.trials["trial_id"], search.trials["status"]))
    for trial_id, rows in search.epochs.sort_values("epoch").groupby("trial_id"):
        if trial_id == best_id:
            continue
        ax.plot(
            rows["epoch"],
            100 * rows["val_acc"],
            color="tab:gray" if statuses.get(trial_id) == "stopped_early" else "tab:blue",
            **{
                k: v
                for k, v in _style_for(statuses.get(trial_id, "")).items()
                if k != "color" or statuses.get(trial_id) == "error"
            },
        )
    best = search.epochs[search.epochs["trial_id"] == best_id].sort_values("epoch")
    best_trial = search.trials.set_index("trial_id").loc[best_id]
    ax.plot(
        best["epoch"],
        100 * best["val_acc"],
        color="tab:orange",
        linewidth=3,
        marker="o",
        label=f"best by {search.metric}: {best_id} ({best_trial['backbone']}, {100 * best_trial['best_val_acc']:.1f}%)",
    )
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
    return fig


def _axis_values(series: pd.Series, name: str) -> tuple[np.ndarray, list[float], list[str]]:
    """Values mapped to [0, 1] for a parallel-coordinates axis, with tick positions and labels."""
    if FIELD_TYPES.get(name) in (int, float) and series.nunique() > 1 and not series.isna().any():
        values = series.astype(float).to_numpy()
        log = name in LOG_SCALE and values.min() > 0
        scaled = np.log10(values) if log else values
        low, high = scaled.min(), scaled.max()
        positions = (scaled - low) / (high - low) if high > low else np.full(len(values), 0.5)
        ticks = np.linspace(low, high, 3)
        labels = [f"{10**t:.2g}" if log else f"{t:.3g}" for t in ticks]
        return positions, [0.0, 0.5, 1.0], labels
    categories = sorted(series.astype(str).unique())
    index = {c: i for i, c in enumerate(categories)}
    span = max(1, len(categories) - 1)
    positions = np.array([index[str(v)] / span for v in series])
    return positions, [i / span for i in range(len(categories))], categories


def plot_parallel_coordinates(search: Search, path: Path) -> None:
    names = search.searched or ["backbone"]
    trials = search.trials.dropna(subset=["best_score"]).sort_values("best_score", ascending=search.mode == "min")
    fig, ax = plt.subplots(figsize=(max(7, 1.8 * (len(names) + 1)), 5.5))
    columns = [_axis_values(trials[name], name) for name in names]
    unit = 100 if search.metric.endswith("_acc") else 1
    accuracy = unit * trials["best_score"].to_numpy()
    norm = plt.Normalize(accuracy.min(), accuracy.max() if accuracy.max() > accuracy.min() else accuracy.min() + 1)
    cmap = plt.get_cmap("viridis")
    acc_positions = norm(accuracy)
    for i in range(len(trials)):
        ys = [col[0][i] for col in columns] + [acc_positions[i]]
        ax.plot(range(len(names) + 1), ys, color=cmap(norm(accuracy[i])), alpha=0.85, linewidth=1.6)
    for x, (_, ticks, labels) in enumerate(columns):
        ax.axvline(x, color="black", linewidth=0.8)
        for tick, label in zip(ticks, labels):
            ax.text(x + 0.03, tick, label, fontsize=8, va="center")
    ax.axvline(len(names), color="black", linewidth=0.8)
    for value in np.linspace(norm.vmin, norm.vmax, 3):
        ax.text(
            len(names) + 0.03, norm(value), f"{value:.0f}%" if unit == 100 else f"{value:.3g}", fontsize=8, va="center"
        )
    ax.set_xticks(range(len(names) + 1), [*names, search.score_label], rotation=15)
    ax.set_yticks([])
    ax.set_xlim(-0.2, len(names) + 0.6)
    ax.set_title(
        f"{search.name}\nhyperparameters of each trial (one line each), coloured by {search.score_label}", fontsize=11
    )
    fig.colorbar(
        plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=search.score_label + (" (%)" if unit == 100 else "")
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_accuracy_against(search: Search, setting: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 5))
    trials = search.trials.dropna(subset=["best_score"])
    unit = 100 if search.metric.endswith("_acc") else 1
    for (backbone, rows), color in zip(trials.groupby("backbone"), plt.get_cmap("tab10").colors):
        for stopped, marker_face in ((False, color), (True, "none")):
            part = rows[(rows["status"] == "stopped_early") == stopped]
            if not part.empty:
                ax.scatter(
                    part[setting],
                    unit * part["best_score"],
                    s=45,
                    edgecolors=color,
                    facecolors=marker_face,
                    label=f"{backbone}{' (stopped early)' if stopped else ''}",
                )
    if setting in LOG_SCALE and (trials[setting] > 0).all():
        ax.set_xscale("log")
    ax.set_xlabel(f"{setting}{' (log scale)' if ax.get_xscale() == 'log' else ''}")
    ax.set_ylabel(search.score_label + (" (%)" if unit == 100 else ""))
    ax.set_title(f"{search.name}: {search.score_label} against {setting}, per backbone")
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
    if not plot_pareto(search, paths["pareto"]):
        del paths["pareto"]
    if plot_gpu_utilization(search, search.folder / GPU_PLOT):  # only with gpus.parquet (an NVIDIA driver)
        paths["gpu_utilization"] = search.folder / GPU_PLOT
    return paths


# -- cost: the Pareto front of accuracy against latency and size ------------------------------------


def pareto_front(trials: pd.DataFrame, cost: str) -> pd.DataFrame:
    """Trials no other trial beats on both best validation accuracy and `cost` (lower is better), cheapest first."""
    scored = trials.dropna(subset=["best_val_acc", cost]).sort_values([cost, "best_val_acc"], ascending=[True, False])
    front, best = [], -np.inf
    for index, row in scored.iterrows():
        if row["best_val_acc"] > best:
            front.append(index)
            best = row["best_val_acc"]
    return scored.loc[front]


def best_under_budgets(trials: pd.DataFrame, cost: str = "cpu_latency_ms_b1") -> pd.DataFrame:
    """For latency budgets the data suggests (the front's own latencies, rounded): the best trial within each."""
    front = pareto_front(trials, cost)
    budgets = sorted({_round_up(value) for value in front[cost]})
    rows = []
    for budget in sorted(set(budgets)):
        within = trials[trials[cost] <= budget].dropna(subset=["best_val_acc"])
        if within.empty:
            continue
        best = within.loc[within["best_val_acc"].idxmax()]
        rows.append(
            {
                "budget_ms": budget,
                "trial_id": best["trial_id"],
                "backbone": best["backbone"],
                "image_size": best["image_size"],
                "best_val_acc": best["best_val_acc"],
                cost: best[cost],
                "total_parameters": best["total_parameters"],
            }
        )
    return pd.DataFrame(rows)


def _round_up(value: float) -> float:
    """Up to two significant digits: 12.34 -> 13, 0.0123 -> 0.013."""
    scale = 10 ** (math.floor(math.log10(value)) - 1) if value > 0 else 1
    return round(math.ceil(value / scale) * scale, 12)


def plot_pareto(search: Search, path: Path) -> bool:
    """Best validation accuracy against CPU latency and against parameters, the front highlighted (False: no costs)."""
    trials = search.trials.dropna(subset=["best_val_acc"])
    if trials.empty or trials[list(COSTS)].isna().all().any():
        return False
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    for ax, (cost, label) in zip(axes, COSTS.items()):
        front = pareto_front(trials, cost)
        ax.scatter(trials[cost], 100 * trials["best_val_acc"], s=30, color="tab:gray", alpha=0.5, label="trials")
        ax.plot(
            front[cost], 100 * front["best_val_acc"], color="tab:orange", marker="o", linewidth=2, label="Pareto front"
        )
        for _, row in front.iterrows():
            ax.annotate(
                f"{row['backbone']} {int(row['image_size'])}px",
                (row[cost], 100 * row["best_val_acc"]),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=8,
            )
        ax.set_xscale("log")
        ax.set_xlabel(f"{label} (log scale)")
        ax.set_ylabel("best validation accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"{search.name}: accuracy against what the model costs ({trials['latency_cpu'].dropna().iloc[0]})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_comparison(searches: list[Search], path: Path) -> None:
    """Best accuracy so far against trial-epochs spent, one line per search: anytime performance."""
    fig, ax = plt.subplots(figsize=(8, 5))
    for search in searches:
        epochs = search.epochs.sort_values("timestamp")
        scores = epochs[search.metric]
        best_so_far = (scores.cummax() if search.mode == "max" else scores.cummin()).to_numpy()
        unit = 100 if search.metric.endswith("_acc") else 1
        ax.step(
            np.arange(1, len(epochs) + 1),
            unit * best_so_far,
            where="post",
            label=f"{search.name} ({len(search.trials)} trials)",
        )
    ax.set_xlabel("trial-epochs spent (cumulative)")
    ax.set_ylabel(f"best {searches[0].metric} so far" + (" (%)" if searches[0].metric.endswith("_acc") else ""))
    ax.set_title("Searches compared: best accuracy against compute spent")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- text -----------------------------------------------------------------------------------


def markdown_table(frame: pd.DataFrame) -> str:
    columns = list(frame.columns)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for _, row in frame.iterrows():
        lines.append("| " + " | ".join(format_value(row[c], c) for c in columns) + " |")
    return "\n".join(lines)


def text_table(frame: pd.DataFrame) -> str:
    shown = frame.copy()
    for column in shown.columns:
        shown[column] = [format_value(v, column) for v in shown[column]]
    shown.index = range(1, len(shown) + 1)
    return shown.to_string()


def per_node(search: Search) -> pd.DataFrame | None:
    """Trials, epochs and seconds per epoch on each node, when the search ran on several (else None)."""
    if "node_id" not in search.trials or search.trials["node_id"].nunique() < 2:
        return None
    nodes = search.trials[["trial_id", "node_id", "node_host", "device_name"]]
    epochs = search.epochs.merge(nodes, on="trial_id")
    table = epochs.groupby(["node_host", "node_id", "device_name"]).agg(
        trials=("trial_id", "nunique"), epochs=("epoch", "size"), seconds_per_epoch=("epoch_seconds", "mean")
    )
    table = table.reset_index()
    table["node_id"] = table["node_id"].str[:12]
    return table


# -- what the GPUs did: gpus.parquet ------------------------------------------------------------------


def gpu_samples(search: Search) -> pd.DataFrame | None:
    """The search's GPU samples (gpus.parquet), or None when it has none (no NVIDIA GPU on the driver's host)."""
    from tune_inat.gpu_monitor import GPUS_FILE, GPUS_SCHEMA
    from tune_inat.results import file_exists, read_table_folder, resolve_folder

    filesystem, path = resolve_folder(search.results.folder)
    if not file_exists(filesystem, f"{path}/{GPUS_FILE}"):
        return None
    samples = read_table_folder(filesystem, f"{path}/{GPUS_FILE}", GPUS_SCHEMA).to_pandas()
    return samples.sort_values(["timestamp", "gpu_index"]).reset_index(drop=True) if len(samples) else None


def gpu_busy(search: Search) -> tuple[float, pd.DataFrame] | None:
    """The GPUs' busy share while trials ran (the search's steady state), and each trial's GPU while it ran.

    A trial's share is its GPU's utilisation over the trial's run: trials packed on one GPU share it.
    """
    samples = gpu_samples(search)
    trials = search.trials.dropna(subset=["started_at", "ended_at"])
    if samples is None or trials.empty:
        return None
    used = set(trials["gpu_uuid"].dropna()) if "gpu_uuid" in trials else set()
    on_used = samples[samples["gpu_uuid"].isin(used)] if used else samples
    running = np.zeros(len(on_used), dtype=bool)
    times = on_used["timestamp"].to_numpy()
    for start, end in zip(trials["started_at"].to_numpy(), trials["ended_at"].to_numpy()):
        running |= (times >= start) & (times <= end)
    overall = float(on_used.loc[running, "utilization"].mean()) if running.any() else float("nan")
    rows = []
    for _, trial in trials.iterrows():
        gpu = samples[samples["gpu_uuid"] == trial.get("gpu_uuid")]
        gpu = gpu[(gpu["timestamp"] >= trial["started_at"]) & (gpu["timestamp"] <= trial["ended_at"])]
        rows.append(
            {
                "trial_id": trial["trial_id"],
                "backbone": trial["backbone"],
                "gpu_share": trial.get("gpu_share"),
                "gpu_busy": float(gpu["utilization"].mean()) if len(gpu) else float("nan"),
                "gpu_memory_peak_mib": float(gpu["memory_used_mib"].max()) if len(gpu) else float("nan"),
                "samples": len(gpu),
            }
        )
    return overall, pd.DataFrame(rows)


def plot_gpu_utilization(search: Search, path: Path) -> bool:
    """Each GPU's utilisation and memory over the search, with the number of trials running; False without samples."""
    samples = gpu_samples(search)
    if samples is None:
        return False
    fig, (busy, memory) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    start = samples["timestamp"].min()
    for _, rows in samples.groupby("gpu_uuid"):
        minutes = (rows["timestamp"] - start).dt.total_seconds() / 60
        label = f"GPU {int(rows['gpu_index'].iloc[0])} ({rows['gpu_name'].iloc[0]})"
        busy.plot(minutes, 100 * rows["utilization"], label=label, linewidth=1)
        memory.plot(minutes, rows["memory_used_mib"] / 1024, label=label, linewidth=1)
    trials = search.trials.dropna(subset=["started_at", "ended_at"])
    if len(trials):
        grid = samples["timestamp"].drop_duplicates().sort_values()
        count = [int(((trials["started_at"] <= t) & (trials["ended_at"] >= t)).sum()) for t in grid]
        twin = busy.twinx()
        twin.step((grid - start).dt.total_seconds() / 60, count, where="post", color="grey", alpha=0.6)
        twin.set_ylabel("trials running")
    busy.set_ylabel("utilisation (%)")
    memory.set_ylabel("memory used (GiB)")
    memory.set_xlabel("minutes since the first sample")
    busy.legend(loc="lower right", fontsize=8)
    busy.set_title(f"{search.name}: what the GPUs did")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def summary_sections(search: Search) -> list[tuple[str, str, str]]:
    """(title, console text, markdown) for each part of the analysis."""
    saved = compute_saved(search)
    saved_text = (
        f"{saved['trial_epochs_run']} of {saved['trial_epochs_budget']} trial-epochs run "
        f"({100 * saved['saved_fraction']:.0f}% saved by early stopping; {saved['stopped_early']} of "
        f"{saved['trials']} trials stopped early); {saved['trial_hours']:.2f} trial-hours, "
        f"{saved['gpu_hours']:.2f} GPU-hours"
    )
    board = name_scores(leaderboard(search), search.metric)
    per_backbone = name_scores(best_per_backbone(search), search.metric)
    scores, note = importance(search)
    importance_frame = scores.rename_axis("setting").reset_index() if scores is not None else None
    sections = [
        ("Leaderboard", text_table(board), markdown_table(board)),
        ("Best per backbone", text_table(per_backbone), markdown_table(per_backbone)),
        ("Compute", saved_text, saved_text),
        (
            "Hyperparameter importance",
            (text_table(importance_frame) + "\n" if importance_frame is not None else "") + note,
            (markdown_table(importance_frame) + "\n\n" if importance_frame is not None else "") + f"_{note}_",
        ),
    ]
    busy = gpu_busy(search)
    if busy is not None:
        overall, per_trial = busy
        line = f"GPUs busy {100 * overall:.0f}% of the time trials ran (samples once a second, gpus.parquet)"
        table = per_trial.assign(gpu_busy=(100 * per_trial["gpu_busy"]).round(1))
        sections.append(("GPU busy share", line + "\n" + text_table(table), line + "\n\n" + markdown_table(table)))
    by_node = per_node(search)
    if by_node is not None:
        sections.append(("Time per epoch by node", text_table(by_node), markdown_table(by_node)))
    if search.trials[list(COSTS)].notna().any().all():
        columns = [
            "trial_id",
            "backbone",
            "image_size",
            "best_val_acc",
            "cpu_latency_ms_b1",
            "total_parameters",
            "forward_gflop",
        ]
        front = pareto_front(search.trials, "cpu_latency_ms_b1")[columns].reset_index(drop=True)
        budgets = best_under_budgets(search.trials)
        sections.append(("Accuracy against latency (the Pareto front)", text_table(front), markdown_table(front)))
        sections.append(("Best trial under each CPU latency budget", text_table(budgets), markdown_table(budgets)))
    return sections


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


def analyze(folders: Sequence[str], comparison_dir: Path | None = None, output: Path | None = None) -> str:
    """Analyse each folder (tables, PNGs, report.md); compare them when there are several.

    Given several folders, those that hold no search (a `train-*` run, the comparison folder) are
    skipped with one line each.
    """
    searches, skipped = [], []
    for folder in folders:
        try:
            searches.append(load_search(folder, output))
        except UserError as err:
            if len(folders) == 1:
                raise
            skipped.append(f"skipped {folder}: {err}")
    if not searches:
        raise UserError(f"none of the {len(folders)} folders holds search results")
    lines = list(skipped)
    for search in searches:
        sections = summary_sections(search)
        plots = write_plots(search)
        report = write_report(search, sections, plots)
        lines.append(f"=== {search.name} ({search.folder}): ranked by {search.metric} ({search.mode})")
        for title, text, _ in sections:
            lines += [f"\n{title}:", text]
        lines.append(f"\nWritten: {report} and {', '.join(p.name for p in plots.values())}")
    if len(searches) > 1:
        lines += compare(searches, comparison_dir or searches[0].folder.parent / "comparison")
    return "\n".join(lines)


def compare(searches: list[Search], target: Path) -> list[str]:
    rows = []
    for search in searches:
        saved = compute_saved(search)
        best = search.ranked().iloc[0]
        rows.append(
            {
                "search": search.name,
                "metric": search.metric,
                "trials": saved["trials"],
                "best_score": best["best_score"],
                "best_val_acc": best["best_val_acc"],
                "best_backbone": best["backbone"],
                "trial_epochs": saved["trial_epochs_run"],
                "stopped_early": saved["stopped_early"],
                "trial_hours": saved["trial_hours"],
            }
        )
    table = name_scores(pd.DataFrame(rows), searches[0].metric)
    target.mkdir(parents=True, exist_ok=True)
    plot_comparison(searches, target / "comparison.png")
    (target / "comparison.md").write_text(
        "# Searches compared\n\n" + markdown_table(table) + "\n\n![best score against compute](comparison.png)\n"
    )
    return ["\n=== Compared", text_table(table), f"Written: {target / 'comparison.md'}, {target / 'comparison.png'}"]


def analyze_parser() -> argparse.ArgumentParser:
    parser = command_parser("python -m tune_inat.analyze", "Tables, plots and a report of one or more searches.")
    parser.add_argument(
        "folders",
        nargs="+",
        metavar="RESULTS_DIR",
        help="a search's results folder (local or a URI); several are compared, folders that hold no search skipped",
    )
    parser.add_argument(
        "--comparison-dir",
        type=Path,
        default=None,
        help="where the comparison of several searches goes (default: comparison/ beside the first folder)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="for results at a URI: where plots and report.md go (default ./analysis/<name>)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    def run(args: argparse.Namespace) -> int:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        print(analyze(args.folders, args.comparison_dir, args.output))
        return 0

    return run_command(analyze_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
