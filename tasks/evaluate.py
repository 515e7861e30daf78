"""Stage 6 — evaluate: search the built index with the queries and score the retrieval.

Metrics (definitions in :mod:`tasks.metrics`): mAP@R, R-precision, mAP@k (Google Landmark
Retrieval), Recall@K, Precision@1 — computed from the index the pipeline built, so users measure
what they deploy. Leave-one-out: a query that is also in the gallery never retrieves itself, and
does not count itself as relevant. Queries with no relevant gallery item are counted, not averaged.

Outputs: ``paths.metrics`` (DVC metrics), ``paths.recall_curve`` (CSV, DVC plot), and PNGs in
``paths.figures``: the Recall@K curve and a retrieval grid; all also logged to the MLflow run.
"""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tasks import contracts as C
from tasks import figures, metrics, registry, tracking
from tasks.params import EvaluateParams, Paths


def search_excluding_self(
    index: faiss.Index, queries: np.ndarray, query_ids: np.ndarray, gallery_ids: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` gallery positions (Q, k) and scores (Q, k), the query itself removed.

    Searches k+1 and drops the query's own item where found (else the last column), so every
    query gets exactly k candidates. Missing results (approximate indexes) are position -1.
    """
    k_search = min(k + 1, index.ntotal)
    scores, pos = index.search(queries, k_search)
    is_self = (pos >= 0) & (gallery_ids[np.maximum(pos, 0)] == query_ids[:, None])
    # Stable sort on the self flag moves the self match to the end without reordering the rest.
    order = np.argsort(is_self, axis=1, kind="stable")
    pos, scores = np.take_along_axis(pos, order, 1), np.take_along_axis(scores, order, 1)
    # When the whole gallery fits in k, the self match is still in the row: blank it out.
    moved_self = np.take_along_axis(is_self, order, 1)
    pos[moved_self], scores[moved_self] = -1, np.nan
    pos, scores = pos[:, :k], scores[:, :k]
    if pos.shape[1] < k:  # gallery smaller than k: pad with "no result"
        pad = k - pos.shape[1]
        pos = np.pad(pos, ((0, 0), (0, pad)), constant_values=-1)
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=np.nan)
    return pos, scores


def run(params: EvaluateParams, paths: Paths) -> dict:
    """Score retrieval through ``paths.index``; write metrics, the Recall@K curve and figures."""
    table, vectors, emb_meta = C.read_embeddings(paths["embeddings"])
    ids_table, ids_meta = C.read_table(paths["index_ids"], C.INDEX_IDS)
    index = faiss.read_index(str(paths["index"]))
    if index.ntotal != ids_table.num_rows:
        raise C.ContractError(f"{paths['index']} holds {index.ntotal} vectors but {paths['index_ids']} maps {ids_table.num_rows}")
    # A stale index (built from another model's embeddings) would score queries against the wrong space.
    if ids_meta["model_sha256"] != emb_meta["model_sha256"] or index.d != emb_meta["dim"]:
        raise C.ContractError(
            f"{paths['index']} was built from model {ids_meta['model_sha256'][:12]} (dim {index.d}) but "
            f"{paths['embeddings']} comes from model {emb_meta['model_sha256'][:12]} (dim {emb_meta['dim']}): rebuild the index"
        )
    gallery_ids = np.asarray(ids_table[C.ITEM_ID].to_pylist(), dtype=object)
    gallery_labels = np.asarray(ids_table[C.LABEL].to_pylist(), dtype=object)
    is_query = pc.equal(table[C.IS_QUERY], True).to_numpy(zero_copy_only=False)
    query_ids = np.asarray(table[C.ITEM_ID].to_pylist(), dtype=object)[is_query]
    query_labels = np.asarray(table[C.LABEL].to_pylist(), dtype=object)[is_query]

    # R per query: same-label gallery items, minus the query itself when it is in the gallery.
    labels, counts = np.unique(gallery_labels, return_counts=True)
    per_label = dict(zip(labels, counts))
    in_gallery = np.isin(query_ids, gallery_ids)
    n_relevant = np.array([per_label.get(l, 0) for l in query_labels]) - in_gallery
    k = int(max(n_relevant.max(initial=1), params.map_at, max(params.recall_at), params.grid_top_k))
    k = min(k, index.ntotal - (1 if in_gallery.any() else 0))
    pos, scores = search_excluding_self(index, vectors[is_query], query_ids, gallery_ids, k)
    valid = pos >= 0
    hits = metrics.relevance(query_labels, gallery_labels[np.maximum(pos, 0)], valid=valid)
    result = metrics.summarize(hits, n_relevant, params.recall_at, params.map_at)
    result["index_factory"] = ids_meta["factory"]
    C.write_json(paths["metrics"], result)

    answered = n_relevant > 0
    ks = np.arange(1, max(params.recall_at) + 1)
    curve = metrics.recall_at_k(hits[answered], list(ks))
    recall = np.array([curve[int(x)].mean() for x in ks])
    C.write_text(paths["recall_curve"], "k,recall\n" + "".join(f"{x},{r:.6f}\n" for x, r in zip(ks, recall)))
    fig_dir = paths["figures"]
    figures.recall_curve(ks, recall, fig_dir / "recall_at_k.png", f"Recall@K ({int(answered.sum())} queries)")
    _grid(params, paths, query_ids, pos, scores, hits, query_labels, ids_table, fig_dir / "retrieval_grid.png")

    numeric = {k_: float(v) for k_, v in result.items() if isinstance(v, (int, float))}
    with tracking.stage_run(paths, "evaluate", params) as (child, parent):
        child.metrics(numeric)
        parent.metrics(numeric)
        for path in (paths["metrics"], paths["recall_curve"], fig_dir):
            parent.artifact(path, "evaluation")
        registered = {}
        if params.registered_model:
            registered = registry.register(paths, params.registered_model, parent.run_id, result)
            child.tags({f"tripletflow.{k}": str(v) for k, v in registered.items()})
    tracking.finish_pipeline_run(Path(paths.root), parent.run_id)
    return result | registered


def _grid(params: EvaluateParams, paths: Paths, query_ids, pos, scores, hits, query_labels, ids_table, out: Path) -> None:
    """Draw ``grid_queries`` random queries (seeded) with their top ``grid_top_k`` results."""
    n = min(params.grid_queries, len(query_ids))
    if n == 0:
        return
    pick = np.sort(np.random.default_rng(params.seed).choice(len(query_ids), size=n, replace=False))
    k = min(params.grid_top_k, pos.shape[1])
    nb_pos = pos[pick, :k]
    nb_ids = np.asarray(ids_table[C.ITEM_ID].to_pylist(), dtype=object)[np.maximum(nb_pos, 0)]
    wanted = set(query_ids[pick]) | set(nb_ids.ravel())
    items, meta = C.read_table(paths["items"], C.ITEMS, columns=[C.ITEM_ID, C.PIXELS])
    items = items.filter(pc.is_in(items[C.ITEM_ID], pa.array(sorted(wanted), pa.string())))
    shape = (meta["height"], meta["width"], meta["channels"])
    flat = items[C.PIXELS].combine_chunks().flatten().to_numpy().reshape(-1, *shape)
    row = {item: i for i, item in enumerate(items[C.ITEM_ID].to_pylist())}
    blank = np.zeros(shape, np.uint8)
    fetch = np.vectorize(lambda i: row.get(i, -1), otypes=[np.int64])
    q_img = flat[fetch(query_ids[pick])]
    nb_rows = np.where(nb_pos >= 0, fetch(nb_ids), -1)  # -1: no result, or an id not in items
    nb_img = np.where((nb_rows >= 0)[..., None, None, None], flat[np.maximum(nb_rows, 0)], blank)
    figures.retrieval_grid(q_img, nb_img, hits[pick, :k], scores[pick, :k], list(query_labels[pick]), out)


def main(argv: list[str] | None = None) -> None:
    from tasks.cli import stage_main

    stage_main("evaluate", run, argv)


if __name__ == "__main__":
    main()
