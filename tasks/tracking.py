"""MLflow tracking: one parent run per pipeline run, one child run per stage execution.

The parent run is created by the Prefect flow (and handed to train) or, under ``dvc repro``, by the
train stage itself; train records its id in ``paths.run_info`` so the downstream stages (export,
index, evaluate) log into the same run whichever way the pipeline was started. Stage params and
timings go to the stage's child run; metrics and artifacts also go to the parent, which is what a
user opens in ``mlflow ui``.

We use ``MlflowClient`` with explicit run ids rather than the fluent API, whose active-run stack is
process-global state. Tracking URI: ``$MLFLOW_TRACKING_URI`` or ``sqlite:///<project>/mlflow.db``.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from tasks.contracts import write_json
from tasks.params import Paths, flatten, project_origin

PARENT_TAG = "mlflow.parentRunId"


def store_dir(root: Path) -> Path:
    """Where the default store (mlflow.db + mlruns/) lives: the project root — except in a DVC
    experiment that runs in a temporary copy of the repository (``dvc exp run --queue`` / ``--temp``),
    where it is the original repository (DVC names it in DVC_ROOT), so the experiment's runs are
    not deleted with the copy."""
    return project_origin(root)


def tracking_uri(root: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{store_dir(root) / 'mlflow.db'}"


class Tracker:
    """Logs to one MLflow run; thin, so stages do not import mlflow themselves."""

    def __init__(self, root: Path, run_id: str):
        from mlflow.tracking import MlflowClient

        self.root = Path(root)
        self.client = MlflowClient(tracking_uri(root))
        self.run_id = run_id

    def params(self, values: dict[str, Any]) -> None:
        """Log params. MLflow params are immutable, so a key already on the run with another value
        (``dvc repro`` re-running only evaluate with a new ``evaluate.map_at``) is recorded as the
        tag ``changed.<key>`` = new value; the stage's child run holds it as a param."""
        from mlflow.entities import Param

        have = self.client.get_run(self.run_id).data.params
        strings = {k: _param_str(v) for k, v in values.items()}
        new = [Param(k, v) for k, v in strings.items() if k not in have]
        for i in range(0, len(new), 100):  # MLflow's log_batch limit is 100 params
            self.client.log_batch(self.run_id, params=new[i : i + 100])
        self.tags({f"changed.{k}": v for k, v in strings.items() if k in have and have[k] != v})

    def metrics(self, values: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in values.items()]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[i : i + 1000])

    def artifact(self, path: Path, subdir: str | None = None) -> None:
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), subdir)
        else:
            self.client.log_artifact(self.run_id, str(path), subdir)

    def tags(self, values: dict[str, str]) -> None:
        for k, v in values.items():
            self.client.set_tag(self.run_id, k, v)


class NullTracker:
    """Logs nothing: what ranks other than 0 of a distributed training hold (rank 0 logs for all)."""

    run_id = None

    def params(self, values: dict[str, Any]) -> None:
        pass

    def metrics(self, values: dict[str, float], step: int = 0) -> None:
        pass

    def artifact(self, path: Path, subdir: str | None = None) -> None:
        pass

    def tags(self, values: dict[str, str]) -> None:
        pass


@contextmanager
def no_run() -> Iterator[tuple[NullTracker, NullTracker]]:
    """:func:`stage_run`'s stand-in where nothing may be logged."""
    yield NullTracker(), NullTracker()


def log_upstream(parent: Tracker | NullTracker, summary: dict, plan: dict, quarantine: Path, supervised: bool) -> None:
    """Ingest and make_batches run before the pipeline run has a stage run: their counts go to the
    pipeline run ``parent`` from train — ingest's (``ingest.*``, ``ingest.skipped.<why>``) from
    the items' ``summary``; make_batches' from the ``plan`` metadata, under the names of its own
    summary (``make_batches.n_small_classes``, ``.n_excluded_classes``, ``.n_validation_classes``)
    and ``make_batches.planned_batches`` (all epochs; only when ``supervised``: self-supervised
    training draws batches of its own) — and the quarantine report as an artifact."""
    counts = {f"ingest.{k}": v for k, v in summary.items() if isinstance(v, (int, float))}
    counts |= {f"ingest.skipped.{k}": v for k, v in summary.get("skipped_by_reason", {}).items()}
    lists = {"n_small_classes": "classes_smaller_than_k", "n_excluded_classes": "excluded_classes",
             "n_validation_classes": "validation_classes"}
    counts |= {f"make_batches.{name}": len(plan[key]) for name, key in lists.items()}
    if supervised:
        counts["make_batches.planned_batches"] = sum(plan["batches_per_epoch"])
    parent.metrics(counts)
    if quarantine.exists():
        parent.artifact(quarantine, "ingest")


def _param_str(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text[:6000]  # MLflow's param value limit


def _experiment_id(client, name: str, root: Path) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    # With the default SQLite store MLflow would put artifacts under the *cwd*'s ./mlruns; pin
    # them beside the database instead, so where you run from does not matter.
    location = None if os.environ.get("MLFLOW_TRACKING_URI") else (store_dir(root) / "mlruns").as_uri()
    return client.create_experiment(name, artifact_location=location)


def start_pipeline_run(root: Path, experiment: str, tags: dict[str, str] | None = None) -> str:
    """Create the parent run of one pipeline run; return its id."""
    from mlflow.tracking import MlflowClient

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # alembic/sqlalchemy chatter on a new SQLite store
        client = MlflowClient(tracking_uri(root))
        exp_id = _experiment_id(client, experiment, root)
    if os.environ.get("DVC_EXP_NAME"):  # which `dvc exp show` row this run is
        tags = {"dvc.exp_name": os.environ["DVC_EXP_NAME"], **(tags or {})}
    run = client.create_run(exp_id, tags={"tripletflow.kind": "pipeline", **(tags or {})})
    return run.info.run_id


def finish_pipeline_run(root: Path, run_id: str, status: str = "FINISHED") -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri(root)).set_terminated(run_id, status)


