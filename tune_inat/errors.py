"""One error type for problems the user can fix, and the exit codes every command uses.

Every command runs through `cli.run_command`, so bad input never shows a traceback wall (unless
`--debug` is given) and always exits with code 2.
"""

from __future__ import annotations

EXIT_SEARCH_FAILED = 1  # the job ran but did not succeed: every trial failed, or results could not be written
EXIT_USER_ERROR = 2  # bad input, a damaged file, a name in use: one line says which
EXIT_INTERRUPTED = 130  # Ctrl-C or unfinished trials: the resume command is printed


class UserError(Exception):
    """A problem with the user's input or environment, explained in one line."""
