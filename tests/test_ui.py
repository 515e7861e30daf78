"""The MLflow UI, for real: a `mlflow server` on 127.0.0.1, the pipeline tracked through it, and
headless Chromium rendering the run's page (its name, and a screenshot of the metric charts)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import json
from pathlib import Path

import pytest

from conftest import FAST, run_stages
from tasks import tracking
from tasks.params import load_params

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Offline and quiet: no update checks, sync, QUIC or background fetches.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1400,1000", "--virtual-time-budget=20000"]


@pytest.fixture
def mlflow_server(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = tmp_path / "server"
    store.mkdir()
    cmd = [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
           "--artifacts-destination", str(store / "artifacts")]
    log = open(store / "log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env=os.environ | {"MLFLOW_DISABLE_TELEMETRY": "true"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if urllib.request.urlopen(url + "/health", timeout=2).status == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (store / "log").read_text()[-2000:]
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
        log.close()


def _chromium(args: list[str], tmp_path: Path) -> str:
    profile = tmp_path / f"chromium-{time.monotonic_ns()}"
    proc = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (.ci/run installs Debian's `chromium`)")
def test_the_run_page_renders_the_pipeline_run_and_its_metric_charts(mlflow_server, make_project, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    params = load_params(make_project(FAST | {"make_batches.epochs": 3}))
    p = params.paths
    done = run_stages(params)
    run_id, result = done["train"]["run_id"], done["evaluate"]

    # The server has the run and its metrics (REST API).
    with urllib.request.urlopen(f"{mlflow_server}/api/2.0/mlflow/runs/get?run_id={run_id}", timeout=30) as resp:
        run = json.loads(resp.read())["run"]
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    assert metrics["map_at_r"] == pytest.approx(result["map_at_r"])
    assert "train.loss" in metrics and run["info"]["status"] == "FINISHED"

    # The link the flow's artifact gives is the run's page, and the page renders the run.
    link = tracking.run_link(p.root, run_id)
    assert link == f"{mlflow_server}/#/experiments/{run['info']['experiment_id']}/runs/{run_id}"
    dom = _chromium(["--dump-dom", link], tmp_path)
    assert run["info"]["run_name"] in dom

    shot = Path(os.environ.get("TRIPLETFLOW_SCREENSHOT") or tmp_path / "run.png")
    _chromium([f"--screenshot={shot}", link + "/model-metrics"], tmp_path)
    from PIL import Image

    with Image.open(shot) as img:
        assert img.size == (1400, 1000)
        # A rendered page, not a blank one: many distinct colours (charts, text, widgets).
        assert len(img.convert("RGB").getcolors(maxcolors=1 << 16) or []) > 50
