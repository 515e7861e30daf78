"""Stage 5 — build_index: a faiss index of the gallery embeddings + the id map + a report.

Any faiss ``index_factory`` string (``Flat``, ``IVF256,Flat``, ``IVF256,PQ16``, ``HNSW32``,
``OPQ16,IVF256,PQ16``) or ``auto`` (:func:`auto_factory`); inner product on the L2-normalised
embeddings (= cosine) by default. IVF/PQ indexes train on ``train_sample`` seeded gallery vectors
(0 = all); ``nprobe`` (IVF) and ``efSearch`` (HNSW) are set on the index and saved with it, so
evaluate and query search the index as configured here. Writes ``paths.index``, ``paths.index_ids``
(position -> item_id, label: faiss ids are row positions, the map makes them item ids again) and
``paths.index_report`` (:mod:`tasks.index_report`: recall@10 against exact search, build time,
size on disk, queries/s), also logged to MLflow.
"""

from __future__ import annotations

import time

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tasks import contracts as C
from tasks import tracking
from tasks.index_report import index_report
from tasks.errors import ParamsError
from tasks.params import BuildIndexParams, Paths

METRICS = {"inner_product": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}


def auto_factory(n: int, dim: int) -> str:
    """The ``factory: auto`` rule, by collection size n (faiss wiki, "Guidelines to choose an index"):

    * n <= 200,000: ``Flat`` — exact; evaluate then uses blocked exact search, and a query costs
      well under a millisecond per 100k vectors;
    * n <= 5,000,000: ``IVF{L},Flat`` with L = the power of two nearest 4·sqrt(n) (clusters of a
      few hundred vectors), vectors stored uncompressed;
    * larger: ``IVF{L},PQ{m}`` with m sub-quantisers of 8 bits, m = dim/4 (m bytes per vector),
      for memory; for a dim that 4 does not divide, its largest divisor below dim/4 (faiss's PQ
      needs m to divide dim).
    """
    if n <= 200_000:
        return "Flat"
    lists = 2 ** int(round(np.log2(4 * np.sqrt(n))))
    if n <= 5_000_000:
        return f"IVF{lists},Flat"
    m = max(d for d in range(1, max(1, dim // 4) + 1) if dim % d == 0)
    return f"IVF{lists},PQ{m}"


def id_mapped(index: faiss.Index) -> bool:
    """An ``IDMap``/``IDMap2`` index: it takes ids with the vectors, which this stage never gives —
    the index holds gallery positions and ``paths.index_ids`` maps them to item ids."""
    return isinstance(faiss.downcast_index(index), (faiss.IndexIDMap, faiss.IndexIDMap2))


def build(vectors: np.ndarray, factory: str, metric: str, train_sample: int = 0, seed: int = 0) -> faiss.Index:
    """float32 (N, D) -> a trained, filled faiss index. Raises ParamsError for a bad factory string.

    ``train_sample`` > 0: train IVF/PQ on that many vectors drawn with ``seed`` (k-means cost grows
    with the training set; faiss needs ~30-256 per list), else on all of them.
    """
    try:
        index = faiss.index_factory(vectors.shape[1], factory, METRICS[metric])
    except RuntimeError as err:  # params checked it at train.embedding_dim; this is the vectors' own size
        raise ParamsError(f"build_index.factory: faiss cannot build {factory!r}: {err}") from None
    if id_mapped(index):
        raise ParamsError(f"build_index.factory: {factory!r}: drop the IDMap prefix (the id map file maps positions to ids)")
    if not index.is_trained:
        # IVF/PQ need training vectors; too few for the requested lists is a user error, say so.
        # faiss's k-means seeds itself with a fixed default, so training is deterministic.
        train = vectors
        if 0 < train_sample < len(vectors):
            train = vectors[np.sort(np.random.default_rng(seed).choice(len(vectors), train_sample, replace=False))]
        try:
            index.train(train)
        except RuntimeError as err:
            raise ParamsError(f"build_index.factory: training {factory!r} on {len(train)} vectors failed: {err}") from None
    index.add(vectors)
    return index


def set_search_params(index: faiss.Index, nprobe: int, ef_search: int) -> None:
    """nprobe on an IVF index (also under OPQ/PCA pre-transforms), efSearch on an HNSW one; others
    have neither and are left alone."""
    try:
        faiss.extract_index_ivf(index).nprobe = nprobe
    except RuntimeError:
        pass  # not an IVF index
    hnsw = faiss.downcast_index(index.index if isinstance(faiss.downcast_index(index), faiss.IndexPreTransform) else index)
    if hasattr(hnsw, "hnsw"):
        hnsw.hnsw.efSearch = ef_search


def run(params: BuildIndexParams, paths: Paths) -> dict:
    """Index the gallery rows of ``paths.embeddings``; write the index, its id map and report atomically."""
    table, vectors, meta = C.read_embeddings(paths["embeddings"])
    gallery = pc.equal(table[C.IS_GALLERY], True).to_numpy(zero_copy_only=False)
    g_vectors = vectors[gallery]
    factory = auto_factory(len(g_vectors), vectors.shape[1]) if params.factory == "auto" else params.factory
    start = time.perf_counter()
    index = build(g_vectors, factory, params.metric, params.train_sample, params.seed)
    set_search_params(index, params.nprobe, params.ef_search)
    seconds = time.perf_counter() - start
    with C.atomic_path(paths["index"]) as tmp:
        faiss.write_index(index, str(tmp))
    g = table.filter(pa.array(gallery))
    ids = pa.table(
        {C.POSITION: pa.array(np.arange(g.num_rows, dtype=np.int64)), C.ITEM_ID: g[C.ITEM_ID], C.LABEL: g[C.LABEL]},
        schema=C.INDEX_IDS.schema(),
    )
    C.write_table(ids, paths["index_ids"], C.INDEX_IDS, {"factory": factory, "metric": params.metric, "model_sha256": meta["model_sha256"]})

    result = {"n_indexed": int(index.ntotal), "build_seconds": seconds, "index_bytes": paths["index"].stat().st_size}
    report = result | index_report(index, g_vectors, params.metric, params.report_queries, params.seed)
    report |= {"factory": factory, "metric": params.metric, "nprobe": params.nprobe, "ef_search": params.ef_search, "dim": int(vectors.shape[1])}
    C.write_json(paths["index_report"], report)
    with tracking.stage_run(paths, "build_index", params) as (child, parent):
        child.metrics({k: float(v) for k, v in report.items() if isinstance(v, (int, float))})
        parent.metrics({f"index.{k}": float(v) for k, v in report.items() if isinstance(v, (int, float))})
        for path in (paths["index"], paths["index_ids"], paths["index_report"]):
            parent.artifact(path, "index")
    return report


def main(argv: list[str] | None = None) -> None:
    from tasks.cli import stage_main

    stage_main("build_index", run, argv)


if __name__ == "__main__":
    main()
