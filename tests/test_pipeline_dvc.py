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
from tasks.params import yaml_load

pytestmark = pytest.mark.slow
FIRST: dict = {}  # metrics of the default run, for the untrained-baseline comparison
STAGES = ["ingest", "make_batches", "train", "export_embeddings", "build_index", "evaluate"]


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"} | (env or {})
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

    params = yaml_load((repo / "params.yaml").read_text())
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

    # Ingest's and make_batches' counts, the quarantine report: on the pipeline run (train logs them).
    assert latest.data.metrics["ingest.ingested"] == 1797 and latest.data.metrics["ingest.skipped"] == 0
    from tasks import contracts as C

    _, plan = C.read_table(repo / "data/batches.parquet", C.BATCHES)
    assert latest.data.metrics["make_batches.planned_batches"] == sum(plan["batches_per_epoch"]) > 0
    assert latest.data.metrics["make_batches.n_excluded_classes"] == 0
    assert {Path(a.path).name for a in client.list_artifacts(latest.info.run_id, "ingest")} == {"ingest_quarantine.parquet"}

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
    # The first repro only rewrote the pipeline's own files (dvc.lock, curves, metrics): clean.
    assert first["tripletflow.git_dirty"] == "false"
    assert first["tripletflow.params_sha256"] != tags["tripletflow.params_sha256"]  # the miner changed
    assert first["dvc.md5.items"] == tags["dvc.md5.items"]  # the data did not


def test_dvc_plots_show_renders_offline(repo: Path, tmp_path):
    """The page inlines vega (no CDN script), has the four charts, and — where Chromium is
    installed — draws them with no network."""
    import re
    import shutil

    out = tmp_path / "plots"
    _run([sys.executable, "-m", "dvc", "plots", "show", "-o", str(out)], repo)
    page = (out / "index.html").read_text()
    assert not re.search(r"<script[^>]*\bsrc=", page), "a script loaded from elsewhere: blank offline"
    assert "vega-embed" in page
    for title in ("training curve", "mining distances", "Recall@K", "MAP@R per class"):
        assert title in page
    chromium = shutil.which("chromium")
    if chromium:
        dom = subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
             "--virtual-time-budget=10000", "--dump-dom", (out / "index.html").as_uri()],
            capture_output=True, text=True, timeout=120,
        ).stdout
        assert dom.count("<canvas") == 4  # one per chart, drawn


def test_the_default_beats_the_same_pipeline_with_an_untrained_network(repo: Path):
    """Trained seeds 0 and 1 on average beat the untrained network on mAP@R. One seed is not
    enough: on 72 small steps seed 0's figure moves with float rounding alone (0.651–0.698
    measured: thread count, the objective's order of operations; seed 1's by 0.0004), against
    0.609 untrained; the two seeds' mean was 0.715 at 53782d4."""
    def repro_with(seed: int, epochs: int) -> dict:
        params = yaml_load((repo / "params.yaml").read_text())
        params["train"]["miner"]["type_of_triplets"] = "semihard"
        params["make_batches"]["epochs"], params["make_batches"]["seed"], params["train"]["seed"] = epochs, seed, seed
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        assert _ran(_run([sys.executable, "-m", "dvc", "repro"], repo)) == STAGES[1:]
        return json.loads((repo / "metrics.json").read_text())

    assert FIRST, "runs after test_dvc_repro_runs_all_then_nothing_then_only_downstream"
    epochs = yaml_load((repo / "params.yaml").read_text())["make_batches"]["epochs"]
    seed1 = repro_with(1, epochs)
    untrained = repro_with(0, 0)
    trained = {k: (FIRST[k] + seed1[k]) / 2 for k in ("map_at_r", "r_precision")}
    assert trained["map_at_r"] > untrained["map_at_r"] + 0.05
    # Not Recall@1: on digits an untrained CNN already finds a same-class nearest neighbour for
    # 99.8 % of queries; trained ones score 99.3–99.6 % (seeds 0–2) while mAP@R rises.
    assert trained["r_precision"] > untrained["r_precision"]

    # The registry: four evaluated models, four versions; the untrained one never becomes champion.
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    versions = sorted(client.search_model_versions("name = 'tripletflow'"), key=lambda v: int(v.version))
    assert [int(v.version) for v in versions] == [1, 2, 3, 4]
    champion = client.get_model_version_by_alias("tripletflow", "champion")
    assert int(champion.version) in (1, 2, 3)
    assert int(client.get_model_version_by_alias("tripletflow", "challenger").version) == 4
    assert float(champion.tags["map_at_r"]) > float(versions[3].tags["map_at_r"])


