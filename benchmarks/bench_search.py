"""What early stopping and the searcher buy: ASHA against FIFO, Optuna TPE against random, same seed.

Four real searches (`python -m tune_inat.search`) of one space and one experiment seed: trial-epochs
used (the compute), best val_acc reached, wall time. Random search samples the same trials under
ASHA and FIFO (same seed), so their difference is the epochs ASHA saved. On a GPU, with --inat,
the same four on an iNat-sized synthetic folder (10,000 JPEGs) with the default space at quick
scale (--num-samples and --max-epochs below; weights=none since the machine may be offline).

    python benchmarks/bench_search.py                        # CPU: the demo space on the demo data
    python benchmarks/bench_search.py --inat                 # GPU: default space, 10,000 images
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import inat_like_folder, run_search_cli, write_results  # noqa: E402

COMBINATIONS = (("optuna", "asha"), ("optuna", "fifo"), ("random", "asha"), ("random", "fifo"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inat", action="store_true", help="iNat-sized synthetic folder with the default space (GPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--num-samples", type=int, default=None, help="trials per search (default: the space's run_cap; 24 with --inat)"
    )
    parser.add_argument("--max-epochs", type=int, default=None, help="epoch cap (default: the space's; 6 with --inat)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-search-"))
    if args.inat:
        data = ["--data", str(inat_like_folder(Path(tempfile.gettempdir()) / "tune-inat-bench-jpegs-10000", 10_000))]
        space = [
            "--space",
            "default",
            "--set",
            "weights=none",
            "--num-samples",
            str(args.num_samples or 24),
            "--max-epochs",
            str(args.max_epochs or 6),
        ]
    else:
        data = ["--demo"]
        space = [
            "--space",
            "demo",
            *(["--num-samples", str(args.num_samples)] if args.num_samples else []),
            *(["--max-epochs", str(args.max_epochs)] if args.max_epochs else []),
        ]
    rows = []
    for searcher, scheduler in COMBINATIONS:
        start = time.perf_counter()
        folder = run_search_cli(
            [
                *data,
                *space,
                "--cache-dir",
                str(work / "cache"),
                "--searcher",
                searcher,
                "--scheduler",
                scheduler,
                "--seed",
                str(args.seed),
                "--name",
                f"{searcher}-{scheduler}",
            ],
            work / "results",
        )
        wall = time.perf_counter() - start
        trials = pd.read_parquet(folder / "trials.parquet")
        rows.append({
            "searcher": searcher, "scheduler": scheduler, "trials": len(trials),
            "trial_epochs": int(trials["epochs_run"].sum()),
            "stopped_early": int((trials["status"] == "stopped_early").sum()),
            "best_val_acc": float(trials["best_val_acc"].max()),
            "wall_seconds": wall,
        })  # fmt: skip
        print(rows[-1], flush=True)
    fifo_epochs = {row["searcher"]: row["trial_epochs"] for row in rows if row["scheduler"] == "fifo"}
    for row in rows:
        row["epochs_vs_fifo"] = row["trial_epochs"] / fifo_epochs[row["searcher"]]
    scale = "default space, 10,000 iNat-like JPEGs" if args.inat else "demo space on the demo data"
    notes = (
        f"{scale}, seed {args.seed}; wall time includes Ray start-up and the data cache (built by the first search, "
        f"reused after). trial_epochs is the compute a search spent; epochs_vs_fifo the share of FIFO's."
    )
    write_results("bench_search", rows, notes)


if __name__ == "__main__":
    main()
