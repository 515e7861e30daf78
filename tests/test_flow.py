"""The Prefect flow, offline, under prefect_test_harness."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from prefect.testing.utilities import prefect_test_harness

from flows.pipeline import pipeline, report
from tasks import tracking
from tasks.params import ParamsError
from conftest import FAST, ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def harness():
    with prefect_test_harness(server_startup_timeout=90):
        yield


def test_flow_runs_every_stage_and_logs_one_mlflow_run(make_project):
    params_file = make_project(FAST)
    root = params_file.parent
    # A preset (relative to the params file's folder) on top of params.yaml; overrides on top of both.
    (root / "presets").mkdir()
    (root / "presets" / "small.yaml").write_text("evaluate:\n  grid_queries: 3\ntrain:\n  embedding_dim: 12\n")
    result = pipeline(params_file=str(params_file), overrides={"train.embedding_dim": 8}, preset="presets/small.yaml")
    assert 0 < result["metrics"]["map_at_r"] <= 1
    for out in ("data/items.parquet", "data/batches.parquet", "models/model.pt", "models/index.faiss", "metrics.json"):
        assert (root / out).exists(), out

    client = MlflowClient(tracking.tracking_uri(root))
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["prefect.flow_run_id"]
    # Every section of params.yaml, flattened; overrides win over the file.
    assert run.data.params["evaluate.grid_queries"] == "3" and run.data.params["train.embedding_dim"] == "8"
    assert run.data.tags["tripletflow.preset"] == "presets/small.yaml"
    assert run.data.params["make_batches.epochs"] == str(FAST["make_batches.epochs"])
    assert run.data.params["train.loss.name"] == "TripletMarginLoss"
    assert run.data.metrics["map_at_r"] == pytest.approx(result["metrics"]["map_at_r"])
    children = client.search_runs([run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")
    assert sorted(c.data.tags["tripletflow.stage"] for c in children) == ["build_index", "evaluate", "export_embeddings", "train"]

    # Progress reaches the run's log in Prefect (no terminal here: tqdm would print nothing).
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    with get_client(sync_client=True) as prefect:
        logs = prefect.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[UUID(run.data.tags["prefect.flow_run_id"])])))
    messages = [log.message for log in logs]
    assert any(m.startswith("train (cpu): 100% (") and "loss=" in m for m in messages), messages
    assert any(m.startswith("ingest: decode: 100% (") for m in messages), messages

    # The evaluate result is kept in Prefect's result storage, readable after the run.
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as prefect:
        task_runs = prefect.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[UUID(run.data.tags["prefect.flow_run_id"])])))
    evaluated = [t for t in task_runs if t.name.startswith("evaluate")]
    assert len(evaluated) == 1
    assert evaluated[0].state.result()["map_at_r"] == pytest.approx(result["metrics"]["map_at_r"])


def test_report_artifact_has_the_metrics_and_the_mlflow_run(make_project):
    root = make_project(FAST).parent
    run_id = tracking.start_pipeline_run(root, "tripletflow")
    text = report({"map_at_r": 0.51234, "n_queries": 7}, run_id, root)
    assert "| map_at_r | 0.5123 |" in text and "| n_queries | 7 |" in text
    assert run_id in text and "mlflow ui --backend-store-uri sqlite:///" in text


def test_invalid_override_fails_before_any_output(make_project):
    params_file = make_project(FAST)
    with pytest.raises(ParamsError, match="train.no_such_key"):
        pipeline(params_file=str(params_file), overrides={"train.no_such_key": 1})
    assert sorted(p.name for p in params_file.parent.iterdir()) == ["params.yaml"]


def test_params_this_machine_cannot_run_fail_the_flow_before_any_output(make_project):
    """A deployment's run (no CLI before it) checks them too (tasks.preflight): a missing weights
    file failed in train, after ingest and make_batches had rewritten their outputs."""
    params_file = make_project(FAST)
    with pytest.raises(ParamsError, match="train.pretrained: no weights file at /nonexistent/w.pth"):
        pipeline(params_file=str(params_file), overrides={"train.backbone": "resnet18", "train.pretrained": "/nonexistent/w.pth"})
    assert sorted(p.name for p in params_file.parent.iterdir()) == ["params.yaml"]


def test_few_shot_episodes_the_data_cannot_fill_fail_the_flow_before_training(make_project):
    """evaluate refuses them; the flow asks right after ingest (a flow run has no DVC cache: the
    training before that refusal was lost)."""
    from tasks.errors import DatasetError
    from tasks.params import load_params

    params_file = make_project(FAST | {"evaluate.few_shot.ways": [4]})  # the digits' test split has 3 classes
    with pytest.raises(DatasetError, match=r"^evaluate\.few_shot: the queries of .*items\.parquet: 4-way 1-shot .*only 3 of 3 "):
        pipeline(params_file=str(params_file))
    paths = load_params(params_file).paths
    assert paths["items"].exists() and not paths["batches"].exists() and not paths["model"].exists()


def test_a_flow_run_holds_the_project_for_its_whole_run(make_project):
    """A deployment's run (no CLI before it) meets another run's lock too: it stops before it
    opens an MLflow run — two runs in a project logged into each other's runs."""
    from tasks.project_lock import ProjectBusyError
    from test_project_lock import _holder

    params_file = make_project(FAST)
    proc = _holder(params_file.parent)
    try:
        with pytest.raises(ProjectBusyError, match=f"pid {proc.pid}: the holder"):
            pipeline(params_file=str(params_file))
    finally:
        proc.kill()
        proc.wait()
    assert not (params_file.parent / "mlflow.db").exists()


