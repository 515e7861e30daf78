"""How good and how fast the built index is: recall against exact search, speed, size.

``10-recall@10`` (the ANN-benchmarks measure; Aumüller et al., "ANN-Benchmarks", Information Systems
2020): for each query of a seeded sample of gallery items, the share of its exact 10 nearest
neighbours (itself excluded, :mod:`tasks.search`) that the index also returns among its 10; averaged.
As in ANN-benchmarks a returned item counts when its exact score reaches the exact 10th one (to
float rounding), not only when it is the same item: among equal scores (duplicate images, a
collapsed model) faiss and exact search pick different but equally near items. A Flat index
scores 1. Queries/s are measured on the same sample, one batch,
on this machine — compare them between runs on the same machine only.
"""

from __future__ import annotations

import time

import numpy as np

from tasks import search


def _top(chunks) -> np.ndarray:
    return np.concatenate([c.pos for c in chunks])


def index_report(index, gallery: np.ndarray, metric: str, n_queries: int, seed: int, k: int = 10) -> dict:
    """gallery float32 (G, D) as indexed; -> {index_recall_at_10, queries_per_second, exact_queries_per_second,
    n_report_queries}; the first three None when no query was measured."""
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(gallery), size=min(n_queries, len(gallery)), replace=False))
    queries, self_pos = gallery[pick], pick.astype(np.int64)
    k = min(k, len(gallery) - 1)
    if k < 1 or len(pick) == 0:
        # Nothing measured (report_queries: 0, or a one-item gallery): null, not a perfect recall.
        return {"index_recall_at_10": None, "queries_per_second": None, "exact_queries_per_second": None, "n_report_queries": 0}
    start = time.perf_counter()
    approx = _top(search.index_chunks(index, queries, k, self_pos, negate=metric == "l2"))
    t_index = time.perf_counter() - start
    # One query first: loads the search kernels (numba's cache, ~0.1 s in a fresh process), which
    # on a small gallery would otherwise be most of the time measured.
    _top(search.exact_chunks(queries[:1], gallery, k, metric, self_pos[:1]))
    start = time.perf_counter()
    exact = _top(search.exact_chunks(queries, gallery, k, metric, self_pos))
    t_exact = time.perf_counter() - start
    found = _found(queries, gallery, approx, exact, metric)
    return {
        "index_recall_at_10": float(np.mean(found)),  # k = 10, or G - 1 for a smaller gallery
        "queries_per_second": len(pick) / max(t_index, 1e-9),
        "exact_queries_per_second": len(pick) / max(t_exact, 1e-9),
        "n_report_queries": int(len(pick)),
    }


def _found(queries: np.ndarray, gallery: np.ndarray, approx: np.ndarray, exact: np.ndarray, metric: str,
           block: int = 256) -> np.ndarray:
    """Per query (Q,): the share of its exact top k (positions (Q, k), -1 = none) matched by the
    index's k (Q, k): returned items whose exact score, in float64, is at least the exact k-th
    score less a rounding allowance (1e-5, relative above 1), at most one per exact neighbour."""
    out = np.empty(len(queries))
    for lo in range(0, len(queries), block):
        q = queries[lo:lo + block].astype(np.float64)
        a, e = approx[lo:lo + block], exact[lo:lo + block]
        sa, se = _scores(q, gallery, a, metric), _scores(q, gallery, e, metric)
        kth = np.nanmin(np.where(e >= 0, se, np.nan), axis=1, initial=np.inf)  # (b,) inf: no exact neighbour
        hit = (a >= 0) & (sa >= (kth - 1e-5 * np.maximum(np.abs(kth), 1.0))[:, None])
        wanted = (e >= 0).sum(axis=1)
        out[lo:lo + block] = np.minimum(hit.sum(axis=1), wanted) / np.maximum(wanted, 1)
    return out


def _scores(q: np.ndarray, gallery: np.ndarray, pos: np.ndarray, metric: str) -> np.ndarray:
    """float64 (b, D) queries and gallery positions (b, k) -> exact scores (b, k), higher = nearer
    (negative squared L2 for ``l2``); meaningless where pos is -1."""
    g = gallery[np.maximum(pos, 0)].astype(np.float64)  # (b, k, D)
    if metric == "l2":
        return -((g - q[:, None, :]) ** 2).sum(-1)
    return np.einsum("bkd,bd->bk", g, q)
