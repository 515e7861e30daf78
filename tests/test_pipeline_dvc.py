"""End to end: `dvc repro` in a temporary git repository made from this one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import copy_repo

pytestmark = pytest.mark.slow
FIRST: dict = {}  # metrics of the default run, for the untrained-baseline comparison
STAGES = ["ingest", "make_batches", "train", "export_embeddings", "build_index", "evaluate"]


def _run(cmd: list[str], cwd: Path) -> str:
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def _ran(output: str) -> list[str]:
    return [s for s in STAGES if f"Running stage '{s}'" in output]


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = copy_repo(tmp_path_factory.mktemp("clone"))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    _run(["git", "init", "-q"], root)
    _run(git + ["add", "-A"], root)
    _run(git + ["commit", "-q", "-m", "snapshot"], root)
    return root


def test_dvc_repro_runs_all_then_nothing_then_only_downstream(repo: Path):
    dvc = [sys.executable, "-m", "dvc"]
    first = _run(dvc + ["repro"], repo)
    assert _ran(first) == STAGES
    metrics = json.loads((repo / "metrics.json").read_text())
    assert 0 < metrics["map_at_r"] <= 1 and metrics["n_queries"] > 0
    FIRST.update(metrics)

    assert _ran(_run(dvc + ["repro"], repo)) == []  # nothing changed: nothing runs

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["miner"]["type_of_triplets"] = "hard"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert _ran(_run(dvc + ["repro"], repo)) == STAGES[2:]

    shown = json.loads(_run(dvc + ["metrics", "show", "--json"], repo))
    assert "map_at_r" in json.dumps(shown)


def test_mlflow_has_one_parent_run_per_training_with_stage_children(repo: Path):
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tripletflow")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    parents = [r for r in runs if r.data.tags.get("tripletflow.kind") == "pipeline"]
    assert len(parents) == 2  # the first repro and the miner change
    latest = parents[-1]
    assert latest.info.status == "FINISHED"
    assert latest.data.params["train.miner.type_of_triplets"] == "hard"
    assert latest.data.params["ingest.source.kind"] == "digits"
    assert latest.data.params["make_batches.classes_per_batch"] == "7"
    assert latest.data.params["evaluate.map_at"] == "100"
    assert {"map_at_r", "recall_at_1", "train.loss"} <= set(latest.data.metrics)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == latest.info.run_id]
    assert sorted(r.data.tags["tripletflow.stage"] for r in children) == sorted(STAGES[2:])
    artifacts = {a.path for a in client.list_artifacts(latest.info.run_id)}
    assert {"model", "index", "evaluation", "plots"} <= artifacts
    evaluation = {Path(a.path).name for a in client.list_artifacts(latest.info.run_id, "evaluation")}
    assert {"metrics.json", "recall_at_k.csv", "recall_at_k.png", "retrieval_grid.png"} <= evaluation

    # Provenance: the commit, and the data as DVC knows it (dvc.lock's hash of each file).
    tags = latest.data.tags
    head = _run(["git", "rev-parse", "HEAD"], repo).strip()
    assert tags["mlflow.source.git.commit"] == head
    assert tags["tripletflow.git_dirty"] == "true"  # params.yaml was edited for the miner change
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    outs = {o["path"]: o["md5"] for stage in lock["stages"].values() for o in stage.get("outs", [])}
    assert tags["dvc.md5.items"] == outs["data/items.parquet"]
    assert tags["dvc.md5.batches"] == outs["data/batches.parquet"]
    first = parents[0].data.tags
    assert first["tripletflow.params_sha256"] != tags["tripletflow.params_sha256"]  # the miner changed
    assert first["dvc.md5.items"] == tags["dvc.md5.items"]  # the data did not


def test_the_default_beats_the_same_pipeline_with_an_untrained_network(repo: Path):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["miner"]["type_of_triplets"] = "semihard"
    params["make_batches"]["epochs"] = 0
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert _ran(_run([sys.executable, "-m", "dvc", "repro"], repo)) == STAGES[1:]
    untrained = json.loads((repo / "metrics.json").read_text())
    assert FIRST, "runs after test_dvc_repro_runs_all_then_nothing_then_only_downstream"
    assert FIRST["map_at_r"] > untrained["map_at_r"] + 0.05
    assert FIRST["recall_at_1"] >= untrained["recall_at_1"]

    # The registry: three evaluated models, three versions; the untrained one never becomes champion.
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    versions = sorted(client.search_model_versions("name = 'tripletflow'"), key=lambda v: int(v.version))
    assert [int(v.version) for v in versions] == [1, 2, 3]
    champion = client.get_model_version_by_alias("tripletflow", "champion")
    assert int(champion.version) in (1, 2)
    assert int(client.get_model_version_by_alias("tripletflow", "challenger").version) == 3
    assert float(champion.tags["map_at_r"]) > float(versions[2].tags["map_at_r"])
