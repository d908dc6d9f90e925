"""How search strategies spend their budget: replaying recorded learning curves through Ray's real schedulers.

The data is a table of learning curves the product itself recorded (`record_curves.py`: every
configuration of a grid run to the full budget on real data). A replay trainable reports a
configuration's recorded curve epoch by epoch, with its recorded epoch times as simulated GPU
time (no sleeping), so Ray Tune's real schedulers and searchers (and ours: the pruning-aware
Optuna, PASHA) run over hundreds of trials and dozens of seeds in minutes, as Syne Tune's
simulator, HPOBench and YAHPO do. For each strategy and seed, after every reported epoch the
strategy's current pick (the trial with the best validation accuracy so far, as the product ranks)
is scored by its recorded full-budget accuracy (the mean over the recording's seeds): regret is the
best configuration's minus the pick's. Writes `results/bench_strategies.json`/`.md` and
`results/bench_strategies.png` (regret against compute, median and quartiles over seeds).

    python benchmarks/bench_strategies.py                        # digits curves, 20 seeds
    python benchmarks/bench_strategies.py --seeds 3 --strategies random+fifo tpe+asha   # quick look
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

HERE = Path(__file__).resolve().parent
SETTINGS = ("backbone", "freeze_fraction", "lr", "batch_size", "augment")
STRATEGIES = {
    "random+fifo": ("random", "fifo"),  # the seeds' W&B sweeps: random configurations, each to the end
    "random+asha": ("random", "asha"),
    "tpe+asha": ("optuna", "asha"),  # as shipped: early-stopped trials told to Optuna as pruned
    "tpe(stock)+asha": ("stock", "asha"),  # Ray's OptunaSearch: early-stopped trials told as complete
    "tpe+pasha": ("optuna", "pasha"),
    "tpe+asha+warm": ("optuna", "asha"),  # warm-started from an earlier search of 12 trials on the same data
    "one-epoch-top-k": (None, None),  # every sampled configuration 1 epoch, then the best k to the end
}


# -- the recorded curves --------------------------------------------------------------------------------


class Curves:
    """The recorded table: per configuration and recording seed, val_acc and seconds of each epoch."""

    def __init__(self, path: Path) -> None:
        table = pd.read_parquet(path)
        self.epochs = int(table["epoch"].max())
        self.seeds = sorted(int(s) for s in table["seed"].unique()) if "seed" in table else [0]
        self.values = {name: sorted(table[name].unique().tolist()) for name in SETTINGS if name in table}
        if "seed" not in table:
            table = table.assign(seed=0)
        self.curves: dict[tuple, dict[int, tuple[np.ndarray, np.ndarray]]] = {}
        for group, rows in table.groupby([*self.values, "seed"]):
            rows = rows.sort_values("epoch")
            if len(rows) == self.epochs:  # only curves recorded to the full budget
                key, seed = tuple(_plain(v) for v in group[:-1]), int(group[-1])
                self.curves.setdefault(key, {})[seed] = (rows["val_acc"].to_numpy(), rows["epoch_seconds"].to_numpy())
        self.final = {
            key: float(np.mean([acc[-1] for acc, _ in by_seed.values()])) for key, by_seed in self.curves.items()
        }
        self.best = max(self.final.values())

    def key(self, config: dict[str, Any]) -> tuple:
        return tuple(_plain(config[name]) for name in self.values)

    def regret(self, config: dict[str, Any]) -> float:
        return self.best - self.final[self.key(config)]


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def replay_trial(config: dict[str, Any], curves: Curves, recording_seed: int) -> None:
    """A Ray Tune function trainable that reports a recorded curve instead of training."""
    from ray import tune

    accuracies, seconds = curves.curves[curves.key(config)][recording_seed]
    spent = 0.0
    for epoch, (accuracy, epoch_seconds) in enumerate(zip(accuracies, seconds), start=1):
        spent += float(epoch_seconds)
        tune.report(
            {
                "epoch": epoch,
                "val_acc": float(accuracy),
                "max_epochs": curves.epochs,
                "sim_seconds": spent,
                "epoch_seconds": float(epoch_seconds),
            }
        )


# -- one replayed search -----------------------------------------------------------------------------------


def space_spec(
    curves: Curves,
    searcher: str,
    scheduler: str,
    samples: int,
    seed: int,
    options: dict,
    start_with: list[dict] | None = None,
) -> Any:
    """The product's SearchSpec of the recorded grid, with this strategy."""
    from tune_inat.space import parse_space

    raw = {
        "method": "bayes" if searcher in ("optuna", "stock") else "random",
        "metric": {"name": "val_acc", "goal": "maximize"},
        "parameters": {
            **{name: {"values": values} for name, values in curves.values.items()},
            "weights": {"value": "none"},
            "epochs": {"value": curves.epochs},
        },
        "tune_inat": {
            "num_samples": samples,
            "seed": seed,
            "scheduler": {"type": scheduler, **options.get(scheduler, {})} if scheduler != "fifo" else "fifo",
            "start_with": start_with or [],
        },
    }
    return parse_space(raw, "replay")


