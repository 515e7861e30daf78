"""How good and how fast the built index is: recall against exact search, speed, size.

``10-recall@10`` (the ANN-benchmarks measure; Aumüller et al., "ANN-Benchmarks", Information Systems
2020): for each query of a seeded sample of gallery items, the share of its exact 10 nearest
neighbours (itself excluded, :mod:`tasks.search`) that the index also returns among its 10; averaged.
A Flat index scores 1 up to float rounding. Queries/s are measured on the same sample, one batch,
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
    found = [len(np.intersect1d(a[a >= 0], e[e >= 0])) / max((e >= 0).sum(), 1) for a, e in zip(approx, exact)]
    return {
        "index_recall_at_10": float(np.mean(found)),  # k = 10, or G - 1 for a smaller gallery
        "queries_per_second": len(pick) / max(t_index, 1e-9),
        "exact_queries_per_second": len(pick) / max(t_exact, 1e-9),
        "n_report_queries": int(len(pick)),
    }
