"""Shared test setup: offline settings, and small projects built in tmp directories."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

# Offline and quiet, before prefect / mlflow are imported by any test module.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
# Tests use the default store of their tmp project, never a server a developer happens to have set.
os.environ.pop("MLFLOW_TRACKING_URI", None)


def default_params() -> dict:
    """params.yaml of the repository, as a dict (read as the stages read it)."""
    from tasks.params import yaml_load

    return yaml_load((ROOT / "params.yaml").read_text())


def set_dotted(raw: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = raw
    for part in parents:
        node = node[part]
    node[leaf] = value


@pytest.fixture
def make_project(tmp_path: Path):
    """Write params.yaml (repository defaults + dotted overrides) into a tmp dir; return its path."""

    def make(overrides: dict | None = None, name: str = "project") -> Path:
        root = tmp_path / name
        root.mkdir(parents=True, exist_ok=True)
        raw = default_params()
        for key, value in (overrides or {}).items():
            set_dotted(raw, key, value)
        path = root / "params.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        return path

    return make


# Small enough for seconds on 2 CPU cores, big enough to learn something.
FAST = {
    "make_batches.epochs": 2,
    "make_batches.classes_per_batch": 4,
    "make_batches.images_per_class": 8,
    "train.width": 16,
    "train.embedding_dim": 16,
    "train.device": "cpu",
    "export_embeddings.device": "cpu",
    "ingest.workers": 1,
    "evaluate.registered_model": None,  # logging a model to MLflow costs seconds; tests/test_registry.py covers it
}


def copy_repo(dst: Path) -> Path:
    """The repository's tracked + untracked-not-ignored files, copied into ``dst`` (no outputs)."""
    import subprocess

    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True, capture_output=True
    ).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    return dst


def synthetic_items(path: Path, n_classes: int = 6, per_class: int = 12, size: int = 16, test_classes: int = 2, seed: int = 0) -> None:
    """An items table of separable synthetic images: each class is a fixed random pattern plus
    noise; the last ``test_classes`` classes form the test split (query = gallery)."""
    import numpy as np

    from tasks import contracts as C

    rng = np.random.default_rng(seed)
    protos = rng.integers(0, 256, size=(n_classes, size * size))
    rows = []
    for c in range(n_classes):
        for i in range(per_class):
            px = np.clip(protos[c] + rng.normal(0, 40, size * size), 0, 255).astype(np.uint8)
            split = C.TEST if c >= n_classes - test_classes else C.TRAIN
            rows.append((f"c{c}-{i}", f"class{c}", split, px))
    flat = np.stack([r[3] for r in rows])
    table = C.items_table([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], [f"synthetic/{r[0]}" for r in rows], flat)
    C.write_table(table, path, C.ITEMS, {"height": size, "width": size, "channels": 1, "params": {"synthetic": True}})


def run_stages(params, last: str = "evaluate") -> dict[str, dict]:
    """Run the stage functions in order, in this process, up to and including ``last``;
    returns each stage's result by name."""
    from tasks import build_index, evaluate, export_embeddings, ingest, make_batches, train

    results = {}
    for module in (ingest, make_batches, train, export_embeddings, build_index, evaluate):
        name = module.__name__.rsplit(".", 1)[-1]
        results[name] = module.run(getattr(params, name), params.paths)
        if name == last:
            break
    return results


@pytest.fixture
def gpus(monkeypatch):
    """Pretend this machine has ``n`` CUDA devices (0: no CUDA), whatever it has: ``gpus(n)``."""
    import torch

    def set_gpus(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    return set_gpus