def run_search(
    strategy: str, curves: Curves, samples: int, seed: int, concurrency: int, workdir: Path, options: dict
) -> list[dict]:
    """One replayed search; its reports in the order Ray delivered them."""
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    from tune_inat.searchers import tpe_sampler
    from tune_inat.space import searched_tune_space
    from tune_inat.strategies import scheduler_entry, searcher_entry
    from tune_inat.tuner import param_space
    from tune_inat.warm import PriorTrial

    searcher_name, scheduler_name = STRATEGIES[strategy]
    prior: list[PriorTrial] = []
    if strategy.endswith("+warm"):  # an earlier search: 12 random configurations, on the other recording seed
        rng = np.random.default_rng(seed + 10_000)
        earlier = [list(curves.curves)[i] for i in rng.choice(len(curves.curves), 12, replace=False)]
        other = curves.seeds[(seed + 1) % len(curves.seeds)]
        prior = [
            PriorTrial(
                dict(zip(curves.values, key)), float(curves.curves[key][other][0].max()), "completed", curves.epochs
            )
            for key in earlier
        ]
    best_first = [p.params for p in sorted(prior, key=lambda p: -p.score)[:3]]  # as --warm-start runs them first
    spec = space_spec(curves, searcher_name, scheduler_name, samples, seed, options, best_first)
    space = searched_tune_space(spec)
    if searcher_name == "stock":
        searcher = OptunaSearch(
            space=OptunaSearch.convert_search_space(space), metric="val_acc", mode="max", sampler=tpe_sampler(spec)
        )
    else:
        searcher = searcher_entry(spec.searcher).build(spec, space, concurrency)
    if prior:
        searcher.learn_from(prior)
    reports: list[dict] = []

    class Collector(tune.Callback):
        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            reports.append(
                {
                    "trial": trial.trial_id,
                    "config": dict(trial.config),
                    "epoch": result["epoch"],
                    "val_acc": result["val_acc"],
                    "epoch_seconds": result["epoch_seconds"],
                }
            )

    trainable = tune.with_resources(
        tune.with_parameters(replay_trial, curves=curves, recording_seed=curves.seeds[seed % len(curves.seeds)]),
        {"cpu": 2 / concurrency},
    )
    tuner = tune.Tuner(
        trainable,
        param_space=param_space(spec),
        tune_config=tune.TuneConfig(
            metric="val_acc",
            mode="max",
            search_alg=searcher,
            scheduler=scheduler_entry(scheduler_name).build(spec),
            num_samples=samples,
            max_concurrent_trials=concurrency,
            reuse_actors=True,  # replayed trials start in a second; a fresh worker process per trial costs more
        ),
        run_config=tune.RunConfig(
            name=f"{strategy}-{seed}", storage_path=str(workdir), verbose=0, callbacks=[Collector()]
        ),
    )
    tuner.fit()
    return reports


