"""Tests for tasks.project_lock: one pipeline run at a time in a project."""

from __future__ import annotations

import signal
import subprocess
import sys
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
