import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tasks import tracking


def _paths(tmp_path):
    from tasks.params import parse_params
    from conftest import default_params

    return parse_params(default_params(), tmp_path).paths


def _index_params():
    """build_index params: the defaults with metric l2."""
    from tasks.params import BuildIndexParams
    from conftest import default_params

    return BuildIndexParams(**(default_params()["build_index"] | {"factory": "Flat", "metric": "l2"}))


def test_stage_runs_are_children_of_the_pipeline_run(tmp_path):
    parent_id = tracking.start_pipeline_run(tmp_path, "exp")
    stage_params = _index_params()
    with tracking.stage_run(_paths(tmp_path), "build_index", stage_params, parent_id) as (child, parent):
        child.params({"extra.sizes": [1, 2]})
        parent.metrics({"loss": 1.5}, step=0)
        parent.metrics({"loss": 0.5}, step=1)
    client = MlflowClient(tracking.tracking_uri(tmp_path))
    child_run = client.get_run(child.run_id)
    assert child_run.data.tags[tracking.PARENT_TAG] == parent_id
    assert child_run.info.status == "FINISHED"
    expected = {f"build_index.{k}": str(v) for k, v in stage_params.model_dump().items()}
    assert expected["build_index.metric"] == "l2"
    assert child_run.data.params == expected | {"extra.sizes": "[1, 2]"}
    assert client.get_run(parent_id).data.params == expected
    assert [m.value for m in client.get_metric_history(parent_id, "loss")] == [1.5, 0.5]
    assert "build_index.seconds" in client.get_run(parent_id).data.metrics
    # Artifacts sit beside the database, not under whatever directory the process ran from.
    exp = client.get_experiment_by_name("exp")
    assert exp.artifact_location == (tmp_path.resolve() / "mlruns").as_uri()


def test_a_failing_stage_marks_its_run_failed(tmp_path):
    paths = _paths(tmp_path)
    # The later stages find their parent run through paths.run_info, as under `dvc repro`.
    tracking.write_run_info(paths["run_info"], tracking.start_pipeline_run(tmp_path, "exp"), "exp")
    try:
        with tracking.stage_run(paths, "build_index", _index_params()) as (child, _):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    client = MlflowClient(tracking.tracking_uri(tmp_path))
    assert client.get_run(child.run_id).info.status == "FAILED"
    assert client.get_run(client.get_run(child.run_id).data.tags[tracking.PARENT_TAG]).info.status == "FAILED"


def test_a_stage_stopped_from_outside_marks_its_runs_killed_not_failed(tmp_path):
    """Ctrl-C, SIGTERM (KeyboardInterrupt in a stage) or a cancelled Prefect run (its
    TerminationSignal, a BaseException): KILLED, so MLflow's failures are failures."""
    from prefect.exceptions import TerminationSignal

    client = MlflowClient(tracking.tracking_uri(tmp_path))
    for stop in (KeyboardInterrupt(), TerminationSignal(15)):
        parent_id = tracking.start_pipeline_run(tmp_path, "exp")
        try:
            with tracking.stage_run(_paths(tmp_path), "build_index", _index_params(), parent_id) as (child, _):
                raise stop
        except BaseException:
            pass
        assert client.get_run(child.run_id).info.status == "KILLED"
        assert client.get_run(parent_id).info.status == "KILLED"


def test_a_changed_param_is_kept_as_a_tag(tmp_path):
    run_id = tracking.start_pipeline_run(tmp_path, "exp")
    t = tracking.Tracker(tmp_path, run_id)
    t.params({"a": 1})
    t.params({"a": 2, "b": 3})  # MLflow would raise on a changed value
    run = MlflowClient(tracking.tracking_uri(tmp_path)).get_run(run_id)
    assert run.data.params == {"a": "1", "b": "3"}
    assert run.data.tags["changed.a"] == "2" and "changed.b" not in run.data.tags



def test_a_param_logged_again_unchanged_gets_no_changed_tag(tmp_path):
    """Stages log the upstream params again on every run (train logs ingest's and make_batches'):
    a value that did not change is no change, and must not leave a ``changed.*`` tag behind."""
    run_id = tracking.start_pipeline_run(tmp_path, "exp")
    t = tracking.Tracker(tmp_path, run_id)
    values = {"a": 1, "sizes": [1, 2], "opt": {"name": "AdamW", "lr": 0.001}, "none": None}
    t.params(values)
    t.params(values)  # the same values, as a re-run stage logs them
    t.params({"a": 1, "b": 3})
    run = MlflowClient(tracking.tracking_uri(tmp_path)).get_run(run_id)
    assert run.data.params["a"] == "1" and run.data.params["b"] == "3"
    assert not [k for k in run.data.tags if k.startswith("changed.")], run.data.tags


