"""One error type for problems the user can fix, and the wrapper that turns it into one line.

Every command-line entry point runs through `cli_main`, so bad input never shows a traceback
wall (unless `--debug` is given) and always exits with code 2.
"""

from __future__ import annotations

import sys
import traceback
from typing import Callable, Sequence

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """A problem with the user's input or environment, explained in one line."""


def cli_main(main: Callable[[Sequence[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """Run a CLI `main(argv)`: UserError -> `error: ...` on stderr and exit code 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        return main(args) or 0
    except UserError as err:
        if debug:
            traceback.print_exc()
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
