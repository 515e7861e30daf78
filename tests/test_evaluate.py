import json

import faiss
import numpy as np
import pytest

from tasks import build_index, evaluate, export_embeddings, make_batches, train
from tasks.evaluate import search_excluding_self
from tasks.params import load_params
from conftest import FAST, synthetic_items


def test_search_never_returns_the_query_itself():
    x = np.eye(4, dtype=np.float32)[[0, 0, 1, 2, 3]]  # items 0 and 1 are identical
    index = faiss.IndexFlatIP(4)
    index.add(x)
    ids = np.array(["a", "b", "c", "d", "e"], dtype=object)
    pos, scores = search_excluding_self(index, x[:2], ids[:2], ids, k=3)
    assert pos.shape == (2, 3)
    assert pos[0, 0] == 1 and pos[1, 0] == 0  # each finds its twin, never itself
    assert 0 not in pos[0] and 1 not in pos[1]
    assert scores[0, 0] == pytest.approx(1.0)


def test_search_pads_when_the_gallery_is_smaller_than_k():
    x = np.eye(3, dtype=np.float32)
    index = faiss.IndexFlatIP(3)
    index.add(x)
    ids = np.array(["a", "b", "c"], dtype=object)
    pos, scores = search_excluding_self(index, x[:1], ids[:1], ids, k=4)
    assert pos.shape == (1, 4) and (pos[0, 2:] == -1).all() and np.isnan(scores[0, 2:]).all()


def _trained(make_project, overrides: dict):
    """A tmp project with synthetic items, a batch plan and a trained model."""
    params = load_params(make_project(FAST | overrides))
    synthetic_items(params.paths["items"])
    make_batches.run(params.make_batches, params.paths)
    train.run(params.train, params.paths)
    return params


def _pipeline_after_train(params):
    export_embeddings.run(params.export_embeddings, params.paths)
    build_index.run(params.build_index, params.paths)
    return evaluate.run(params.evaluate, params.paths)


def test_evaluate_on_a_trained_model_writes_metrics_plots_and_pictures(make_project):
    params = _trained(make_project, {"make_batches.epochs": 4})  # 6 classes × 12, 2 for test
    result = _pipeline_after_train(params)

    written = json.loads(params.paths["metrics"].read_text())
    assert written == result
    assert written["n_queries"] == 24 and written["n_queries_without_relevant"] == 0
    for key in ("map_at_r", "r_precision", "map_at_100", "precision_at_1", "recall_at_1", "recall_at_5", "recall_at_10"):
        assert 0.0 <= written[key] <= 1.0
    # Separable classes: retrieval must be near perfect.
    assert written["precision_at_1"] > 0.9
    lines = params.paths["recall_curve"].read_text().splitlines()
    assert lines[0] == "k,recall" and len(lines) == 1 + 10
    recalls = [float(l.split(",")[1]) for l in lines[1:]]
    assert recalls == sorted(recalls)  # Recall@K never decreases with K
    for png in ("recall_at_k.png", "retrieval_grid.png"):
        assert (params.paths["figures"] / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_through_an_approximate_index(make_project):
    params = _trained(make_project, {"make_batches.epochs": 1, "build_index.factory": "HNSW8"})
    result = _pipeline_after_train(params)
    assert result["index_factory"] == "HNSW8" and result["n_queries"] == 24


def test_index_and_id_map_must_agree(make_project):
    from tasks.contracts import ContractError

    params = _trained(make_project, {"make_batches.epochs": 1})
    export_embeddings.run(params.export_embeddings, params.paths)
    build_index.run(params.build_index, params.paths)
    index = faiss.read_index(str(params.paths["index"]))
    index.add(np.zeros((1, index.d), np.float32))  # a stale index with one vector too many
    faiss.write_index(index, str(params.paths["index"]))
    with pytest.raises(ContractError, match="holds 25 vectors"):
        evaluate.run(params.evaluate, params.paths)


def test_an_index_from_another_model_is_refused(make_project):
    from tasks.contracts import ContractError

    params = _trained(make_project, {"make_batches.epochs": 1})
    export_embeddings.run(params.export_embeddings, params.paths)
    build_index.run(params.build_index, params.paths)
    # Retrain (another seed) and re-export, but do not rebuild the index.
    retrained = load_params(params.paths.root + "/params.yaml", {"train.seed": 1})
    train.run(retrained.train, retrained.paths)
    export_embeddings.run(retrained.export_embeddings, retrained.paths)
    with pytest.raises(ContractError, match="rebuild the index"):
        evaluate.run(params.evaluate, params.paths)
