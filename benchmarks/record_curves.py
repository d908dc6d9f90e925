"""Record learning curves for the search-strategy replay: a full grid, every configuration to the end.

The product's own search (`python -m tune_inat.search`, FIFO, the grid searcher) runs every
configuration of a grid to its full budget on a real dataset; its `epochs.parquet` is the replay
benchmark's data (`bench_strategies.py`), written to `benchmarks/data/curves_<dataset>.parquet`.

- `digits`: scikit-learn's scanned handwritten digits (1,797 real 8x8 images, 10 classes), written
  as an image folder at 16 px: 2 backbones x freeze 0/0.5/0.8 x 5 learning rates x batch 64/128 x
  augmentation on/off = 120 configurations, 8 epochs, 1 seed: 120 trials (about an hour on 2 cores).
- `demo`: the demo folder at 48 px: 2 backbones x 3 freeze fractions x 4 learning rates x batch 32/64
  = 48 configurations, 6 epochs, 1 seed (about 10 minutes on 2 cores).

Resumable: run the same command again after an interruption and it continues the search.

    python benchmarks/record_curves.py digits
    python benchmarks/record_curves.py demo
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_space  # noqa: E402

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
WORK = HERE / ".recordings"  # ignored by git: the searches themselves, for --resume

GRIDS = {
    "digits": {
        "image_size": 16,
        "epochs": 8,
        "parameters": {
            "backbone": {"values": ["resnet18", "mobilenet_v3_small"]},
            "freeze_fraction": {"values": [0.0, 0.5, 0.8]},
            "lr": {"values": [3e-4, 1e-3, 3e-3, 1e-2, 3e-2]},
            "batch_size": {"values": [64, 128]},
            "augment": {"values": [True, False]},
            "seed": {"values": [0]},
        },
    },
    "demo": {
        "image_size": 48,
        "epochs": 6,
        "parameters": {
            "backbone": {"values": ["resnet18", "resnet34"]},
            "freeze_fraction": {"values": [0.0, 0.25, 0.5]},
            "lr": {"values": [2e-4, 6e-4, 1.5e-3, 3e-3]},
            "batch_size": {"values": [32, 64]},
        },
    },
}


def digits_folder(root: Path) -> Path:
    """scikit-learn's digits as `root/digit_<k>/<i>.png`, 8x8 gray scaled to 16x16 (the test set is held out)."""
    from sklearn.datasets import load_digits

    if (root / ".complete").exists():
        return root
    digits = load_digits()
    for index, (image, label) in enumerate(zip(digits.images, digits.target)):
        folder = root / f"digit_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = Image.fromarray((image / 16 * 255).astype(np.uint8)).resize((16, 16), Image.BILINEAR)
        pixels.save(folder / f"{index:04d}.png")
    (root / ".complete").write_text("ok")
    return root


def record(dataset: str) -> Path:
    grid = GRIDS[dataset]
    WORK.mkdir(exist_ok=True)
    fixed = {
        "weights": "none",
        "image_size": grid["image_size"],
        "epochs": grid["epochs"],
        "backbone_lr_scale": 1.0,
        "crop_scale_min": 0.5,
    }
    space = write_space(WORK / f"{dataset}_grid.yaml", {**fixed, **grid["parameters"]}, method="grid")
    data = ["--data", str(digits_folder(WORK / "digits"))] if dataset == "digits" else ["--demo"]
    command = [
        sys.executable,
        "-m",
        "tune_inat.search",
        *data,
        "--space",
        str(space),
        "--scheduler",
        "fifo",
        "--cpus-per-trial",
        "1",
        "--results",
        str(WORK),
        "--name",
        f"record-{dataset}",
        "--no-wandb",
        "--quiet",
        "--cache-dir",
        str(WORK / "cache"),
    ]
    folder = WORK / f"record-{dataset}"
    resume = ["--resume"] if (folder / "search.json").exists() else []
    completed = subprocess.run([*command, *resume])
    if completed.returncode != 0:
        raise SystemExit(f"the recording search stopped ({completed.returncode}); run the same command again to resume")
    return export(dataset, folder)


def export(dataset: str, folder: Path) -> Path:
    """The epochs table, the columns the replay needs, with the command that made it in its metadata."""
    epochs = pq.read_table(folder / "epochs.parquet").to_pandas()
    keep = [
        "trial_id",
        "backbone",
        "freeze_fraction",
        "lr",
        "batch_size",
        "augment",
        "seed",
        "image_size",
        "epoch",
        "val_acc",
        "val_loss",
        "train_loss",
        "epoch_seconds",
    ]
    table = pa.Table.from_pandas(epochs[keep].sort_values(["trial_id", "epoch"]), preserve_index=False)
    table = table.replace_schema_metadata(
        {"command": f"python benchmarks/record_curves.py {dataset}", "grid": str(GRIDS[dataset])}
    )
    DATA.mkdir(exist_ok=True)
    path = DATA / f"curves_{dataset}.parquet"
    pq.write_table(table, path)
    trials = epochs["trial_id"].nunique()
    print(f"{path}: {len(epochs)} epoch rows of {trials} trials")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", choices=list(GRIDS), help="which grid to record")
    record(parser.parse_args().dataset)


if __name__ == "__main__":
    main()
