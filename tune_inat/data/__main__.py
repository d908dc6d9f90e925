"""`python -m tune_inat.data make-demo DIR | download DIR | check DIR`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tune_inat.cli import command_parser, run_command
from tune_inat.data.cache import default_cache_dir
from tune_inat.data.dataset import DataConfig, prepare_test, prepare_train_val
from tune_inat.data.demo import make_demo
from tune_inat.data.download import NATURE_12K_URL, download_dataset


def data_parser() -> argparse.ArgumentParser:
    parser = command_parser("python -m tune_inat.data", "Dataset tools: the demo folder, iNaturalist 12K, checks.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser("make-demo", help="write the small generated iNat-style folder used by the demo and tests")
    demo.add_argument("dir", type=Path, metavar="DIR", help="where to write it (train/ and val/ are created inside)")
    demo.add_argument("--train-per-class", type=int, default=40, help="training images per class (default 40)")
    demo.add_argument("--test-per-class", type=int, default=10, help="test images per class (default 10)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the generated images (default 0)")
    download = sub.add_parser("download", help="fetch and unpack nature_12K.zip (resumable)")
    download.add_argument("dir", type=Path, metavar="DIR", help="where to unpack it")
    download.add_argument("--url", default=NATURE_12K_URL, help="the zip to fetch (default: the iNaturalist 12K zip)")
    download.add_argument("--keep-zip", action="store_true", help="keep the zip after unpacking")
    check = sub.add_parser("check", help="validate a dataset folder and build its image cache; print a summary")
    check.add_argument("dir", type=Path, metavar="DIR", help="a dataset root (train/ and val/, or class folders)")
    check.add_argument("--image-size", type=int, default=224, help="resolution the cache is built for (default 224)")
    check.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="where decoded images are cached (default: $TUNE_INAT_CACHE or ~/.cache/tune_inat)",
    )
    return parser


def data_command(args: argparse.Namespace) -> int:
    if args.command == "make-demo":
        root = make_demo(args.dir, args.train_per_class, args.test_per_class, args.seed)
        print(
            f"demo dataset written to {root} (train/ and val/, 10 classes)\n"
            f"search it with: python -m tune_inat.search --data {root} --space demo"
        )
    elif args.command == "download":
        root = download_dataset(args.dir, args.url, keep_zip=args.keep_zip)
        print(f"dataset ready under {root}")
    else:
        cfg = DataConfig(root=args.dir, cache_dir=args.cache_dir or default_cache_dir())
        data = prepare_train_val(cfg, args.image_size)
        test = prepare_test(cfg, args.image_size)
        counts = np.bincount(data.labels[np.concatenate([data.train_rows, data.val_rows])], minlength=len(data.classes))
        test_counts = np.bincount(test.cache.labels[test.rows], minlength=len(test.classes))
        skipped = len(data.cache.skipped) + len(test.cache.skipped)
        print(
            f"{len(data.classes)} classes, {len(data.train_rows)} train + {len(data.val_rows)} validation + "
            f"{len(test.rows)} test images ({skipped} unreadable skipped); caches {data.cache.directory} "
            f"and {test.cache.directory}"
        )
        for name, count, held in zip(data.classes, counts, test_counts):
            print(f"  {name}: {count} train/validation, {held} test")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(data_parser(), data_command, argv)


if __name__ == "__main__":
    sys.exit(main())
