"""Prefect's temporary API server for a flow run from the command line, out of Ctrl-C's reach.

Without an API URL, Prefect starts an ephemeral server as a child in our process group. A
terminal's Ctrl-C goes to the whole group: the server died with the flow, and the flow's report
of its own crash then failed — a ConnectError traceback instead of one "interrupted" line,
"Error logging to API" on stderr, and the flow run left Running in Prefect's database.

:func:`start_detached` starts that same server first, in a process group of its own. Ctrl-C then
reaches only the flow; the flow reports its crash, and Prefect's exit function stops the server.
On Linux the server also gets SIGTERM when this process dies without that exit function
(SIGKILL, the OOM killer), instead of being left running.
"""

from __future__ import annotations

import os
import signal
import subprocess
from types import SimpleNamespace
from typing import Any

from prefect.server.api import server as prefect_server
from prefect.settings import get_current_settings

from tasks.cli import parent_death_signal


class _DetachedServer(prefect_server.SubprocessASGIServer):
    """Prefect's ephemeral server, its uvicorn command unchanged, in a process group of its own.

    Prefect's clients ask for ``SubprocessASGIServer()``, a singleton per port (None: any port),
    stored on the base class: an instance of this subclass started first is the one they get."""

    def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
        # Prefect's method builds the command and calls subprocess.Popen. Its module's name
        # ``subprocess`` (not the shared module) stands for one adding only the process group and
        # the death signal, for this one call.
        def detached(*args: Any, **kwargs: Any) -> subprocess.Popen[Any]:
            death = parent_death_signal(signal.SIGTERM, os.getpid())  # run in the child
            return subprocess.Popen(*args, **kwargs, process_group=0, preexec_fn=death)

        shared = prefect_server.subprocess
        prefect_server.subprocess = SimpleNamespace(Popen=detached)
        try:
            return super()._run_uvicorn_command()
        finally:
            prefect_server.subprocess = shared


def start_detached() -> None:
    """Start Prefect's ephemeral API server in its own process group, where this process would
    start one (no ``PREFECT_API_URL``: a real server is left alone; ephemeral mode not turned
    off). Prefect stops it at exit."""
    settings = get_current_settings()
    if settings.api.url or not settings.server.ephemeral.enabled:
        return
    if None not in prefect_server.SubprocessASGIServer._instances:
        _DetachedServer().start()
