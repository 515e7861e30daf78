"""One pipeline run at a time in a project: its stages read and write the same files.

Two runs in one project — a scheduled flow overlapping a manual one, a flow beside ``dvc repro``
— would overwrite each other's outputs between stages and log into each other's MLflow runs
(the downstream stages find their run through ``paths.run_info``, which the other run rewrote),
registering one run's model under the other's metrics. So a run holds an exclusive lock on
``<project>/.tripletflow.lock`` (``flock``: released by the kernel when the process ends, however
it ends — no stale lock after a SIGKILL) and a second run stops at once with an error naming
the first. A queued DVC experiment works in its own copy of the project, with its own lock.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tasks.errors import UserInputError

LOCK_NAME = ".tripletflow.lock"


class ProjectBusyError(UserInputError):
    """Another tripletflow run holds the project's lock."""


@contextmanager
def hold(root: Path, what: str) -> Iterator[None]:
    """Hold the project's lock while the block runs; ``what`` (this run, for the other's
    error message) is written into the lock file. Raises ProjectBusyError when it is held."""
    path = Path(root) / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "a process that did not say"
            raise ProjectBusyError(
                f"another tripletflow run is using this project's outputs ({holder}): wait for it to end, "
                f"or run in a copy (a queued DVC experiment: dvc exp run --queue). Lock: {path}"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}: {what}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race a third run)
