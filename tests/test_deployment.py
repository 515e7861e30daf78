"""Scheduled deployments against a real ``prefect server`` on 127.0.0.1, started here and stopped by
its process group: infra/prefect.yaml through a process work pool and worker, and flows.serve."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import FAST, copy_repo

pytestmark = pytest.mark.slow
PREFECT = str(Path(sys.executable).with_name("prefect"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


class Api:
    def __init__(self, url: str):
        self.url = url

    def __call__(self, path: str, body: dict | None = None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method="GET" if body is None else "POST",
                                     headers={"Content-Type": "application/json"})
        # A 503 is the server's "try again" (its SQLite database was locked by one of its own
        # services, PrefectHQ/prefect#18934); Prefect's client retries it, and so does this helper.
        for attempt in range(5):
            try:
                with urllib.request.urlopen(req, timeout=30) as resp:
                    return json.loads(resp.read() or b"null")
            except urllib.error.HTTPError as err:
                if err.code != 503 or attempt == 4:
                    raise
                time.sleep(1 + attempt)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(environment for Prefect clients, REST helper) of a fresh server with its own database."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    log = open(home / "server.log", "w")
    proc = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    api = Api(env["PREFECT_API_URL"])
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if api("/health") is True:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("prefect server did not start: " + (home / "server.log").read_text()[-2000:])
            time.sleep(0.5)
        yield env, api
    finally:
        _stop(proc)
        log.close()


def _project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    root.mkdir()
    return copy_repo(root)


def _cli(args: list[str], env: dict, cwd: Path, timeout: int = 120) -> str:
    proc = subprocess.run([PREFECT, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


def test_prefect_yaml_deploys_a_nightly_schedule_that_a_process_worker_runs(server, tmp_path):
    env, api = server
    root = _project(tmp_path)
    _cli(["work-pool", "create", "tripletflow", "--type", "process", "--overwrite"], env, root)
    _cli(["--no-prompt", "deploy", "--prefect-file", "infra/prefect.yaml", "--all"], env | {"TRIPLETFLOW_ROOT": str(root)}, root)

    dep = api("/deployments/name/tripletflow/nightly-retrain")
    assert dep["work_pool_name"] == "tripletflow"
    assert [s["schedule"]["cron"] for s in dep["schedules"]] == ["0 3 * * *"]
    assert all(s["active"] for s in dep["schedules"])
    assert dep["parameters"] == {"params_file": "params.yaml", "overrides": {}}  # no default restated

    # A run triggered through the API, with overrides (a small, fast training), run by a worker.
    run = api(f"/deployments/{dep['id']}/create_flow_run", {"parameters": {"overrides": FAST}})
    _cli(["worker", "start", "--pool", "tripletflow", "--run-once"], env, tmp_path, timeout=600)
    state = api(f"/flow_runs/{run['id']}")["state"]
    assert state["type"] == "COMPLETED", state
    metrics = json.loads((root / "metrics.json").read_text())
    assert 0 < metrics["map_at_r"] <= 1

    artifacts = api("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run["id"]]}}})
    report = [a for a in artifacts if a["key"] == "tripletflow-metrics"]
    assert len(report) == 1 and report[0]["type"] == "markdown"
    assert f"| map_at_r | {metrics['map_at_r']:.4f} |" in report[0]["data"]
    assert "MLflow run" in report[0]["data"]


def test_serve_registers_a_scheduled_deployment_with_validated_overrides(server, tmp_path):
    env, api = server
    root = _project(tmp_path)
    bad = subprocess.run([sys.executable, "-m", "flows.serve", "--set", "train.no_such_key=1"],
                         cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "train.no_such_key" in bad.stderr

    cmd = [sys.executable, "-m", "flows.serve", "--name", "served", "--cron", "*/30 * * * *", "--set", "make_batches.epochs=1"]
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        dep = None
        while dep is None and time.monotonic() < deadline:
            try:
                dep = api("/deployments/name/tripletflow/served")
            except OSError:
                assert proc.poll() is None, "flows.serve exited"
                time.sleep(1)
        assert dep is not None, "the served deployment never appeared"
        assert [s["schedule"]["cron"] for s in dep["schedules"]] == ["*/30 * * * *"]
        assert dep["parameters"] == {"params_file": str(root / "params.yaml"), "overrides": {"make_batches.epochs": 1}}
    finally:
        _stop(proc)


def test_serve_does_not_take_over_the_work_pool_deployment_of_the_same_name(server, tmp_path):
    """Serving tripletflow/nightly-retrain would drop its work pool and pull steps (and pause it
    when serving stops): refused, naming the pool; the default name is another one."""
    env, api = server
    root = _project(tmp_path)
    _cli(["work-pool", "create", "tripletflow", "--type", "process", "--overwrite"], env, root)
    _cli(["--no-prompt", "deploy", "--prefect-file", "infra/prefect.yaml", "--all"], env | {"TRIPLETFLOW_ROOT": str(root)}, root)
    out = subprocess.run([sys.executable, "-m", "flows.serve", "--name", "nightly-retrain"],
                         cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "runs on work pool 'tripletflow'" in out.stderr, out.stderr[-2000:]
    dep = api("/deployments/name/tripletflow/nightly-retrain")
    assert dep["work_pool_name"] == "tripletflow" and dep["pull_steps"] and not dep["paused"]
