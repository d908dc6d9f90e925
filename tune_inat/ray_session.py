"""The search's Ray: started locally (token authentication on, dashboard on 127.0.0.1) or joined, and kept quiet.

Ray's console lines stay out of the user's terminal or notebook cell; `--verbose` shows them.
"""

from __future__ import annotations

import logging
import os
import socket
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from tune_inat.errors import UserError

log = logging.getLogger(__name__)


def quiet_ray_environment(verbose: bool = False) -> None:
    """Ray's console: our status block instead of its boxes and tables (set before Ray is imported)."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the legacy output engine, which takes our reporter
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("TUNE_WARN_SLOW_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if not verbose:  # in a notebook without ipywidgets: Ray's advice to install it (at import), tqdm's warning
        logging.getLogger("ray.widgets.util").setLevel(logging.WARNING)
        warnings.filterwarnings("ignore", message="IProgress not found")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)


class OnlyCritical(logging.Filter):
    """Ray's console lines (its warnings, its tracebacks of what it retries or survives) hidden; --verbose shows them.

    What matters reaches the user through this program's own one-line messages and the results tables.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.CRITICAL


def quiet_ray_console(verbose: bool) -> None:
    import ray  # noqa: F401  (importing Ray installs its console handler)

    shared = set(logging.getLogger().handlers)  # ours and test harnesses' (pytest adds them to Ray's logger too)
    for handler in [h for h in logging.getLogger("ray").handlers if h not in shared]:
        for existing in [f for f in handler.filters if isinstance(f, OnlyCritical)]:
            handler.removeFilter(existing)
        if not verbose:
            handler.addFilter(OnlyCritical())


def require_token_auth() -> None:
    """The search's own local Ray refuses strangers: token authentication on, whatever the environment says.

    Ray 2.60 cannot bind a local cluster to loopback: its GCS, raylet and workers listen on every
    interface. Its token authentication is what refuses a client from elsewhere; with
    RAY_AUTH_MODE=disabled (as older guides set it) anyone who reaches the machine could run code in it.
    """
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None and mode.lower() != "token":
        log.warning(
            "RAY_AUTH_MODE=%s is not used for the search's own local Ray: Ray listens on every interface, so it "
            "runs with token authentication (join it on purpose with RAY_AUTH_MODE=token and the token in "
            "~/.ray/auth_token, or start a cluster of your own and pass --address)",
            mode,
        )
    from ray._private.authentication.authentication_token_setup import _enable_token_auth

    _enable_token_auth()  # Ray's own switch: RAY_AUTH_MODE=token for this process and Ray's, config reloaded


def connect_ray(address: str | None, dashboard: bool, worker_logs: bool, verbose: bool = False) -> None:
    """Start a local Ray (token authentication on, dashboard on 127.0.0.1), or join `address`; an unreachable
    cluster is one clear line."""
    import ray

    level = logging.INFO if verbose else logging.ERROR  # Ray's own warnings (token auth, ...) only when verbose
    if address is None:
        require_token_auth()
        ray.init(
            include_dashboard=dashboard, dashboard_host="127.0.0.1", logging_level=level, log_to_driver=worker_logs
        )
        return
    if address.startswith(("http://", "https://")):
        raise UserError(
            f"--address takes the cluster address HOST:PORT (GCS, port 6379 by default), not the "
            f"dashboard URL {address}; that one is for `ray job submit --address`"
        )
    if address != "auto" and not address.startswith("ray://"):
        host, _, port = address.rpartition(":")
        try:
            socket.create_connection((host or "127.0.0.1", int(port)), timeout=3).close()
        except (OSError, ValueError) as err:
            raise UserError(
                f"cannot reach a Ray cluster at {address} ({getattr(err, 'strerror', None) or err}); "
                f"start one with `ray start --head` or check the address"
            ) from None
    try:
        ray.init(address=address, logging_level=level, log_to_driver=worker_logs)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise UserError(f"cannot connect to the Ray cluster at {address}: {str(err).splitlines()[0]}") from None


# -- the command line ---------------------------------------------------------------------------------


@contextmanager
def ray_session(address: str | None, dashboard: bool, worker_logs: bool, verbose: bool = False) -> Iterator[bool]:
    """Ray for one search: join a Ray already started in this process when no address is given (a notebook's,
    a test session's), else connect (or start a local one) and shut it down at the end. Yields whether it joined."""
    import ray

    joined = address is None and ray_is_running()
    quiet_ray_console(verbose)
    if not joined:
        connect_ray(address, dashboard, worker_logs, verbose)
        quiet_ray_console(verbose)  # ray.init may have set up its handler anew
    try:
        yield joined
    finally:
        if not joined:
            ray.shutdown()


def ray_is_running() -> bool:
    """Whether this process already started or joined a Ray (a notebook's own, a test session's)."""
    import ray

    return ray.is_initialized()