def test_queued_experiments_sweep_the_miner_and_keep_their_mlflow_runs(repo: Path):
    """`dvc exp run --queue` runs each experiment in a temporary copy of the repository; their
    metrics show in `dvc exp show` and their MLflow runs land in the repository's store."""
    import csv
    import io

    dvc = [sys.executable, "-m", "dvc"]
    for kind in ("easy", "all"):
        _run(dvc + ["exp", "run", "--queue", "-n", f"mine-{kind}", "-S", f"train.miner.type_of_triplets={kind}",
                    "-S", "make_batches.epochs=2"], repo)
    _run(dvc + ["exp", "run", "--run-all"], repo)
    rows = {r["Experiment"]: r for r in csv.DictReader(io.StringIO(_run(dvc + ["exp", "show", "--csv"], repo)))}
    for kind in ("easy", "all"):
        row = rows[f"mine-{kind}"]
        assert row["train.miner.type_of_triplets"] == kind
        assert 0 < float(row["map_at_r"]) <= 1

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tripletflow")
    tagged = client.search_runs([exp.experiment_id], "tags.`dvc.exp_name` LIKE 'mine-%'")
    by_name = {r.data.tags["dvc.exp_name"]: r for r in tagged}
    assert set(by_name) == {"mine-easy", "mine-all"}
    for kind, run in by_name.items():
        assert run.data.params["train.miner.type_of_triplets"] == kind.removeprefix("mine-")
        assert run.data.metrics["map_at_r"] == pytest.approx(float(rows[kind]["map_at_r"]), abs=1e-4)


def test_s3_remote_push_then_pull_into_an_empty_cache_and_repro_is_a_no_op(repo: Path, tmp_path):
    """A DVC remote on an S3-compatible server (moto's, on 127.0.0.1): push everything, delete the
    cache and the outputs, pull them back, and `dvc repro` finds nothing to do."""
    import shutil
    import signal
    import socket
    import time
    import urllib.request

    import boto3

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    aws = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(endpoint, timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                     region_name="us-east-1").create_bucket(Bucket="tripletflow")
        dvc = [sys.executable, "-m", "dvc"]
        _run(dvc + ["remote", "add", "--local", "s3", "s3://tripletflow/dvcstore"], repo)
        _run(dvc + ["remote", "modify", "--local", "s3", "endpointurl", endpoint], repo)
        assert _ran(_run(dvc + ["repro"], repo, aws)) == []
        _run(dvc + ["push", "-r", "s3"], repo, aws)

        # Every cached output of the pipeline (not the git-tracked raw-data folder, not the
        # cache: false metrics and curves, which git keeps).
        lock = yaml.safe_load((repo / "dvc.lock").read_text())
        outs = {o["path"] for stage in lock["stages"].values() for o in stage.get("outs", [])}
        in_git = set(_run(["git", "ls-files"], repo).split())
        outs = [o for o in outs if o not in in_git]  # git keeps the cache: false metrics and curves
        assert "data/items.parquet" in outs and "models/model.pt" in outs
        shutil.rmtree(repo / ".dvc" / "cache")
        for out in outs:
            path = repo / out
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        _run(dvc + ["pull", "-r", "s3"], repo, aws)
        assert (repo / "data" / "items.parquet").exists() and (repo / "models" / "model.pt").exists()
        assert _ran(_run(dvc + ["repro"], repo, aws)) == []
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(10)


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
    params = yaml_load((root / "params.yaml").read_text())
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