def one_epoch_then_top_k(curves: Curves, samples: int, seed: int, k: int) -> list[dict]:
    """Egele et al. 2023, "Is one epoch all you need?": every sampled configuration 1 epoch, the best k to the end."""
    rng = np.random.default_rng(seed)
    keys = [
        list(curves.curves)[i] for i in rng.choice(len(curves.curves), min(samples, len(curves.curves)), replace=False)
    ]
    recording = curves.seeds[seed % len(curves.seeds)]
    reports = []
    for index, key in enumerate(keys):
        accuracies, seconds = curves.curves[key][recording]
        reports.append(
            {
                "trial": index,
                "config": dict(zip(curves.values, key)),
                "epoch": 1,
                "val_acc": accuracies[0],
                "epoch_seconds": seconds[0],
            }
        )
    top = sorted(range(len(keys)), key=lambda i: -reports[i]["val_acc"])[:k]
    for index in top:
        accuracies, seconds = curves.curves[keys[index]][recording]
        for epoch in range(2, curves.epochs + 1):
            reports.append(
                {
                    "trial": index,
                    "config": reports[index]["config"],
                    "epoch": epoch,
                    "val_acc": accuracies[epoch - 1],
                    "epoch_seconds": seconds[epoch - 1],
                }
            )
    return reports


# -- scoring ------------------------------------------------------------------------------------------------


def anytime(reports: list[dict], curves: Curves) -> pd.DataFrame:
    """After each report: compute spent (trial-epochs, simulated seconds) and the regret of the current pick."""
    best_of: dict[Any, tuple[float, dict]] = {}
    rows, spent = [], 0.0
    for count, report in enumerate(reports, start=1):
        spent += report["epoch_seconds"]
        current = best_of.get(report["trial"])
        if current is None or report["val_acc"] > current[0]:
            best_of[report["trial"]] = (report["val_acc"], report["config"])
        pick = max(best_of.values(), key=lambda item: item[0])[1]
        rows.append({"trial_epochs": count, "sim_seconds": spent, "regret": curves.regret(pick)})
    return pd.DataFrame(rows)


def summarise(runs: dict[str, list[pd.DataFrame]], budget: int) -> list[dict]:
    """Per strategy, over seeds: regret at the end, compute used, and compute until the pick is within one point."""
    rows = []
    for strategy, frames in runs.items():
        final = np.array([frame["regret"].iloc[-1] for frame in frames])
        used = np.array([frame["trial_epochs"].iloc[-1] for frame in frames])
        seconds = np.array([frame["sim_seconds"].iloc[-1] for frame in frames])
        within = np.array(
            [
                frame.loc[frame["regret"] <= 0.01, "trial_epochs"].min() if (frame["regret"] <= 0.01).any() else np.inf
                for frame in frames
            ]
        )
        rows.append(
            {
                "strategy": strategy,
                "seeds": len(frames),
                "final_regret_mean": 100 * final.mean(),
                "final_regret_median": 100 * np.median(final),
                "final_regret_p75": 100 * np.percentile(final, 75),
                "final_regret_max": 100 * final.max(),
                "trial_epochs_used": used.mean(),
                "vs_random_fifo": used.mean() / budget,
                "sim_gpu_seconds": seconds.mean(),
                "within_1pt_median_trial_epochs": float(np.median(within)),
                "within_1pt_median_vs_random_fifo": float(np.median(within)) / budget,
                "seeds_within_1pt": int(np.isfinite(within).sum()),
            }
        )
    return rows


def anytime_quantiles(frames: list[pd.DataFrame], compute: str, points: np.ndarray) -> np.ndarray:
    """Quartiles over seeds of the pick's regret once `compute` (trial_epochs or sim_seconds) reached each point.

    A search that ended keeps its final pick."""
    grid = np.full((len(frames), len(points)), np.nan)
    for row, frame in zip(grid, frames):
        last = np.searchsorted(frame[compute].to_numpy(), points, side="right") - 1  # compute only grows
        row[last >= 0] = frame["regret"].to_numpy()[last[last >= 0]]
    with warnings.catch_warnings():  # before a strategy's first report there is no pick yet: all-NaN columns
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanpercentile(grid, [25, 50, 75], axis=0)


