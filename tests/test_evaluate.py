import json

import faiss
import numpy as np
import pytest

from tasks import build_index, evaluate, export_embeddings, make_batches, train
from tasks import contracts as C
from tasks.params import load_params
from conftest import FAST, synthetic_items


def _trained(make_project, overrides: dict):
    """A tmp project with synthetic items, a batch plan and a trained model."""
    # 2 test classes: 2-way episodes (queries 4 of 12 items per class, so 1- and 5-shot fit).
    params = load_params(make_project(FAST | {"evaluate.few_shot.ways": [2], "evaluate.few_shot.queries": 4} | overrides))
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
    for key in ("map_at_r", "r_precision", "map_at_100", "precision_at_1", "recall_at_1", "recall_at_5", "recall_at_10",
                "few_shot_2way_1shot", "few_shot_2way_5shot"):
        assert 0.0 <= written[key] <= 1.0
    assert written["few_shot_2way_5shot"] > 0.7 and written["few_shot_2way_1shot_ci95"] >= 0
    # Separable classes: retrieval must be near perfect.
    assert written["precision_at_1"] > 0.9
    lines = params.paths["recall_curve"].read_text().splitlines()
    assert lines[0] == "k,recall" and len(lines) == 1 + 10
    recalls = [float(l.split(",")[1]) for l in lines[1:]]
    assert recalls == sorted(recalls)  # Recall@K never decreases with K
    report = json.loads(params.paths["index_report"].read_text())
    assert report["factory"] == "Flat" and report["index_recall_at_10"] == 1.0 and report["index_bytes"] > 0
    per_class = params.paths["per_class_ap"].read_text().splitlines()
    assert per_class[0] == "label,map_at_r,n_queries" and len(per_class) == 1 + 2
    assert sum(int(line.split(",")[2]) for line in per_class[1:]) == 24
    for png in ("recall_at_k.png", "retrieval_grid.png", "worst_queries.png", "per_class_ap.png", "projection.png"):
        assert (params.paths["figures"] / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Pictures turned off on a re-run (the flow's: DVC empties the folder itself) are gone, not stale.
    off = params.evaluate.model_copy(update={"grid_queries": 0, "worst_queries": 0, "projection_sample": 0})
    evaluate.run(off, params.paths)
    assert sorted(p.name for p in params.paths["figures"].iterdir()) == ["per_class_ap.png", "recall_at_k.png"]


def test_evaluate_through_an_approximate_index(make_project):
    params = _trained(make_project, {"make_batches.epochs": 1, "build_index.factory": "HNSW8"})
    result = _pipeline_after_train(params)
    assert result["index_factory"] == "HNSW8" and result["n_queries"] == 24
    assert result["search"] == "index"
    # Exact metrics beside the index's, for comparison; HNSW on 24 items finds the exact answer.
    for key in ("map_at_r", "r_precision", "map_at_100", "precision_at_1", "recall_at_1"):
        assert result[f"exact_{key}"] == pytest.approx(result[key])


def test_evaluate_scores_what_the_index_returns_not_exact_search(make_project):
    """IVF with 4 lists searched 1 at a time misses neighbours in other lists: the metrics are the
    index's own, below exact search's — and equal to scoring faiss's answers by hand."""
    params = _trained(make_project, {"make_batches.epochs": 0, "build_index.factory": "IVF4,Flat", "build_index.nprobe": 1,
                                     "evaluate.recall_at": [1, 10], "evaluate.map_at": 100})
    result = _pipeline_after_train(params)
    assert result["search"] == "index"
    assert result["recall_at_10"] < result["exact_recall_at_10"]
    # By hand: each query's 10 nearest through the saved index, itself left out.
    _, vectors, _ = C.read_embeddings(params.paths["embeddings"])
    labels = np.array(C.read_table(params.paths["index_ids"], C.INDEX_IDS)[0][C.LABEL].to_pylist())
    index = faiss.read_index(str(params.paths["index"]))
    _, found = index.search(vectors, 11)
    hits = [(labels[row[(row != i) & (row >= 0)][:10]] == labels[i]).any() for i, row in enumerate(found)]
    assert result["recall_at_10"] == pytest.approx(np.mean(hits))


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


def _embeddings_project(make_project, rows, factory="Flat", metric="inner_product", name="project", **extra):
    """A project whose embeddings table is ``rows`` = [(item_id, label, is_query, is_gallery, vector)]
    (no model, no items: the index is built and evaluated from it directly)."""
    import pyarrow as pa

    from tasks import contracts as C
    from tasks.tracking import write_run_info

    params = load_params(make_project({"evaluate.grid_queries": 0, "evaluate.worst_queries": 0, "evaluate.few_shot.ways": [],
                                       "evaluate.registered_model": None,  # no model to register
                                       "build_index.factory": factory, "build_index.metric": metric} | extra, name))
    vectors = np.stack([r[4] for r in rows]).astype(np.float32)
    dim = vectors.shape[1]
    table = pa.table(
        {
            C.ITEM_ID: [r[0] for r in rows], C.LABEL: [r[1] for r in rows], C.SPLIT: [C.TEST] * len(rows),
            C.IS_QUERY: [r[2] for r in rows], C.IS_GALLERY: [r[3] for r in rows],
            C.EMBEDDING: pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), dim),
        },
        schema=C.EMBEDDINGS.schema({C.EMBEDDING: pa.list_(pa.float32(), dim)}),
    )
    C.write_table(table, params.paths["embeddings"], C.EMBEDDINGS, {"dim": dim, "model_sha256": "0" * 64, "normalized": True})
    write_run_info(params.paths["run_info"], "no-such-run", "tripletflow")
    build_index.run(params.build_index, params.paths)
    return params


