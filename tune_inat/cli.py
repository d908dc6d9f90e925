"""How every `python -m tune_inat.X` command is built: common flags, logging, errors, data flags, YAML.

`command_parser` gives each command the same `--debug`/`--quiet`/`--verbose` flags and help that
shows defaults; `run_command` parses, sets up logging once, runs, and turns a `UserError` into one
`error: ...` line with exit code 2 (`--debug` adds the traceback) and Ctrl-C into exit code 130.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from tune_inat.data.cache import default_cache_dir
from tune_inat.data.dataset import DataConfig
from tune_inat.data.demo import ensure_demo_data
from tune_inat.errors import EXIT_INTERRUPTED, EXIT_USER_ERROR, UserError

DEFAULT_VAL_FRACTION = 0.2
DEFAULT_TEST_FRACTION = 0.2


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default (unless it is None or False: "not given")."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "%(default)" in text or "default" in text:
            return text
        return super()._get_help_string(action)


def command_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """An argument parser with the flags every command shares."""
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)
    add_common_arguments(parser)
    return parser


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    output = parser.add_argument_group("output")
    output.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    output.add_argument("--quiet", action="store_true", help="only warnings, errors and the final result")
    output.add_argument("--verbose", action="store_true", help="also show the libraries' own messages (Ray, Optuna)")


class ConsoleHandler(logging.StreamHandler):
    """Our messages, as plain lines, to whatever `sys.stderr` is when they are written (tests swap it)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def setup_logging(debug: bool = False, quiet: bool = False) -> None:
    """One console handler on the root logger (replacing one set up before), at the level the flags ask."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, ConsoleHandler)]:
        root.removeHandler(handler)
    root.addHandler(ConsoleHandler())
    root.setLevel(logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO)


def run_command(
    parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], int | None], argv: Sequence[str] | None = None
) -> int:
    """Parse `argv`, set up logging, run; user errors are one line and exit 2, Ctrl-C exits 130."""
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    setup_logging(getattr(args, "debug", False), getattr(args, "quiet", False))
    try:
        return run(args) or 0
    except UserError as err:
        if getattr(args, "debug", False):
            traceback.print_exc()
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def add_data_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """--data/--demo, --cache-dir and the split flags; None means "not given" (a file may set it)."""
    data = parser.add_argument_group("data")
    source = data.add_mutually_exclusive_group(required=required)
    source.add_argument(
        "--data", type=Path, metavar="DIR", help="dataset root (train/<class>/ and val/<class>/, or <class>/ only)"
    )
    source.add_argument(
        "--demo", action="store_true", help="use the generated demo folder (made once, under the cache dir)"
    )
    data.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="where decoded images are cached (default: $TUNE_INAT_CACHE or ~/.cache/tune_inat)",
    )
    data.add_argument(
        "--val-fraction",
        type=float,
        default=None,
        help=f"share of train/ held out for validation (default {DEFAULT_VAL_FRACTION})",
    )
    data.add_argument(
        "--test-fraction",
        type=float,
        default=None,
        help=f"for a root without val/: share of each class held out as the test set (default {DEFAULT_TEST_FRACTION})",
    )
    data.add_argument("--split-seed", type=int, default=None, help="seed of the validation and test splits (default 0)")


def data_config_from_args(
    args: argparse.Namespace, val_fraction: float | None = None, split_seed: int | None = None
) -> DataConfig:
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


def read_yaml(path: Path, what: str = "file") -> Any:
    """Parse a YAML file; a missing, unreadable or damaged file, or a syntax error (with its line), is one UserError."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"{what} {path} is a folder, not a file") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file (damaged or binary), cannot be read as YAML") from None
    except OSError as err:
        raise UserError(f"cannot read {what} {path}: {err.strerror}") from err
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"{path}: YAML syntax error{where}: {problem}") from None


# -- the commands as Python functions (tune_inat.search(...), ...) ------------------------------------------


def make_callable(module_name: str, function: Callable[..., Any]) -> None:
    """Make a command's module callable as its API function: `tune_inat.search(...)` while `python -m
    tune_inat.search` stays the command (a package attribute that is a submodule cannot also be a function)."""

    class CommandModule(types.ModuleType):
        __call__ = staticmethod(function)

    sys.modules[module_name].__class__ = CommandModule


def command_flags(parser: argparse.ArgumentParser, options: dict[str, Any]) -> list[str]:
    """Keyword arguments -> the command's flags (None: not given); an unknown keyword is one UserError."""
    actions = {action.dest: action for action in parser._actions if action.option_strings}
    flags: list[str] = []
    for key, value in options.items():
        if value is None:
            continue
        action = actions.get(key)
        if action is None:
            known = ", ".join(sorted(k for k in actions if k != "help"))
            raise UserError(f"unknown option {key!r}; the options: {known}")
        long_flags = [option for option in action.option_strings if option.startswith("--")]
        flag = long_flags[0] if long_flags else action.option_strings[0]  # --reproducible, not --no-reproducible
        if isinstance(action, argparse.BooleanOptionalAction):
            flags.append(flag if value else f"--no-{flag[2:]}")
        elif action.nargs == 0:  # store_true: given or not
            flags += [flag] if value else []
        elif isinstance(action, argparse._AppendAction):  # --set NAME=VALUE, repeatable: a dict or a list of them
            items = value.items() if isinstance(value, dict) else (item.split("=", 1) for item in value)
            for name, setting in items:
                flags += [flag, f"{name}={setting if isinstance(setting, str) else json.dumps(setting)}"]
        else:
            flags += [flag, str(value)]
    return flags


def parse_flags(parser: argparse.ArgumentParser, flags: list[str]) -> argparse.Namespace:
    """The command's own parsing of `flags`; what it refuses is a UserError, not an exit."""

    def refuse(message: str) -> None:
        raise UserError(message)

    parser.error = refuse  # type: ignore[method-assign]
    return parser.parse_args(flags)
