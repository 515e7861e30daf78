"""Stage 5 — build_index: a faiss index of the gallery embeddings + the id map.

Any faiss ``index_factory`` string (``Flat``, ``IVF256,Flat``, ``IVF256,PQ16``, ``HNSW32``); inner
product on the L2-normalised embeddings (= cosine) by default. Writes ``paths.index`` and
``paths.index_ids`` (position -> item_id, label): faiss ids are row positions, the map makes them
the dataset's item ids again.
"""

from __future__ import annotations

import time

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tasks import contracts as C
from tasks import tracking
from tasks.errors import ParamsError
from tasks.params import BuildIndexParams, Paths

METRICS = {"inner_product": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}


def build(vectors: np.ndarray, factory: str, metric: str) -> faiss.Index:
    """float32 (N, D) -> a trained, filled faiss index. Raises ParamsError for a bad factory string."""
    try:
        index = faiss.index_factory(vectors.shape[1], factory, METRICS[metric])
    except RuntimeError as err:
        raise ParamsError(f"build_index.factory: faiss cannot build {factory!r}: {err}") from None
    if not index.is_trained:
        # IVF/PQ need training vectors; too few for the requested lists is a user error, say so.
        # faiss's k-means seeds itself with a fixed default, so training is deterministic.
        try:
            index.train(vectors)
        except RuntimeError as err:
            raise ParamsError(f"build_index.factory: training {factory!r} on {len(vectors)} vectors failed: {err}") from None
    index.add(vectors)
    return index


def run(params: BuildIndexParams, paths: Paths) -> dict:
    """Index the gallery rows of ``paths.embeddings``; write the index and its id map atomically."""
    table, vectors, meta = C.read_embeddings(paths["embeddings"])
    gallery = pc.equal(table[C.IS_GALLERY], True).to_numpy(zero_copy_only=False)
    start = time.perf_counter()
    index = build(vectors[gallery], params.factory, params.metric)
    seconds = time.perf_counter() - start
    with C.atomic_path(paths["index"]) as tmp:
        faiss.write_index(index, str(tmp))
    g = table.filter(pa.array(gallery))
    ids = pa.table(
        {C.POSITION: pa.array(np.arange(g.num_rows, dtype=np.int64)), C.ITEM_ID: g[C.ITEM_ID], C.LABEL: g[C.LABEL]},
        schema=C.INDEX_IDS.schema(),
    )
    C.write_table(ids, paths["index_ids"], C.INDEX_IDS, {"factory": params.factory, "metric": params.metric, "model_sha256": meta["model_sha256"]})

    result = {"n_indexed": int(index.ntotal), "build_seconds": seconds, "index_bytes": paths["index"].stat().st_size}
    with tracking.stage_run(paths, "build_index", params) as (child, parent):
        child.metrics(result)
        parent.artifact(paths["index"], "index")
        parent.artifact(paths["index_ids"], "index")
    return result


def main(argv: list[str] | None = None) -> None:
    from tasks.cli import stage_main

    stage_main("build_index", run, argv)


if __name__ == "__main__":
    main()