def test_separate_query_and_gallery_sets_with_an_absent_class(make_project):
    e = np.eye(4, dtype=np.float32)
    rows = [
        # gallery: two "a" near e0, two "b" near e1, one "c" near e2
        ("g1", "a", False, True, e[0]), ("g2", "a", False, True, e[0] + 0.1 * e[3]),
        ("g3", "b", False, True, e[1]), ("g4", "b", False, True, e[1] + 0.1 * e[3]),
        ("g5", "c", False, True, e[2]),
        # queries: "a" (perfect), "b" whose nearest is the "c" item, and "z" absent from the gallery
        ("q1", "a", True, False, e[0]), ("q2", "b", True, False, e[2] + 0.9 * e[1]),
        ("q3", "z", True, False, e[3]),
    ]
    params = _embeddings_project(make_project, rows)
    result = evaluate.run(params.evaluate, params.paths)
    assert result["n_queries"] == 3 and result["n_queries_without_relevant"] == 1
    assert result["search"] == "exact"
    # q1: AP@R = 1, P@1 = 1. q2: ranks c, b, b -> AP@R (R=2) = (1/2) * (1/2) = 0.25, P@1 = 0.
    assert result["map_at_r"] == pytest.approx((1 + 0.25) / 2)
    assert result["precision_at_1"] == pytest.approx(0.5)
    assert result["recall_at_5"] == pytest.approx(1.0)
    assert json.loads(params.paths["metrics"].read_text()) == result


def test_few_shot_leaves_out_query_classes_the_gallery_lacks(make_project):
    """GLDv2's queries without a landmark share one label no gallery item has: not a class to
    tell apart in few-shot episodes (nor in any retrieval metric). Here, with it, 3 classes
    would make a 3-way task; without it there are 2."""
    from tasks.errors import DatasetError

    e = np.eye(3, dtype=np.float32)
    rows = [("g1", "a", False, True, e[0]), ("g2", "b", False, True, e[1])]
    rows += [(f"q{c}{i}", c, True, False, e[n] + 0.01 * i) for n, c in enumerate("abz") for i in range(3)]
    two = _embeddings_project(make_project, rows, **{"evaluate.few_shot": {"ways": [2], "shots": [1], "queries": 1, "episodes": 20}})
    assert evaluate.run(two.evaluate, two.paths)["few_shot_2way_1shot"] == pytest.approx(1.0)
    three = _embeddings_project(make_project, rows, name="three",
                                **{"evaluate.few_shot": {"ways": [3], "shots": [1], "queries": 1, "episodes": 20}})
    with pytest.raises(DatasetError, match="evaluate.few_shot.*only 2 of 2 classes"):
        evaluate.run(three.evaluate, three.paths)


def test_queries_without_a_gallery_is_a_named_error(make_project):
    from tasks.errors import DatasetError

    e = np.eye(3, dtype=np.float32)
    rows = [("q1", "a", True, False, e[0]), ("q2", "b", True, False, e[1])]
    with pytest.raises(DatasetError, match="0 gallery items and 2 queries"):
        params = _embeddings_project(make_project, rows)
        evaluate.run(params.evaluate, params.paths)


def test_no_query_with_a_relevant_item_is_a_named_error(make_project):
    from tasks.errors import DatasetError

    e = np.eye(3, dtype=np.float32)
    rows = [("g1", "a", False, True, e[0]), ("g2", "b", False, True, e[1]), ("q1", "z", True, False, e[2])]
    params = _embeddings_project(make_project, rows)
    with pytest.raises(DatasetError, match="none of the 1 queries"):
        evaluate.run(params.evaluate, params.paths)


