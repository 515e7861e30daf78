"""MLflow Model Registry: every evaluated model becomes a version; the best one is the `champion`.

Called by the evaluate stage (so ``dvc repro`` and the Prefect flow register alike), with
``evaluate.registered_model`` naming the registered model (null: do not register). The model is
logged in MLflow's PyTorch flavour — signature uint8 images (-1, C, H, W) -> float32 embeddings
(-1, D), an input example, and a pyfunc that maps images to embeddings
(``mlflow.pyfunc.load_model("models:/tripletflow@champion").predict(uint8 array)``); the faiss index
and id map are artifacts of the same run (build_index logs them).

Each model is registered once per evaluation set and score: evaluating the same weights again on
the same items with the same mAP@R (evaluate re-run by ``dvc repro`` for an evaluate change)
reports the version it already is; a version whose registration stopped before it got an alias
gets one then.

Promotion: a new version takes the alias ``champion`` only if its mAP@R beats the current
champion's *on the same evaluation set* (same query and gallery item ids); otherwise it is the
``challenger``. A champion measured on another set (a new data drop) is not comparable: the new
version becomes challenger and the reason says so — promote by hand after comparing.
"""

from __future__ import annotations

import hashlib
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow.compute as pc
import torch

from tasks import contracts as C
from tasks import tracking
from tasks.models import load_checkpoint
from tasks.params import Paths

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion
    from mlflow.tracking import MlflowClient

CHAMPION, CHALLENGER = "champion", "challenger"
METRIC = "map_at_r"


def evaluation_set_id(paths: Paths) -> str:
    """SHA-256 of the sorted query ids and the sorted gallery ids: which items were scored."""
    table, _ = C.read_table(paths["embeddings"], C.EMBEDDINGS, columns=[C.ITEM_ID, C.IS_QUERY, C.IS_GALLERY])
    h = hashlib.sha256()
    for flag in (C.IS_QUERY, C.IS_GALLERY):
        ids = sorted(table.filter(pc.equal(table[flag], True))[C.ITEM_ID].to_pylist())
        h.update(("\n".join(ids) + f"\n#{flag}\n").encode())
    return h.hexdigest()


def log_model(paths: Paths, run_id: str) -> str:
    """Log ``paths.model`` to the run as an MLflow PyTorch model under ``model/``; return its URI."""
    import mlflow.pytorch
    from mlflow.models import infer_signature
    from mlflow.tracking import MlflowClient

    model = load_checkpoint(paths["model"])
    cfg = model.config
    example = np.zeros((2, cfg["in_channels"], cfg["image_size"], cfg["image_size"]), np.uint8)
    with torch.no_grad():
        out = model(torch.from_numpy(example)).numpy()
    client = MlflowClient(tracking.tracking_uri(Path(paths.root)))
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mlflow's notes on pip requirements and example formats
        # Requirements given, not inferred: inference imports the model in a subprocess (seconds).
        mlflow.pytorch.save_model(
            model, Path(tmp) / "model", signature=infer_signature(example, out), input_example=example,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "tripletflow"],
        )
        client.log_artifacts(run_id, str(Path(tmp) / "model"), "model")
    return f"{client.get_run(run_id).info.artifact_uri}/model"


def register(paths: Paths, name: str, run_id: str, metrics: dict, digest: str | None = None) -> dict:
    """Log the model, create a version of ``name`` and give it ``champion`` or ``challenger``.
    ``digest``: ``paths.model``'s SHA-256 where the caller has already checked it (evaluate has:
    a second read of the model file would only repeat it)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking.tracking_uri(Path(paths.root)))
    eval_set = evaluation_set_id(paths)
    digest = digest or C.file_digest(paths["model"])
    score = float(metrics[METRIC])
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="tripletflow embedding models (image -> embedding)")
    known = registered_as(client, name, digest, eval_set, score)
    held = next((a for a in (CHAMPION, CHALLENGER) if known is not None and a in known.aliases), None)
    if held is not None:
        why = f"already registered: same weights, same evaluation set, same mAP@R {score:.4f}"
        print(f"registry: {name} v{known.version} ({held}) is this model, evaluated alike: not registered again")
        return {"registered_model": name, "model_version": int(known.version), "model_alias": held, "alias_reason": why}
    if known is not None:  # registered, but stopped before its alias was set (or it lost it): decide now
        version = known.version
    else:
        source = log_model(paths, run_id)
        version = client.create_model_version(
            name, source, run_id=run_id, tags={METRIC: repr(score), "evaluation_set": eval_set, "model_sha256": digest}
        ).version
    try:
        champ = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        champ = None
    if champ is None:
        alias, why = CHAMPION, "first registered version"
    elif champ.tags.get("evaluation_set") != eval_set:
        alias, why = CHALLENGER, (f"champion v{champ.version} was evaluated on another evaluation set: not comparable; "
                                  "another dataset wants its own evaluate.registered_model")
    elif score > float(champ.tags[METRIC]):
        alias, why = CHAMPION, f"mAP@R {score:.4f} beats champion v{champ.version}'s {float(champ.tags[METRIC]):.4f}"
    else:
        alias, why = CHALLENGER, f"mAP@R {score:.4f} does not beat champion v{champ.version}'s {float(champ.tags[METRIC]):.4f}"
    client.set_registered_model_alias(name, alias, version)
    print(f"registry: {name} v{version} is the {alias} ({why})")
    return {"registered_model": name, "model_version": int(version), "model_alias": alias, "alias_reason": why}


def registered_as(client: MlflowClient, name: str, digest: str, eval_set: str, score: float) -> ModelVersion | None:
    """The newest version of ``name`` with these weights (SHA-256 ``digest``), evaluation set and
    mAP@R; None if there is none.

    Evaluate runs again without train when only its own params or the figures changed (``dvc
    repro`` re-runs the stages downstream of a change): the model is the one already registered,
    and a second version of it would crowd the registry and could take ``champion`` from itself.
    Another mAP@R for the same weights (searched through another index) is another result: a new
    version, compared as any other."""
    same = [v for v in client.search_model_versions(f"name = '{name}' and tags.model_sha256 = '{digest}'")
            if v.tags.get("evaluation_set") == eval_set and v.tags.get(METRIC) == repr(score)]
    if not same:
        return None
    # search results carry no aliases (MLflow 3.17's SQL store): ask for the version itself
    return client.get_model_version(name, str(max(int(v.version) for v in same)))