def mark_killed(root: Path, run_id: str) -> None:
    """End a run whose process was killed (a resumed training's earlier attempt) as KILLED, if it
    exists and was left RUNNING (one that ended FAILED keeps its status)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri(root))
    try:
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, "KILLED")
    except MlflowException:
        pass  # not in this store (e.g. a fresh mlflow.db): nothing to end


def provenance(root: Path, md5: dict[str, str], params: dict[str, Any], written: tuple[str, ...] = ()) -> dict[str, str]:
    """Tags that make a run reproducible: the git commit of the project (``mlflow.source.git.commit``,
    plus whether the tree had uncommitted changes), ``md5`` — each data file's MD5, the hash DVC keys
    its cache by, so ``dvc.md5.items`` names the exact dataset in the DVC cache/remote — and a
    SHA-256 of the flattened params that produced the model.

    ``written``: files the pipeline itself rewrites (paths relative to ``root``: metrics.json, the
    curves; and DVC's dvc.lock), which do not make the tree dirty — under ``dvc repro`` they have
    changed by the time train runs, and the tag was then always true."""
    import hashlib
    import subprocess

    tags: dict[str, str] = {}
    try:
        git = ["git", "-C", str(root)]
        commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30)
        if commit.returncode == 0:
            tags["mlflow.source.git.commit"] = commit.stdout.strip()
            keep = [".", *(f":(exclude){w}" for w in ("dvc.lock", *written))]  # pathspecs, relative to root
            dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no", "--", *keep],
                                   capture_output=True, text=True, timeout=30)
            tags["tripletflow.git_dirty"] = str(bool(dirty.stdout.strip())).lower()
    except (OSError, subprocess.TimeoutExpired):
        pass  # no git here: the data hashes and params still identify the run
    tags |= {f"dvc.md5.{name}": digest for name, digest in md5.items()}
    canonical = json.dumps(flatten(params), sort_keys=True, default=str)
    tags["tripletflow.params_sha256"] = hashlib.sha256(canonical.encode()).hexdigest()
    return tags


def run_link(root: Path, run_id: str) -> str:
    """Where a person finds the run: its UI page on a tracking server, or how to open a local store."""
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(root)
    exp_id = MlflowClient(uri).get_run(run_id).info.experiment_id
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/#/experiments/{exp_id}/runs/{run_id}"
    return f"run `{run_id}` (experiment {exp_id}) — open with `mlflow ui --backend-store-uri {uri}`"


def write_run_info(path: Path, run_id: str, experiment: str) -> None:
    write_json(path, {"run_id": run_id, "experiment": experiment})


def parent_from_run_info(root: Path, run_info: Path) -> str:
    """The parent run recorded by train; a new one if that run is not in this store
    (e.g. DVC restored train's outputs from cache into a fresh clone with an empty mlflow.db)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    info = json.loads(run_info.read_text())
    client = MlflowClient(tracking_uri(root))
    try:
        client.get_run(info["run_id"])
        return info["run_id"]
    except MlflowException:
        pass
    # Stand-in runs are tagged with the id they replace, so export, index and evaluate share one.
    exp = client.get_experiment_by_name(info["experiment"])
    if exp is not None:
        found = client.search_runs(
            [exp.experiment_id], f"tags.`tripletflow.original_run_id` = '{info['run_id']}'", max_results=1
        )
        if found:
            return found[0].info.run_id
    return start_pipeline_run(root, info["experiment"], {"tripletflow.original_run_id": info["run_id"]})


@contextmanager
def stage_run(
    paths: Paths, stage: str, params: BaseModel, parent_run_id: str | None = None
) -> Iterator[tuple[Tracker, Tracker]]:
    """A child run for one stage execution; yields (child, parent).

    The parent is ``parent_run_id`` or, for the stages after train, the run recorded in
    ``paths.run_info``. The stage's params (``<stage>.<key>``) go to both runs; the child ends
    FINISHED, or FAILED (KILLED when stopped from outside, :func:`ended_by`) — and then the
    parent too — if the stage raised; its duration is logged as a metric on both.
    """
    root = Path(paths.root)
    parent_run_id = parent_run_id or parent_from_run_info(root, paths["run_info"])
    parent = Tracker(root, parent_run_id)
    exp_id = parent.client.get_run(parent_run_id).info.experiment_id
    tags = {PARENT_TAG: parent_run_id, "tripletflow.stage": stage}
    child = Tracker(root, parent.client.create_run(exp_id, run_name=stage, tags=tags).info.run_id)
    flat = flatten(params, f"{stage}.")
    child.params(flat)
    parent.params(flat)
    start = time.perf_counter()
    status = "FAILED"
    try:
        yield child, parent
        status = "FINISHED"
    except BaseException as err:
        status = ended_by(err)
        raise
    finally:
        seconds = time.perf_counter() - start
        child.metrics({"stage_seconds": seconds})
        parent.metrics({f"{stage}.seconds": seconds})
        child.client.set_terminated(child.run_id, status)
        if status != "FINISHED":
            parent.client.set_terminated(parent.run_id, status)


def ended_by(err: BaseException) -> str:
    """The MLflow status of a run that ``err`` ended: KILLED when it was stopped from outside —
    Ctrl-C, SIGTERM or SIGHUP (KeyboardInterrupt), a cancelled Prefect run (its
    TerminationSignal), an exit: none of them is an ``Exception`` — and FAILED for an error, so
    failure counts in MLflow do not include cancellations."""
    return "FAILED" if isinstance(err, Exception) else "KILLED"