def test_few_shot_with_too_few_classes_names_the_key_before_searching(make_project, monkeypatch):
    """Checked before the search: on a large gallery that is the stage's long part."""
    params = _trained(make_project, {"make_batches.epochs": 1, "evaluate.few_shot.ways": [5]})
    export_embeddings.run(params.export_embeddings, params.paths)
    build_index.run(params.build_index, params.paths)
    from tasks import search
    from tasks.errors import DatasetError

    def no_search(*args, **kwargs):
        raise AssertionError("searched before checking the few-shot episodes")

    monkeypatch.setattr(search, "exact_chunks", no_search)
    with pytest.raises(DatasetError, match="evaluate.few_shot.*only 2 of 2 classes"):
        evaluate.run(params.evaluate, params.paths)
    assert not params.paths["metrics"].exists()


def test_metrics_resting_on_tied_scores_are_counted_and_warned_of(make_project, capsys):
    """A collapsed model: every item of classes a and b has one embedding. Row order (a first)
    must not decide the ranking: a's and b's queries score chance, and evaluate says why."""
    e = np.eye(3, dtype=np.float32)
    rows = [(f"{c}{i}", c, True, True, e[0]) for c in "ab" for i in range(3)]
    rows += [(f"c{i}", "c", True, True, e[2] + 0.01 * i * e[1]) for i in range(3)]  # told apart from a and b
    params = _embeddings_project(make_project, rows)
    result = evaluate.run(params.evaluate, params.paths)
    assert result["n_queries_tied"] == 6  # every a and b query; none of c's
    # An a or b query: 5 others tied at the top, 2 of them relevant (R = 2); c's 3 queries are right.
    assert result["precision_at_1"] == pytest.approx((6 * 2 / 5 + 3) / 9)
    ap_at_r = (2 / 5 + 2 / 5 * (1 + 1 / 4) / 2) / 2  # E[P(1)·rel(1) + P(2)·rel(2)] / R
    assert result["map_at_r"] == pytest.approx((6 * ap_at_r + 3) / 9)
    err = capsys.readouterr().err
    assert "for 6 of 9 queries a relevant and a non-relevant item score exactly alike" in err
    assert "the chance of a random order there" in err
    assert json.loads(params.paths["metrics"].read_text())["n_queries_tied"] == 6


@pytest.mark.parametrize("factory", ["Flat", "HNSW16"])
def test_a_collapsed_model_scores_chance_though_k_cuts_its_tie_group(make_project, factory):
    """4 classes × 8 items, all one embedding, rows sorted by label: every query ties with the 31
    others, and k (7 = R) cuts that group. Searched wider past the cut, the metrics are chance —
    by exact search and through an approximate index."""
    v = np.eye(3, dtype=np.float32)[0]
    rows = [(f"{c}{i}", c, True, True, v) for c in "abcd" for i in range(8)]
    params = _embeddings_project(make_project, rows, factory, name=factory.lower(), **{
        "evaluate.map_at": 5, "evaluate.recall_at": [1, 5], "evaluate.grid_top_k": 2})
    result = evaluate.run(params.evaluate, params.paths)
    assert result["search"] == ("exact" if factory == "Flat" else "index")
    assert result["precision_at_1"] == pytest.approx(7 / 31)
    assert result["map_at_r"] == pytest.approx(sum(7 / 31 * (1 + (i - 1) * 6 / 30) / i for i in range(1, 8)) / 7)
    assert result["n_queries_tied"] == 32


def test_embeddings_of_an_older_model_are_refused_not_credited_to_the_new_one(make_project):
    """Train again, then evaluate without export: the old embeddings and their (consistent) index
    would be scored, and the scores logged and registered as the new model's."""
    from tasks.contracts import ContractError

    params = _trained(make_project, {"make_batches.epochs": 1})
    export_embeddings.run(params.export_embeddings, params.paths)
    build_index.run(params.build_index, params.paths)
    retrained = load_params(params.paths.root + "/params.yaml", {"train.seed": 1})
    train.run(retrained.train, retrained.paths)
    with pytest.raises(ContractError, match=r"embeddings\.parquet comes from model [0-9a-f]{12}, not from .*model\.pt: "
                                            r"re-run export_embeddings and build_index"):
        evaluate.run(params.evaluate, params.paths)
    assert not params.paths["metrics"].exists()
