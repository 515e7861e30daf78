"""dvc.yaml lists, for every stage, each tasks/ module the stage's code imports (transitively):
otherwise a code change would not re-run the stage and DVC would serve stale outputs."""

from __future__ import annotations

import ast

import pytest
import yaml

from conftest import ROOT

STAGES = ["ingest", "make_batches", "train", "export_embeddings", "build_index", "evaluate"]


def _imports(module: str) -> set[str]:
    """tasks.* modules imported by tasks/<module>.py at module level or inside functions."""
    tree = ast.parse((ROOT / "tasks" / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "tasks":
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tasks."):
            found.add(node.module.split(".")[1])
    # The command-line shell only parses arguments; progress only prints: neither changes an output.
    return found - {"cli", "progress"}


def _closure(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += list(_imports(m))
    return seen


@pytest.mark.parametrize("stage", STAGES)
def test_every_imported_module_is_a_dependency(stage):
    deps = set(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]["deps"])
    missing = sorted(f"tasks/{m}.py" for m in _closure(stage) if f"tasks/{m}.py" not in deps)
    assert not missing, f"dvc.yaml stage {stage} lacks deps {missing}"


def test_the_committed_lock_records_the_committed_code_and_params():
    """dvc.lock is the record of the run whose outputs (metrics.json, plots) are committed: every
    source file and params section it lists must be the committed one, else `dvc status` shows
    the pipeline out of date on a fresh clone and `dvc exp show` lists the code as changed."""
    import hashlib

    lock = yaml.safe_load((ROOT / "dvc.lock").read_text())["stages"]
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    stale = []
    for stage, entry in lock.items():
        for dep in entry["deps"]:
            path = ROOT / dep["path"]
            if dep["path"].startswith("tasks/") and hashlib.md5(path.read_bytes()).hexdigest() != dep["md5"]:
                stale.append(f"{stage}: {dep['path']}")
        for section, values in entry["params"]["params.yaml"].items():
            if params[section] != values:
                stale.append(f"{stage}: params {section}")
    assert not stale, f"dvc.lock is older than {stale}: run dvc repro and commit dvc.lock"
