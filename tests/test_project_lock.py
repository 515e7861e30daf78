"""Tests for tasks.project_lock: one pipeline run at a time in a project."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import FAST, ROOT
from tasks import project_lock
from tasks.project_lock import ProjectBusyError

HOLDER = "import sys, time; from pathlib import Path; from tasks import project_lock\n" \
         "with project_lock.hold(Path(sys.argv[1]), 'the holder'):\n    print('held', flush=True); time.sleep(600)"


def _holder(root: Path) -> subprocess.Popen:
    """Another process holding ``root``'s lock (as a running flow or stage would)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(root)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_is_refused_naming_the_first_and_a_killed_holder_leaves_no_stale_lock(tmp_path):
    proc = _holder(tmp_path)
    try:
        with pytest.raises(ProjectBusyError, match=rf"another tripletflow run .*\(pid {proc.pid}: the holder, since "):
            with project_lock.hold(tmp_path, "me"):
                pytest.fail("ran while another run held the lock")
    finally:
        proc.send_signal(signal.SIGKILL)  # no clean-up runs: the kernel drops the lock
        proc.wait()
    with project_lock.hold(tmp_path, "me"):
        assert "me" in (tmp_path / project_lock.LOCK_NAME).read_text()
    with project_lock.hold(tmp_path, "again"):  # released at the end of the block
        pass


def test_a_stage_and_the_flow_stop_at_once_while_another_run_holds_the_project(make_project):
    params_file = make_project(FAST)
    proc = _holder(params_file.parent)
    try:
        for cmd in ([sys.executable, "-m", "tasks.ingest", "--params", str(params_file)],
                    [sys.executable, "-m", "flows.pipeline", "--params", str(params_file)]):
            out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
            assert out.returncode != 0 and "Traceback" not in out.stderr  # one line, before Prefect starts
            assert f"another tripletflow run is using this project's outputs (pid {proc.pid}: the holder" in out.stderr
        # Nothing written: no items, and the flow stopped before it opened an MLflow run.
        assert sorted(p.name for p in params_file.parent.iterdir()) == [project_lock.LOCK_NAME, "params.yaml"]
    finally:
        proc.kill()
        proc.wait()


def _dvc(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, capture_output=True, text=True, timeout=300)


@pytest.fixture
def dvc_repo(tmp_path: Path) -> Path:
    """A DVC project (no git) with one stage whose output exists: ``out.txt``, from ``dep.txt``.
    Its command takes our lock as a stage does, to show that DVC's stage commands may."""
    assert _dvc(tmp_path, "init", "--no-scm").returncode == 0
    (tmp_path / "dep.txt").write_text("1")
    (tmp_path / "stage.py").write_text(
        f"import sys; sys.path.insert(0, {str(ROOT)!r})\nfrom pathlib import Path\nfrom tasks import project_lock\n"
        "with project_lock.hold(Path('.'), 'stage'):\n    Path('out.txt').write_text(Path('dep.txt').read_text())\n")
    (tmp_path / "dvc.yaml").write_text(
        f"stages:\n  copy:\n    cmd: {sys.executable} stage.py\n    deps: [dep.txt, stage.py]\n    outs: [out.txt]\n")
    out = _dvc(tmp_path, "repro")
    assert out.returncode == 0, out.stderr  # a stage command under dvc repro takes our lock, not DVC's
    assert (tmp_path / "out.txt").read_text() == "1"
    return tmp_path


def test_dvc_repro_stops_before_deleting_outputs_while_a_flow_holds_the_project(dvc_repo):
    """dvc repro removes a stage's outputs before its command could see our lock: the run that
    holds the project (a flow) holds DVC's lock too, so dvc repro touches nothing."""
    (dvc_repo / "dep.txt").write_text("2")  # the stage is out of date: repro would run it
    proc = _holder(dvc_repo)
    try:
        out = _dvc(dvc_repo, "repro")
        assert out.returncode != 0 and "Unable to acquire lock" in out.stderr, out.stderr
        assert (dvc_repo / "out.txt").read_text() == "1"  # the running flow's output is still there
    finally:
        proc.kill()
        proc.wait()
    assert _dvc(dvc_repo, "repro").returncode == 0  # the flow ended: DVC's lock is free
    assert (dvc_repo / "out.txt").read_text() == "2"


def test_a_flow_does_not_start_while_a_dvc_command_holds_the_project(dvc_repo):
    import zc.lockfile  # what DVC takes its repository lock with

    lock = zc.lockfile.LockFile(str(dvc_repo / ".dvc" / "tmp" / "lock"))
    try:
        with pytest.raises(ProjectBusyError, match="a DVC command is running in this project"):
            with project_lock.hold(dvc_repo, "flow"):
                pytest.fail("ran while DVC held its lock")
    finally:
        lock.close()
    with project_lock.hold(dvc_repo, "flow"):  # ours was released when DVC's was refused
        pass


def test_a_dvc_lock_held_for_a_moment_is_waited_for(dvc_repo):
    """DVC holds its lock briefly for every command (a git hook's dvc status): a flow starting
    then waits, as DVC itself does, instead of failing."""
    import threading

    import zc.lockfile

    lock = zc.lockfile.LockFile(str(dvc_repo / ".dvc" / "tmp" / "lock"))
    threading.Timer(1.0, lock.close).start()
    with project_lock.hold(dvc_repo, "flow"):
        pass


def test_a_flow_does_not_start_while_dvc_runs_a_stage_command_before_it_takes_our_lock(dvc_repo):
    """DVC releases its own lock while a stage's command runs; until the command takes ours, only
    DVC's rwlock file says a stage is running. A flow starting in that moment stops too."""
    (dvc_repo / "stage.py").write_text(  # a stage slow to take our lock (a big import, say)
        (dvc_repo / "stage.py").read_text().replace("from pathlib import Path\n", "from pathlib import Path\nimport time\n"
        "Path('started').write_text('1'); time.sleep(4)\n", 1))
    repro = subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=dvc_repo,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(240):
            if (dvc_repo / "started").exists() or repro.poll() is not None:
                break
            time.sleep(0.25)
        assert (dvc_repo / "started").exists(), repro.communicate()
        with pytest.raises(ProjectBusyError, match="DVC is running a stage in this project"):
            with project_lock.hold(dvc_repo, "flow"):
                pytest.fail("ran beside a stage that dvc repro had started")
    finally:
        out, err = repro.communicate(timeout=120)
    assert repro.returncode == 0, err  # and the stage itself was not disturbed
    with project_lock.hold(dvc_repo, "flow"):  # the stage ended: its rwlock entry no longer blocks
        pass


def test_stale_entries_in_dvcs_rwlock_do_not_block(dvc_repo):
    """A killed dvc repro leaves its entry; its pid may be gone, or reused by any process — one
    that is not DVC's, or this run's own parent (a worker after a container restart)."""
    import os

    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for pid in (int(done.stdout), other.pid, os.getppid()):
            (dvc_repo / ".dvc" / "tmp" / "rwlock").write_text(
                json.dumps({"write": {str(dvc_repo / "out.txt"): {"pid": pid, "cmd": "dvc repro"}}, "read": {}}))
            with project_lock.hold(dvc_repo, "flow"):
                pass
    finally:
        other.kill()
        other.wait()