def test_run_info_pointing_at_a_missing_run_starts_a_new_one(tmp_path):
    info = tmp_path / "run.json"
    info.write_text(json.dumps({"run_id": "0" * 32, "experiment": "exp"}))
    tracking.start_pipeline_run(tmp_path, "exp")  # the experiment exists, the run does not
    new_id = tracking.parent_from_run_info(tmp_path, info)
    run = MlflowClient(tracking.tracking_uri(tmp_path)).get_run(new_id)
    assert run.data.tags["tripletflow.original_run_id"] == "0" * 32
    # export, index and evaluate each ask: they all get the same stand-in run
    assert tracking.parent_from_run_info(tmp_path, info) == new_id


def test_tracking_uri_honours_the_environment(tmp_path, monkeypatch):
    assert tracking.tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.tracking_uri(tmp_path) == "http://127.0.0.1:5000"


def _postgres_bin(name: str) -> str | None:
    import glob
    import shutil

    return shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))[-1:]), None)


def test_pipeline_tracks_and_registers_on_a_real_postgresql(make_project, tmp_path, monkeypatch):
    """MLflow's backend store on PostgreSQL (the infra/ team setup): a whole pipeline's runs, and
    the registry's champion alias, through a server started here and stopped afterwards."""
    import os
    import shutil
    import socket
    import subprocess

    import pytest

    initdb, pg_ctl = _postgres_bin("initdb"), _postgres_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL is not installed here (no initdb/pg_ctl): apt-get install postgresql")
    import psycopg2

    from conftest import FAST, run_stages
    from tasks.params import load_params

    import tempfile

    # Not under tmp_path: pytest's directory is private to us, and the server runs as postgres.
    data = Path(tempfile.mkdtemp(prefix="tripletflow-pg-"))
    # initdb refuses to run as root: run the server as the postgres user when we are root.
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_user:
        shutil.chown(data, "postgres")
    subprocess.run([*as_user, initdb, "-D", str(data), "--auth=trust", "-U", "postgres"], check=True, capture_output=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run([*as_user, pg_ctl, "-D", str(data), "-w", "-l", str(data / "log"),
                    "-o", f"-p {port} -k {data} -h 127.0.0.1", "start"], check=True, capture_output=True)
    try:
        conn = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres")
        conn.autocommit = True
        conn.cursor().execute("CREATE DATABASE mlflow")
        conn.close()
        uri = f"postgresql://postgres@127.0.0.1:{port}/mlflow"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        monkeypatch.chdir(tmp_path)  # a database store without a server keeps artifacts under ./mlruns

        params = load_params(make_project(FAST | {"evaluate.registered_model": "embedder"}))
        done = run_stages(params)
        run_id, result = done["train"]["run_id"], done["evaluate"]

        assert not (tmp_path / "project" / "mlflow.db").exists()  # nothing went to SQLite
        client = MlflowClient(uri)
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert run.data.metrics["map_at_r"] == result["map_at_r"]
        assert run.data.tags["dvc.md5.items"]
        assert client.get_model_version_by_alias("embedder", "champion").run_id == run_id
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "fast", "stop"], capture_output=True)
        shutil.rmtree(data, ignore_errors=True)


class _Recorder:
    """A pipeline run that keeps what is logged to it."""

    def __init__(self) -> None:
        self.logged: dict[str, float] = {}
        self.artifacts: list[tuple[Path, str]] = []

    def metrics(self, values: dict[str, float]) -> None:
        self.logged |= values

    def artifact(self, path: Path, folder: str) -> None:
        self.artifacts.append((path, folder))


def test_upstream_counts_reach_the_pipeline_run_under_make_batches_own_names(tmp_path):
    summary = {"ingested": 40, "skipped": 2, "skipped_by_reason": {"corrupt": 2}, "source": "digits"}
    plan = {"classes_smaller_than_k": ["a", "b"], "excluded_classes": ["b"], "validation_classes": [],
            "batches_per_epoch": [3, 3, 4]}
    quarantine = tmp_path / "quarantine.parquet"
    quarantine.write_bytes(b"PAR1")
    for supervised in (True, False):
        parent = _Recorder()
        tracking.log_upstream(parent, summary, plan, quarantine, supervised)
        expected = {"ingest.ingested": 40, "ingest.skipped": 2, "ingest.skipped.corrupt": 2, "make_batches.n_small_classes": 2,
                    "make_batches.n_excluded_classes": 1, "make_batches.n_validation_classes": 0}
        # Self-supervised training draws its own batches: the plan's count is not what it trained on.
        assert parent.logged == expected | ({"make_batches.planned_batches": 10} if supervised else {})
        assert parent.artifacts == [(quarantine, "ingest")]
    with pytest.raises(KeyError, match="validation_classes"):  # a renamed key fails, not a silent 0
        tracking.log_upstream(_Recorder(), summary, {k: v for k, v in plan.items() if k != "validation_classes"}, quarantine, True)
