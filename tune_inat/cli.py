"""Pieces every command line shares: the data flags, logging, reading YAML with clear errors."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import yaml

from tune_inat.data.cache import default_cache_dir
from tune_inat.data.dataset import DataConfig
from tune_inat.data.demo import ensure_demo_data
from tune_inat.errors import UserError

DEFAULT_VAL_FRACTION = 0.2
DEFAULT_TEST_FRACTION = 0.2


def add_data_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """--data/--demo, --cache-dir and the split flags; None means "not given" (a file may set it)."""
    source = parser.add_mutually_exclusive_group(required=required)
    source.add_argument("--data", type=Path, metavar="DIR", help="dataset root (train/<class>/ and val/<class>/, or <class>/ only)")
    source.add_argument("--demo", action="store_true", help="use the generated demo folder (made once, under the cache dir)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="where decoded images are cached (default: $TUNE_INAT_CACHE or ~/.cache/tune_inat)")
    parser.add_argument("--val-fraction", type=float, default=None, help=f"share of train/ held out for validation (default {DEFAULT_VAL_FRACTION})")
    parser.add_argument("--test-fraction", type=float, default=None, help=f"for a root without val/: share of each class held out as the test set (default {DEFAULT_TEST_FRACTION})")
    parser.add_argument("--split-seed", type=int, default=None, help="seed of the splits (default 0)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")


def data_config_from_args(args: argparse.Namespace, val_fraction: float | None = None, split_seed: int | None = None) -> DataConfig:
    """The DataConfig the flags describe; `val_fraction`/`split_seed` are fallbacks (e.g. from a space file)."""
    cache_dir = (args.cache_dir or default_cache_dir()).expanduser().absolute()
    val = args.val_fraction if args.val_fraction is not None else (val_fraction or DEFAULT_VAL_FRACTION)
    test = args.test_fraction if args.test_fraction is not None else DEFAULT_TEST_FRACTION
    for flag, value in (("--val-fraction", val), ("--test-fraction", test)):
        if not 0.0 < value < 1.0:
            raise UserError(f"{flag} must be between 0 and 1, got {value}")
    seed = args.split_seed if args.split_seed is not None else (split_seed or 0)
    root = ensure_demo_data(cache_dir) if args.demo else args.data.expanduser().absolute()
    return DataConfig(root=root, cache_dir=cache_dir, val_fraction=val, test_fraction=test, split_seed=seed)


def setup_logging(debug: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format="%(message)s", force=True)


def read_yaml(path: Path, what: str = "file") -> Any:
    """Parse a YAML file; a missing file or a syntax error (with its line) is one UserError line."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"{what} {path} is a folder, not a file") from None
    except OSError as err:
        raise UserError(f"cannot read {what} {path}: {err.strerror}") from err
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"{path}: YAML syntax error{where}: {problem}") from None
