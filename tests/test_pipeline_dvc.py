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


def test_a_new_dataset_drop_reruns_ingest_and_an_old_tag_comes_back(tmp_path):
    """The README's recipe: `dvc add` a raw drop under paths.raw, tag, add a drop, and
    `git checkout v1 && dvc checkout` brings back the old raw data and ingested items."""
    import io

    import numpy as np
    import pyarrow.parquet as pq
    from PIL import Image

    root = copy_repo(tmp_path)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    dvc = [sys.executable, "-m", "dvc"]

    def drop(classes: range) -> None:
        for c in classes:
            (root / "data" / "raw" / "toy" / f"c{c}").mkdir(parents=True, exist_ok=True)
            for i in range(3):
                buf = io.BytesIO()
                Image.fromarray(np.full((6, 6), c * 30 + i, np.uint8)).save(buf, "PNG")
                (root / "data" / "raw" / "toy" / f"c{c}" / f"{i}.png").write_bytes(buf.getvalue())

    def commit(tag: str) -> None:
        _run(dvc + ["add", "-q", "data/raw/toy"], root)
        _run(git + ["add", "-A"], root)
        _run(git + ["commit", "-q", "-m", tag], root)

    def rows() -> int:
        return pq.read_metadata(root / "data" / "items.parquet").num_rows

    (root / "dvc.lock").unlink()  # a project that has run nothing yet
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["ingest"].update(source={"kind": "image_folder", "root": "data/raw/toy"}, image_size=8, workers=1)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(["git", "init", "-q"], root)
    drop(range(5))
    commit("v1 data")
    assert _ran(_run(dvc + ["repro", "ingest"], root)) == ["ingest"] and rows() == 15
    _run(git + ["add", "-A"], root)
    _run(git + ["commit", "-q", "-m", "v1"], root)
    _run(["git", "tag", "v1"], root)

    drop(range(5, 7))  # a new drop: two more classes
    commit("v2 data")
    assert "ingest" in _run(dvc + ["status"], root)  # the raw data changed: ingest is stale
    assert _ran(_run(dvc + ["repro", "ingest"], root)) == ["ingest"] and rows() == 21
    _run(git + ["add", "-A"], root)
    _run(git + ["commit", "-q", "-m", "v2"], root)

    _run(["git", "checkout", "-q", "v1"], root)
    # Only ingest has run here; a project that ran (or pulled) everything runs plain `dvc checkout`.
    _run(dvc + ["checkout", "data/raw/toy.dvc", "ingest"], root)
    assert len(list((root / "data" / "raw" / "toy").iterdir())) == 5 and rows() == 15
    assert _ran(_run(dvc + ["repro", "ingest"], root)) == []  # v1's data and items, as recorded