def _default_signals() -> None:
    for signum in (signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)


def _interrupted_in_train(params_file: Path, kill: Callable[[int], None], what: str) -> tuple[int, str]:
    """Run the flow CLI in its own session, ``kill(pid)`` once train has started; -> exit status
    and everything it printed after make_batches. Its process group is killed if its output is
    still open after 90 s. SIGINT and SIGHUP have their default actions in the child, as in a
    terminal: where these tests run with them ignored (a background job, nohup), the child would
    inherit SIG_IGN and ignore them."""
    proc = subprocess.Popen([sys.executable, "-m", "flows.pipeline", "--params", str(params_file)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=_default_signals)
    for line in proc.stdout:
        if "Task run 'make_batches" in line and "Completed" in line:
            break
    time.sleep(2)  # into train (its 200 epochs take minutes)
    kill(proc.pid)
    try:
        rest = proc.communicate(timeout=90)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the flow's group (its server, in its own, dies with it)
        proc.wait()
        pytest.fail(f"the flow, or a process holding its output, was still running 90 s after {what}")
    assert not params_file.parent.joinpath("models", "model.pt").exists(), rest  # interrupted in train
    return proc.returncode, rest


def test_ctrl_c_on_the_flow_cli_ends_it_promptly(make_project):
    """Ctrl-C reaches the whole process group, as a terminal sends it. Prefect's temporary API
    server is out of that group (flows.api_server): it was killed too, and the flow's report of
    the interrupt to the dead server took 2.5 minutes of retries, then a traceback."""
    params_file = make_project(FAST | {"make_batches.epochs": 200})
    code, rest = _interrupted_in_train(params_file, lambda pid: os.killpg(pid, signal.SIGINT), "Ctrl-C")
    assert code != 0 and "Task run 'train" in rest and "Crashed" in rest, rest
    # The flow itself was interrupted, and reported its crash to a server still up: Ctrl-C killed
    # Prefect's temporary server too, and the flow ended on its ConnectError's traceback.
    assert "tripletflow: interrupted" in rest and "Traceback" not in rest and "Error logging to API" not in rest, rest


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_to_the_flow_cli_ends_it_on_one_line(make_project, signum):
    """``kill PID`` (a job scheduler, a container stopping) mid-train, or SIGHUP (the terminal
    closed; Prefect has no handler for it): Prefect logs the crash; the command ends with one line
    and 128 + the signal, as a stage does — SIGTERM's was a 44-frame traceback."""
    params_file = make_project(FAST | {"make_batches.epochs": 200})
    code, rest = _interrupted_in_train(params_file, lambda pid: os.kill(pid, signum), signal.Signals(signum).name)
    assert code == 128 + signum and "Task run 'train" in rest and "Crashed" in rest, rest
    assert "tripletflow: interrupted" in rest and "Traceback" not in rest, rest


def _alive(pid: int) -> bool:
    """Running, not a zombie (a reparented child may wait for a reaper that never comes)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux's")
def test_the_temporary_api_server_ends_when_the_flow_is_killed(make_project):
    """SIGKILL (the OOM killer, ``kill -9``) runs no exit function to stop Prefect's temporary
    server, and Ctrl-C no longer reaches it (its own process group): the kernel's parent-death
    signal ends it, where it was left running."""
    params_file = make_project(FAST | {"make_batches.epochs": 200})
    servers: list[int] = []

    def kill(pid: int) -> None:
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            try:
                if b"uvicorn" in Path(f"/proc/{child}/cmdline").read_bytes():
                    servers.append(int(child))
            except FileNotFoundError:  # a short-lived child (MLflow's git calls) already gone
                pass
        os.kill(pid, signal.SIGKILL)

    try:
        code, _ = _interrupted_in_train(params_file, kill, "SIGKILL")
        assert code == -signal.SIGKILL and len(servers) == 1, servers
        deadline = time.monotonic() + 30
        while _alive(servers[0]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(servers[0]), "Prefect's temporary server outlived the flow"
    finally:
        for pid in servers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_cli_rejects_a_bad_value_naming_the_key(make_project):
    params_file = make_project(FAST)
    proc = subprocess.run(
        [sys.executable, "-m", "flows.pipeline", "--params", str(params_file), "--set", "make_batches.epochs=many"],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert proc.returncode != 0
    assert "make_batches.epochs" in proc.stderr
    assert sorted(p.name for p in params_file.parent.iterdir()) == ["params.yaml"]


@pytest.mark.parametrize("logger", ["prefect.task_runs", "prefect.flow_runs"])
def test_run_logs_keep_a_traceback_for_bugs_only(logger):
    """Prefect logs a failed run with its traceback: a user's error printed two (~60 lines) before
    the flow CLI's one line. Its line naming the error stays; a bug keeps its traceback, and so
    does a FileNotFoundError (in a deployment's log, maybe a bug's only trace)."""
    import logging

    import flows.pipeline  # noqa: F401  (installs the filter)
    from tasks.errors import DatasetError

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    log = logging.getLogger(logger)
    handlers, propagate = log.handlers, log.propagate
    log.handlers, log.propagate = [handler], False  # not Prefect's API handler: no flow run here
    try:
        for exc in (DatasetError("1 class"), FileNotFoundError("no items"), RuntimeError("a bug")):
            try:
                raise exc
            except Exception as err:
                log.error("Task run failed with exception: %r", err, exc_info=True)
    finally:
        log.handlers, log.propagate = handlers, propagate
    assert [r.getMessage() for r in records] == ["Task run failed with exception: DatasetError('1 class')",
                                                 "Task run failed with exception: FileNotFoundError('no items')",
                                                 "Task run failed with exception: RuntimeError('a bug')"]
    assert [r.exc_info is not None for r in records] == [False, True, True]  # a missing file may be a bug's


def test_only_transient_failures_are_retried():
    from prefect.states import Failed

    from flows.pipeline import is_transient
    from tasks.errors import DatasetError

    assert not is_transient(None, None, Failed(data=DatasetError("1 class")))
    assert is_transient(None, None, Failed(data=OSError("NFS hiccup")))


def test_set_values_are_read_as_params_yaml_reads_them():
    from flows.pipeline import parse_set

    got = parse_set(["train.optimizer.lr=3e-4", "evaluate.recall_at=[1, 5]", "train.backbone=resnet18", "train.miner=null"])
    assert got == {"train.optimizer.lr": 3e-4, "evaluate.recall_at": [1, 5], "train.backbone": "resnet18", "train.miner": None}


@pytest.mark.parametrize("module", ["flows.pipeline", "flows.serve"])
def test_a_set_value_that_is_not_yaml_is_one_line_naming_the_key(make_project, module):
    params_file = make_project(FAST)
    proc = subprocess.run([sys.executable, "-m", module, "--params", str(params_file), "--set", "evaluate.recall_at=[1,5"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "--set evaluate.recall_at: '[1,5' is not valid YAML" in proc.stderr


def test_presets_are_relative_to_the_params_file_and_may_be_several():
    from flows.pipeline import _preset_paths

    assert _preset_paths("/p/params.yaml", None) == []
    assert _preset_paths("/p/params.yaml", "params/omniglot.yaml") == [Path("/p/params/omniglot.yaml")]
    assert _preset_paths("/p/params.yaml", ["a.yaml", "/abs/b.yaml"]) == [Path("/p/a.yaml"), Path("/abs/b.yaml")]
