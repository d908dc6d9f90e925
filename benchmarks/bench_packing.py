"""Aggregate training images per second on one GPU with 1, 2, 4 and 8 trials sharing it (Ray fractional GPUs).

Each point is a real search (`python -m tune_inat.search`, FIFO, every setting fixed): k identical
trials of resnet50 at freeze 0.8, batch 32, each reserving 1/k of the GPU (and 1/k of the CPUs),
all running at once. Each trial caps its GPU memory at its share
(`torch.cuda.set_per_process_memory_fraction`), so one trial cannot starve the others. Per trial:
the median training images/s over the epochs after the first (warm-up) one, and its peak GPU
memory; aggregate = the sum over the k trials. Also the trials' start-up time (trial start to
first training step: model build, cache open, weights load).

    python benchmarks/bench_packing.py                       # GPU: 224 px, 1/2/4/8 trials
    python benchmarks/bench_packing.py --device cpu          # CPU here: 64 px, 1 and 2 trials on the 2 cores
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import inat_like_folder, run_search_cli, write_results, write_space  # noqa: E402


def packing_point(trials: int, args: argparse.Namespace, data: Path, work: Path) -> dict:
    gpu = args.device == "cuda"
    space = write_space(work / f"packing-{trials}.yaml", {
        "backbone": args.backbone, "weights": "none", "image_size": args.image_size, "freeze_fraction": args.freeze,
        "batch_size": args.batch, "lr": 1e-3, "epochs": args.epochs, "augment": True,
    })  # fmt: skip
    cpus = max(1.0, (os.cpu_count() or 2) / trials) if gpu else (os.cpu_count() or 2) / trials
    folder = run_search_cli(
        [
            "--data",
            str(data),
            "--cache-dir",
            str(work / "cache"),
            "--space",
            str(space),
            "--name",
            f"packing-{trials}",
            "--searcher",
            "random",
            "--scheduler",
            "fifo",
            "--num-samples",
            str(trials),
            "--max-concurrent-trials",
            str(trials),
            "--gpus-per-trial",
            str(1 / trials if gpu else 0),
            "--cpus-per-trial",
            f"{cpus:g}",
        ],
        work / "results",
    )
    epochs = pd.read_parquet(folder / "epochs.parquet")
    trials_table = pd.read_parquet(folder / "trials.parquet")
    steady = epochs[epochs["epoch"] > 1].groupby("trial_id")
    per_trial = steady["images_per_second"].median()
    memory = epochs.groupby("trial_id")["peak_gpu_memory_mb"].max()
    return {
        "trials_sharing": trials,
        "gpu_share": 1 / trials if gpu else 0.0,
        "aggregate_img_s": float(per_trial.sum()),
        "per_trial_img_s": float(per_trial.mean()),
        "peak_memory_mib_per_trial": float(memory.max()) if gpu else float("nan"),
        "startup_s_max": float(trials_table["startup_seconds"].max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--trials", type=int, nargs="+", default=None, help="trials sharing the device (GPU: 1 2 4 8; CPU: 1 2)"
    )
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--freeze", type=float, default=0.8)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=None, help="default 224 on a GPU, 64 on the CPU")
    parser.add_argument("--epochs", type=int, default=None, help="default 4 on a GPU, 3 on the CPU")
    parser.add_argument(
        "--images", type=int, default=None, help="JPEGs in the folder (default 3000 on a GPU, 400 on the CPU)"
    )
    args = parser.parse_args()
    gpu = args.device == "cuda"
    args.trials = args.trials or ([1, 2, 4, 8] if gpu else [1, 2])
    args.image_size = args.image_size or (224 if gpu else 64)
    args.epochs = args.epochs or (4 if gpu else 3)
    images = args.images or (3000 if gpu else 400)
    work = Path(tempfile.mkdtemp(prefix="bench-packing-"))
    data = inat_like_folder(Path(tempfile.gettempdir()) / f"tune-inat-bench-jpegs-{images}", images)
    rows = []
    for trials in args.trials:
        rows.append(packing_point(trials, args, data, work))
        print(rows[-1], flush=True)
    alone = rows[0]["aggregate_img_s"]
    for row in rows:
        row["vs_one_trial"] = row["aggregate_img_s"] / alone
    notes = (
        f"{args.backbone}, freeze {args.freeze}, batch {args.batch}, {args.image_size} px, {args.epochs} epochs, "
        f"{images} iNat-like JPEGs, random init (weights do not change speed), {args.device}. Each row is one real "
        f"search of identical trials running together; aggregate = sum of the trials' median images/s after epoch 1. "
        f"startup_s_max: the slowest trial's start to its first training step."
    )
    write_results("bench_packing", rows, notes)


if __name__ == "__main__":
    main()
