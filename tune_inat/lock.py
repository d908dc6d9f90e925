"""One search per name: a lock on the search's folder, held while the search runs.

The lock is an OS file lock (`filelock`, flock on a local disk and on NFSv4), so the kernel
releases it when the process ends however it ends (Ctrl-C, kill -9, a crash): a dead search never
leaves a stale lock. Beside it, a small JSON file says who holds it (pid, host, since when), so a
second search is refused with a line that names the running one. Object storage (s3://, gs://)
cannot be locked; the caller says so and goes on.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from types import TracebackType

from filelock import FileLock, Timeout

from tune_inat.errors import UserError

LOCK_FILE = ".search.lock"
OWNER_FILE = ".search.owner.json"


class SearchLock:
    """Held for the life of a search in `folder`; `acquire` refuses with one line if another holds it."""

    def __init__(self, folder: Path, name: str) -> None:
        self.folder = Path(folder)
        self.name = name
        self._lock = FileLock(str(self.folder / LOCK_FILE))

    def acquire(self) -> SearchLock:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._lock.acquire(timeout=0)
        except Timeout:
            raise UserError(
                f"search {self.name} is already running ({self._owner()}); wait for it to end, "
                f"or start another search with another --name"
            ) from None
        except OSError as err:
            raise UserError(f"cannot lock {self.folder} ({err.strerror}): is it writable?") from err
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        (self.folder / OWNER_FILE).write_text(json.dumps(owner))
        return self

    def release(self) -> None:
        if self._lock.is_locked:
            (self.folder / OWNER_FILE).unlink(missing_ok=True)
            self._lock.release()

    def _owner(self) -> str:
        try:
            owner = json.loads((self.folder / OWNER_FILE).read_text())
            return f"pid {owner['pid']} on host {owner['host']}, since {owner['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "by another process"

    def __enter__(self) -> SearchLock:
        return self.acquire()

    def __exit__(self, kind: type | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self.release()
