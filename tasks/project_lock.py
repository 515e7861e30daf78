"""One pipeline run at a time in a project: its stages read and write the same files.

Two runs in one project — a scheduled flow overlapping a manual one, a flow beside ``dvc repro``
— would overwrite each other's outputs between stages and log into each other's MLflow runs
(the downstream stages find their run through ``paths.run_info``, which the other run rewrote),
registering one run's model under the other's metrics. So a run holds an exclusive lock on
``<project>/.tripletflow.lock`` (``flock``: released by the kernel when the process ends, however
it ends — no stale lock after a SIGKILL) and a second run stops at once with an error naming
the first. A queued DVC experiment works in its own copy of the project, with its own lock.

In a DVC project a run that DVC did not start (the flow, ``python -m tasks.<stage>``) also holds
DVC's repository lock, ``.dvc/tmp/lock``: ``dvc repro`` deletes a stage's outputs *before* it
starts the stage's command, so the stage finding our lock came too late — the flow had lost its
model and run file. With DVC's lock held, ``dvc repro`` stops before touching anything ("Unable to
acquire lock"). Stage commands that DVC runs (``DVC_STAGE`` set) leave it to DVC, which holds it
while it removes and records outputs and releases it while the command runs. In that gap DVC's
``.dvc/tmp/rwlock`` names the running stage's paths and process; a run that finds a live process
there stops too, or it could start in the moment before the stage's command takes our lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tasks.errors import UserInputError

LOCK_NAME = ".tripletflow.lock"
# DVC holds its lock for a moment for every command (a git hook's `dvc status`, an editor's
# `dvc exp show`) and waits up to 3 s for it itself: a run starting then waits as long.
DVC_WAIT_S = 3.0


class ProjectBusyError(UserInputError):
    """Another tripletflow run holds the project's lock."""


@contextmanager
def hold(root: Path, what: str) -> Iterator[None]:
    """Hold the project's lock (and DVC's, see above) while the block runs; ``what`` (this run,
    for the other's error message) is written into the lock file. Raises ProjectBusyError when
    either is held."""
    path = Path(root) / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    dvc_fd = None
    try:
        if not _try_flock(fd):
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "a process that did not say"
            raise ProjectBusyError(
                f"another tripletflow run is using this project's outputs ({holder}): wait for it to end, "
                f"or run in a copy (a queued DVC experiment: dvc exp run --queue). Lock: {path}"
            )
        dvc_lock = _dvc_lock(Path(root))
        if dvc_lock is not None:
            dvc_fd = os.open(dvc_lock, os.O_RDWR | os.O_CREAT, 0o644)
            if not _try_flock(dvc_fd, DVC_WAIT_S):
                raise ProjectBusyError(
                    f"a DVC command is running in this project (dvc repro, dvc exp run, ...: it holds {dvc_lock}): "
                    "wait for it to end, or run in a copy"
                )
            running = _dvc_stage_commands(dvc_lock.parent / "rwlock")
            if running:
                raise ProjectBusyError(
                    f"DVC is running a stage in this project ({running[0]}, per {dvc_lock.parent / 'rwlock'}): "
                    "wait for it to end, or run in a copy"
                )
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}: {what}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        yield
    finally:
        for held in (dvc_fd, fd):
            if held is not None:
                os.close(held)  # releases the lock; the file stays (removing it would race a third run)


def _try_flock(fd: int, wait_s: float = 0.0) -> bool:
    """Lock ``fd``, trying for up to ``wait_s`` seconds; whether it is ours."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.25)


def _dvc_lock(root: Path) -> Path | None:
    """DVC's repository lock file when ``root`` is a DVC project and this process is not a stage
    command DVC runs; None otherwise. DVC (zc.lockfile) takes it with flock, as we do."""
    if os.environ.get("DVC_STAGE") or not (root / ".dvc").is_dir():
        return None
    (root / ".dvc" / "tmp").mkdir(exist_ok=True)  # gitignored: absent in a fresh clone
    return root / ".dvc" / "tmp" / "lock"


def _dvc_stage_commands(rwlock: Path) -> list[str]:
    """The commands of live DVC processes in DVC's ``rwlock`` file (``{"write"|"read": {path: info
    or [info]}}``, info ``{"pid", "cmd"}``): a stage DVC is running. DVC edits the file only while
    holding its repository lock, which the caller holds, so it is read whole. Entries of dead
    processes (a killed ``dvc repro``) are ignored, as DVC itself does."""
    try:
        table = json.loads(rwlock.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return []  # none, or not ours to judge: DVC reports a corrupt file itself
    infos = [i for mode in ("write", "read") for v in (table.get(mode) or {}).values()
             for i in (v if isinstance(v, list) else [v])]
    mine = _ancestors()
    return [f"{i.get('cmd')}, pid {i['pid']}" for i in infos if isinstance(i, dict) and _dvc_process(i.get("pid"), mine)]


def _dvc_process(pid: object, mine: set[int]) -> bool:
    """``pid`` is a live DVC process, not one of ``mine`` (this one and its ancestors). A killed
    ``dvc repro`` leaves its pid in the file, and the number may since belong to anything (small
    pids come round again soon in a container): so the process must also be DVC's (``/proc``'s
    command line), or on a system without /proc, at least alive."""
    if not isinstance(pid, int) or pid <= 0 or pid in mine:
        return False
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # someone else's process: alive
        return True
    try:
        cmdline = (proc / str(pid) / "cmdline").read_bytes()
    except OSError:
        return False  # gone
    return any(Path(arg.decode(errors="replace")).name.startswith("dvc") for arg in cmdline.split(b"\0")[:3])


def _ancestors() -> set[int]:
    """This process and its parents (Linux /proc; only this one elsewhere)."""
    out, pid = {os.getpid()}, os.getppid()
    while pid > 1 and pid not in out:
        out.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            pid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
    return out
