"""Every peer engine for a few seeds on the recorded curves, scored as bench_strategies scores its rows.

Work in progress for the peer comparison (issue 27): a first run of 3 seeds on the digits curves, not
yet the 20-seed table in docs/search.md nor a test. The peers' libraries go in a folder of their own
(`PEERS_SITE`, see peers.py): pip install --no-deps --target "$PEERS_SITE" sweeps==0.3.0 syne-tune==0.14.2
autograd statsmodels (they pin numpy < 2; the venv's numpy, scipy and scikit-learn are used).

python benchmarks/bench_peers.py                 # digits curves, 3 seeds, all peers
python benchmarks/bench_peers.py --curves demo --seeds 1 --no-check --no-cost
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
warnings.filterwarnings("ignore")  # pydantic's v1-style config in sweeps, sklearn's GP convergence, ...

import peers  # noqa: E402
from bench_strategies import HERE, Curves, anytime, summarise  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--curves", default="digits", help="digits or demo")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--peers", nargs="+", default=list(peers.PEERS), choices=list(peers.PEERS))
    parser.add_argument("--no-check", action="store_true", help="skip re-running seed 0 to check determinism")
    parser.add_argument("--no-cost", action="store_true", help="skip suggestion_cost")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "bench_peers_draft.json")
    args = parser.parse_args()

    curves = Curves(HERE / "data" / f"curves_{args.curves}.parquet")
    budget = 40 * curves.epochs
    runs: dict[str, list] = {name: [] for name in args.peers}
    walls: dict[str, list[float]] = {name: [] for name in args.peers}
    cpus: dict[str, list[float]] = {name: [] for name in args.peers}
    engine: dict[str, list[float]] = {name: [] for name in args.peers}
    extra: dict[str, list[dict]] = {name: [] for name in args.peers}
    deterministic: dict[str, bool] = {}
    for name in args.peers:
        for seed in range(args.seeds):
            stats = peers.Stats()
            began, began_cpu = time.perf_counter(), time.process_time()
            reports = peers.PEERS[name](curves, samples=40, seed=seed, concurrency=4, stats=stats)
            walls[name].append(time.perf_counter() - began)
            cpus[name].append(time.process_time() - began_cpu)
            engine[name].append(stats.suggest_seconds + stats.report_seconds)
            extra[name].append(
                {"started": stats.started, "resumed": stats.resumed, "preempted": stats.preempted, **stats.extra}
            )
            runs[name].append(anytime(reports, curves))
            print(
                f"{name} seed {seed}: {len(reports)} trial-epochs, regret {100 * runs[name][-1]['regret'].iloc[-1]:.2f}"
                f" points, wall {walls[name][-1]:.1f} s (engine {engine[name][-1]:.1f} s, cpu {cpus[name][-1]:.1f} s)"
                f", started {stats.started}"
                f", resumed {stats.resumed}, preempted {stats.preempted} {stats.extra or ''}",
                flush=True,
            )
            if seed == 0 and not args.no_check:
                again = peers.PEERS[name](curves, samples=40, seed=0, concurrency=4)
                deterministic[name] = again == reports
    rows = summarise(runs, budget)
    print(
        f"\n{args.curves}: {len(curves.final)} configurations, {curves.epochs} epochs, 40 trials, 4 at once, "
        f"{args.seeds} seeds; regret in points; random+fifo spends {budget} trial-epochs\n"
    )
    header = (
        f"{'peer':24} {'regret mean':>11} {'median':>7} {'max':>6} {'trial-ep':>8} {'vs fifo':>7} "
        f"{'<=1pt med':>9} {'sim h':>6} {'wall s/seed':>11} {'max':>6} {'cpu s/seed':>10} {'same':>5}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        name = row["strategy"]
        print(
            f"{name:24} {row['final_regret_mean']:11.2f} {row['final_regret_median']:7.2f} "
            f"{row['final_regret_max']:6.2f} {row['trial_epochs_used']:8.1f} {row['vs_random_fifo']:7.2f} "
            f"{row['within_1pt_median_trial_epochs']:9.1f} {row['sim_gpu_seconds'] / 3600:6.2f} "
            f"{np.mean(walls[name]):11.1f} {np.max(walls[name]):6.1f} {np.mean(cpus[name]):10.1f} "
            f"{str(deterministic.get(name, '-')):>5}"
        )
        row.update(
            wall_seconds=walls[name],
            cpu_seconds=cpus[name],
            engine_seconds=engine[name],
            extra=extra[name],
            deterministic=deterministic.get(name),
        )
    costs = {}
    if not args.no_cost:
        print("\nsuggestion_cost (seconds per suggestion, mean of 3):")
        for name in ("wandb-bayes", "synetune-mobster", "optuna-tpe"):
            costs[name] = {n: peers.suggestion_cost(name, n_told=n) for n in (40, 200)}
            print(
                f"  {name:18} after 40 told {costs[name][40]:.3f} s, after 200 told {costs[name][200]:.3f} s",
                flush=True,
            )
    print("\nversions:", peers.versions())
    args.output.write_text(
        json.dumps(
            {"curves": args.curves, "seeds": args.seeds, "rows": rows, "costs": costs, "versions": peers.versions()},
            indent=1,
            default=float,
        )
    )


if __name__ == "__main__":
    main()