def plot(runs: dict[str, list[pd.DataFrame]], path: Path, title: str) -> None:
    """Median and quartiles of the regret against compute, in trial-epochs and in simulated GPU-seconds; each line
    ends (a dot) where the strategy's median search ended."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5), sharey=True)
    for ax, compute, label in zip(
        axes, ("trial_epochs", "sim_seconds"), ("compute spent (trial-epochs)", "compute spent (simulated GPU-seconds)")
    ):
        longest = max(frame[compute].iloc[-1] for frames in runs.values() for frame in frames)
        points = np.linspace(0, longest, 100)
        for strategy, frames in runs.items():
            low, median, high = anytime_quantiles(frames, compute, points)
            shown = points <= np.median([frame[compute].iloc[-1] for frame in frames])
            (line,) = ax.plot(points[shown], 100 * median[shown], label=strategy, linewidth=2)
            ax.plot(points[shown][-1:], 100 * median[shown][-1:], "o", color=line.get_color())
            ax.fill_between(points[shown], 100 * low[shown], 100 * high[shown], color=line.get_color(), alpha=0.12)
        ax.axhline(1.0, color="black", linestyle=":", linewidth=1, label="1 point from the best")
        ax.set_xlabel(label)
        ax.set_yscale("symlog", linthresh=1.0)
        ax.set_ylim(bottom=-0.05)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("regret of the current pick (accuracy points)")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--curves", type=Path, default=HERE / "data" / "curves_digits.parquet")
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--samples", type=int, default=40, help="trials per search")
    parser.add_argument("--concurrency", type=int, default=4, help="trials at once, as on one GPU at 0.25 each")
    parser.add_argument("--k", type=int, default=4, help="one-epoch-top-k: configurations run to the end")
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    parser.add_argument("--output", default="bench_strategies", help="name of the results files")
    parser.add_argument("--results-dir", type=Path, default=HERE / "results", help="where they go")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_SLOW_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # the replayed trials need no per-trial JSON/CSV/TensorBoard files: the Collector callback keeps what is scored
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    import optuna
    import ray

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    logging.getLogger("ray").setLevel(logging.ERROR)
    curves = Curves(args.curves)
    budget = args.samples * curves.epochs  # random + FIFO: every trial to the end
    options = {"asha": {"grace_period": 1, "reduction_factor": 3}, "pasha": {"grace_period": 1, "reduction_factor": 3}}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    workdir = Path(tempfile.mkdtemp(prefix="bench-strategies-"))
    runs: dict[str, list[pd.DataFrame]] = {strategy: [] for strategy in args.strategies}
    start = time.perf_counter()
    try:
        for seed, strategy in itertools.product(range(args.seeds), args.strategies):
            if strategy == "one-epoch-top-k":
                reports = one_epoch_then_top_k(curves, args.samples, seed, args.k)
            else:
                reports = run_search(strategy, curves, args.samples, seed, args.concurrency, workdir, options)
            runs[strategy].append(anytime(reports, curves))
            print(
                f"seed {seed} {strategy}: {len(reports)} trial-epochs, regret "
                f"{100 * runs[strategy][-1]['regret'].iloc[-1]:.2f} points",
                flush=True,
            )
    finally:
        ray.shutdown()
    rows = summarise(runs, budget)
    name = args.curves.stem.removeprefix("curves_")
    args.results_dir.mkdir(parents=True, exist_ok=True)
    plot(
        runs,
        args.results_dir / f"{args.output}.png",
        f"{name}: {args.samples} trials of {len(curves.final)} recorded configurations, {args.seeds} seeds",
    )
    notes = (
        f"{args.curves.name}: {len(curves.final)} configurations x {len(curves.seeds)} recording seeds, "
        f"{curves.epochs} epochs; best final val_acc {100 * curves.best:.2f}%. {args.samples} trials per search, "
        f"{args.concurrency} at once, {args.seeds} seeds; regret in accuracy points of the pick's recorded "
        f"full-budget accuracy; random+fifo spends {budget} trial-epochs. Replayed in "
        f"{time.perf_counter() - start:.0f} s."
    )
    write_results(args.output, rows, notes, args.results_dir)
    return {"rows": rows, "budget": budget}


if __name__ == "__main__":
    main()
