"""Stage 6 — evaluate: score retrieval of the queries against the gallery, exactly and as deployed.

Metrics (definitions and papers in :mod:`tasks.metrics`): mAP@R, R-precision, mAP@k (Google
Landmark Retrieval), Recall@K, Precision@1. Protocols (:mod:`tasks.retrieval`): leave-one-out when
a query is also in the gallery (it never retrieves itself nor counts itself as relevant), separate
query / gallery sets, and queries whose class is absent from the gallery (counted as
``n_queries_without_relevant``, never averaged, never NaN). k reaches the largest class, so MAP@R
and R-precision are exact. Equal scores give no order, so every metric is its expectation over the
orders of the tied items (:mod:`tasks.ties`), with a tie group that k cuts searched on
(:func:`tasks.retrieval.score`; a group over 4,096 items is scored from a random draw of it).
``n_queries_tied`` counts the queries with equal scores for a relevant and a non-relevant item
(:func:`tasks.ties.tied_across_relevance`); above 1 % a warning says so.

Search: a ``Flat`` index *is* exact search, so it runs as blocked matmul + top-k
(:mod:`tasks.search`; CUDA when present) with memory bounded by one tile. An approximate index
(IVF, PQ, HNSW) is searched as built — what users deploy — and the exact metrics are computed too,
as ``exact_<metric>`` keys beside the index's.

Outputs: ``paths.metrics`` (DVC metrics), ``paths.recall_curve`` and ``paths.per_class_ap`` (CSVs,
DVC plots), and PNGs in ``paths.figures`` (:mod:`tasks.eval_figures`): the Recall@K curve, a random
and a worst-queries retrieval grid, the per-class AP histogram and a 2-D projection of the query
embeddings; all also logged to the MLflow run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tasks import contracts as C
from tasks import eval_figures, fewshot, figures, registry, retrieval, search, tracking
from tasks.errors import DatasetError
from tasks.models import pick_device
from tasks.params import EvaluateParams, Paths


def _read(paths: Paths):
    """-> embeddings table, vectors (N, D), gallery mask (N,), index, index id-map table; checked
    against each other and the model (stale files would score another model's space)."""
    table, vectors, emb_meta = C.read_embeddings(paths["embeddings"])
    ids_table, ids_meta = C.read_table(paths["index_ids"], C.INDEX_IDS)
    index = faiss.read_index(str(paths["index"]))
    if index.ntotal != ids_table.num_rows:
        raise C.ContractError(f"{paths['index']} holds {index.ntotal} vectors but {paths['index_ids']} maps {ids_table.num_rows}")
    if ids_meta["model_sha256"] != emb_meta["model_sha256"] or index.d != emb_meta["dim"]:
        raise C.ContractError(
            f"{paths['index']} was built from model {ids_meta['model_sha256'][:12]} (dim {index.d}) but "
            f"{paths['embeddings']} comes from model {emb_meta['model_sha256'][:12]} (dim {emb_meta['dim']}): rebuild the index"
        )
    # Metrics go to the model's run and registry version: an older model's embeddings (export
    # skipped by hand) would be credited to this one. No model file: outside embeddings, as they are.
    model = paths["model"]
    if model.exists() and emb_meta["model_sha256"] != C.file_digest(model):
        raise C.ContractError(f"{paths['embeddings']} comes from model {emb_meta['model_sha256'][:12]}, not from "
                              f"{paths['model']}: re-run export_embeddings and build_index")
    gallery = pc.equal(table[C.IS_GALLERY], True).to_numpy(zero_copy_only=False)
    if not table[C.ITEM_ID].filter(pa.array(gallery)).equals(ids_table[C.ITEM_ID]):
        raise C.ContractError(f"{paths['index_ids']} does not list the gallery of {paths['embeddings']} in order: rebuild the index")
    return table, vectors, gallery, index, ids_table, ids_meta


def run(params: EvaluateParams, paths: Paths) -> dict:
    """Score retrieval; write metrics, the Recall@K curve and figures."""
    table, vectors, gallery, index, ids_table, ids_meta = _read(paths)
    if not gallery.any() or not pc.any(table[C.IS_QUERY]).as_py():
        raise DatasetError(f"{paths['embeddings']}: {int(gallery.sum())} gallery items and "
                           f"{pc.sum(table[C.IS_QUERY]).as_py() or 0} queries: evaluation needs both")
    gallery_ids = ids_table[C.ITEM_ID].to_numpy(zero_copy_only=False)
    gallery_labels = ids_table[C.LABEL].to_numpy(zero_copy_only=False)
    is_query = pc.equal(table[C.IS_QUERY], True).to_numpy(zero_copy_only=False)
    query_ids = table[C.ITEM_ID].to_numpy(zero_copy_only=False)[is_query]
    query_labels = table[C.LABEL].to_numpy(zero_copy_only=False)[is_query]
    position = {item: i for i, item in enumerate(gallery_ids)}
    self_pos = np.array([position.get(i, -1) for i in query_ids], dtype=np.int64)
    qc, gc = retrieval.label_codes(query_labels, gallery_labels)
    r = retrieval.n_relevant(qc, gc, self_pos)
    k = retrieval.needed_k(r, len(gallery_ids), params.map_at, max(params.recall_at), params.grid_top_k)
    g_vectors = vectors[gallery]
    # Leave-one-out on one set: one array for both (no copy; exact search sees it is symmetric).
    queries = g_vectors if np.array_equal(is_query, gallery) else vectors[is_query]
    del vectors
    metric = ids_meta["metric"]
    # Few-shot episodes over the classes the gallery has. Before the search: episodes the data
    # cannot fill stop the stage now, not after an hour of it.
    known = fewshot.known(qc, gc)
    few_shot = fewshot.report(params.few_shot, queries[known] if not known.all() else queries, query_labels[known],
                              params.seed, metric)

    # One column past k: a tie there with the k-th means the last tie group runs on (retrieval.score).
    spare = min(k + 1, len(gallery_ids))
    device = pick_device(params.device, "evaluate")

    def exact():
        chunks = search.exact_chunks(queries, g_vectors, spare, metric, self_pos, device, params.query_chunk, params.gallery_block)
        wider = search.exact_research(queries, g_vectors, metric, self_pos, device, params.gallery_block, shuffle_from=retrieval.MAX_WIDTH)
        return retrieval.score(chunks, qc, gc, r, params.map_at, params.grid_top_k, wider)

    is_exact = isinstance(faiss.downcast_index(index), faiss.IndexFlat)
    if is_exact:
        del index  # its vectors are g_vectors: free the copy (512 MB at 1M × 128)
        ret = exact()
    else:
        chunks = search.index_chunks(index, queries, spare, self_pos, params.query_chunk, negate=metric == "l2")
        wider = search.index_research(index, queries, self_pos, negate=metric == "l2")
        ret = retrieval.score(chunks, qc, gc, r, params.map_at, params.grid_top_k, wider)
    try:
        result = retrieval.summary(ret, params.recall_at, params.map_at)
        if not is_exact:
            result |= {f"exact_{key}": v for key, v in retrieval.summary(exact(), params.recall_at, params.map_at).items() if not key.startswith("n_")}
    except ValueError as err:
        raise DatasetError(f"{paths['embeddings']}: {err}") from None
    if warning := retrieval.tied_warning(result):
        print(f"evaluate: warning: {warning}", file=sys.stderr)
    result |= few_shot | {"index_factory": ids_meta["factory"], "search": "exact" if is_exact else "index"}
    C.write_json(paths["metrics"], result)

    ks, recall = retrieval.recall_curve(ret, max(params.recall_at))
    C.write_text(paths["recall_curve"], "k,recall\n" + "".join(f"{x},{v:.6f}\n" for x, v in zip(ks, recall)))
    fig_dir = paths["figures"]
    figures.recall_curve(ks, recall, fig_dir / "recall_at_k.png", f"Recall@K ({int((r > 0).sum())} queries)")
    eval_figures.draw(params, paths, ret, queries, query_ids, query_labels, gallery_ids)

    numeric = {k_: float(v) for k_, v in result.items() if isinstance(v, (int, float))}
    with tracking.stage_run(paths, "evaluate", params) as (child, parent):
        child.metrics(numeric)
        parent.metrics(numeric)
        for path in (paths["metrics"], paths["recall_curve"], paths["per_class_ap"], fig_dir):
            parent.artifact(path, "evaluation")
        registered = {}
        if params.registered_model:
            # _read checked the embeddings' model digest against paths.model: the model's own
            registered = registry.register(paths, params.registered_model, parent.run_id, result, ids_meta["model_sha256"])
            child.tags({f"tripletflow.{k}": str(v) for k, v in registered.items()})
    tracking.finish_pipeline_run(Path(paths.root), parent.run_id)
    return result | registered


def main(argv: list[str] | None = None) -> None:
    from tasks.cli import stage_main

    stage_main("evaluate", run, argv)


if __name__ == "__main__":
    main()
