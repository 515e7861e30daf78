"""The thin ``main()`` every stage shares: load params.yaml, run the stage, turn known errors into
one clear line on stderr and a non-zero exit (no traceback for a user's mistake)."""

from __future__ import annotations

import argparse
import atexit
import json
import math
import os
import re
import signal
import sys
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import NoReturn

from tasks import project_lock
from tasks.errors import UserInputError
from tasks.params import DEVICE_PATTERN, Paths, load_params

# Errors that describe the user's input, not a bug: reported without a traceback.
USER_ERRORS: tuple[type[Exception], ...] = (UserInputError, FileNotFoundError)


def device_arg(value: str) -> str:
    """argparse type of a ``--device``: what a stage's ``device`` param accepts, and a GPU this
    machine has (the error then names ``--device``, not a params key)."""
    if not re.match(DEVICE_PATTERN, value):
        raise argparse.ArgumentTypeError(f"{value!r}: auto, cpu, cuda or cuda:N")
    from tasks.models import device_lack  # torch: only for the commands that take --device

    if why := device_lack(value):
        raise argparse.ArgumentTypeError(why)
    return value


def stage_main(name: str, run: Callable[..., dict], argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--job"]:  # one of the torchrun processes that tasks.distributed.launch started
        from tasks.distributed import run_job
        from tasks.params import Params

        run_job(argv[1], run, Params.model_fields[name].annotation, Paths)
        return
    parser = argparse.ArgumentParser(prog=f"python -m tasks.{name}", description=run.__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file")
    args = parser.parse_args(argv)
    stop_on_signals()
    try:
        params = load_params(args.params)
        section = getattr(params, name)
        paths: Paths = params.paths
        with _project_lock(Path(paths.root), name):
            result = run(section, paths)
    except USER_ERRORS as err:
        print(f"tripletflow {name}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt as err:  # Ctrl-C, SIGTERM or SIGHUP, once the stage has cleaned up (no half file)
        exit_interrupted(f"tripletflow {name}", err)
    print(json_line({name: result}))


def _project_lock(root: Path, name: str) -> AbstractContextManager:
    """The project's lock (tasks.project_lock) — held by rank 0 alone under a torchrun started by
    hand: its ranks are one run, and each taking the lock stopped all but the first."""
    if os.environ.get("RANK", "0") != "0" and "WORLD_SIZE" in os.environ:
        return nullcontext()
    return project_lock.hold(root, f"python -m tasks.{name}")


def stop_on_signals() -> None:
    """SIGTERM (``kill``, a job scheduler, a container stopping) and SIGHUP (the terminal closed)
    unwind like Ctrl-C: Python's default ends the process on the spot, leaving atomic writes'
    temporary files behind and MLflow runs RUNNING; as KeyboardInterrupt, every ``finally`` and
    ``with`` cleans up. An ignored SIGHUP (``nohup``) stays ignored: the run was meant to outlive
    its terminal."""
    def interrupt(signum: int, _frame: object) -> None:
        raise Terminated(signum)

    signal.signal(signal.SIGTERM, interrupt)
    if signal.getsignal(signal.SIGHUP) is signal.SIG_DFL:
        signal.signal(signal.SIGHUP, interrupt)


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised as Ctrl-C is (:func:`stop_on_signals`): the same clean-up, its
    own exit status (128 + ``signum``)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)  # the args pickle rebuilds it from
        self.signum = signum

    def __str__(self) -> str:
        return f"signal {self.signum}"


def exit_interrupted(prog: str, err: KeyboardInterrupt) -> NoReturn:
    """End a command that Ctrl-C, SIGTERM or SIGHUP stopped (after its clean-up) with one line, no
    traceback, and the status a shell reads as "stopped by that signal": 143 for SIGTERM, 129 for
    SIGHUP; for Ctrl-C, death by SIGINT itself. A shell loop (`for m in ...; do python -m
    flows.pipeline ...`) stops at Ctrl-C only when its child dies of SIGINT: an exit status of 130
    tells it the child handled Ctrl-C, and the loop went on to the next run."""
    try:
        print(f"{prog}: interrupted", file=sys.stderr)
    except OSError:  # SIGHUP: the terminal may be gone
        pass
    if isinstance(err, Terminated):
        raise SystemExit(128 + err.signum) from None
    # What Python does for an uncaught KeyboardInterrupt, without its traceback, in its order:
    # threading's exit hooks (Prefect drains its log and event workers there) and the wait for
    # other threads, then the exit functions (Prefect's server shutdown is one), then death by
    # SIGINT. Exit functions first stopped the server under the log worker's last batch ("Error
    # logging to API"). (Re-raising with a silent sys.excepthook would do it all too, but once
    # torchvision is imported Python exits 1.)
    sys.stdout.flush()
    sys.stderr.flush()
    threading._shutdown()
    atexit._run_exitfuncs()
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)
    raise SystemExit(128 + signal.SIGINT)  # where SIGINT cannot end a process (not on POSIX)


def parent_death_signal(signum: int, parent: int) -> Callable[[], None] | None:
    """A call that has Linux send ``signum`` to the calling process when its parent dies
    (PR_SET_PDEATHSIG), or None elsewhere. ``parent``: the pid its parent must have. A parent gone
    before the call would never signal: the process then exits at once. prctl is looked up here,
    so the call also serves as a ``preexec_fn``, run in the child between fork and exec."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def call() -> None:
        prctl(1, signum)  # 1 = PR_SET_PDEATHSIG
        if os.getppid() != parent:
            os._exit(1)

    return call


def json_line(obj: object) -> str:
    """``obj`` as strict JSON: NaN and ±inf (an epoch that mined nothing has no mean distance)
    become null — ``json.dumps`` would write NaN, which no JSON parser but Python's reads."""
    def finite(x: object) -> object:
        if isinstance(x, float):
            return x if math.isfinite(x) else None
        if isinstance(x, dict):
            return {k: finite(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [finite(v) for v in x]
        return x

    return json.dumps(finite(obj), default=str, allow_nan=False)
