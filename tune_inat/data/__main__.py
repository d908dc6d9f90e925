"""`python -m tune_inat.data make-demo DIR | download DIR | check DIR`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from tune_inat.data.cache import default_cache_dir
from tune_inat.data.dataset import DataConfig, prepare_train_val
from tune_inat.data.demo import make_demo
from tune_inat.data.download import NATURE_12K_URL, download_dataset
from tune_inat.errors import cli_main


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tune_inat.data", description="Dataset tools.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("make-demo", help="write the small generated iNat-style folder used by the demo and tests")
    demo.add_argument("dir", type=Path)
    demo.add_argument("--train-per-class", type=int, default=40)
    demo.add_argument("--test-per-class", type=int, default=10)
    demo.add_argument("--seed", type=int, default=0)
    download = sub.add_parser("download", help="fetch and unpack nature_12K.zip (resumable)")
    download.add_argument("dir", type=Path)
    download.add_argument("--url", default=NATURE_12K_URL)
    download.add_argument("--keep-zip", action="store_true", help="keep the zip after unpacking")
    check = sub.add_parser("check", help="validate a dataset folder and build its image cache; print a summary")
    check.add_argument("dir", type=Path)
    check.add_argument("--image-size", type=int, default=224)
    check.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)

    if args.command == "make-demo":
        root = make_demo(args.dir, args.train_per_class, args.test_per_class, args.seed)
        print(f"demo dataset written to {root} (train/ and val/, 10 classes)")
    elif args.command == "download":
        root = download_dataset(args.dir, args.url, keep_zip=args.keep_zip)
        print(f"dataset ready under {root}")
    else:
        cfg = DataConfig(root=args.dir, cache_dir=args.cache_dir or default_cache_dir())
        data = prepare_train_val(cfg, args.image_size)
        counts = np.bincount(data.labels[np.concatenate([data.train_rows, data.val_rows])], minlength=len(data.classes))
        print(f"{len(data.classes)} classes, {len(data.train_rows)} train + {len(data.val_rows)} validation images "
              f"({len(data.cache.skipped)} unreadable skipped); cache {data.cache.directory}")
        for name, count in zip(data.classes, counts):
            print(f"  {name}: {count}")
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(main))
