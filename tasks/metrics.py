"""Retrieval metrics from a k-NN result: MAP@R, R-Precision, mAP@k, Recall@K, Precision@1.

Everything here works on two arrays the caller builds from its k-NN search:

* ``hits`` — bool ``(Q, k)``: ``hits[i, j]`` is True when the j-th nearest gallery item of query i
  (rank j + 1, nearest first) is relevant, i.e. has the query's label (see :func:`relevance`).
  Under the leave-one-out protocol (queries are also in the gallery) the query itself must already
  be removed from its neighbour list.
* ``n_relevant`` — int ``(Q,)``: R, the number of relevant items in the gallery for each query
  (excluding the query itself under leave-one-out). It is what makes MAP@R and R-Precision
  "know" how many neighbours should have been found, so it must count the whole gallery, not only
  the k neighbours.

Per-query functions return float64 ``(Q,)`` arrays, NaN where a metric is undefined (R == 0);
they take the ranking as given. :func:`per_query`, given the search's scores, averages over the
orders of tied items instead (:mod:`tasks.ties`), which the pipeline uses;
:func:`summarize` averages over the queries that have at least one relevant item and reports how
many did not. For large query sets, :func:`per_query` reduces one chunk of queries to ``(c,)``
arrays, :func:`concat` joins the chunks and :func:`summarize_per_query` averages them — the same
numbers as :func:`summarize` on the whole ``(Q, k)`` at once. Only ``(Q, k)`` arrays are ever built — never ``(Q, N)`` over the gallery — so memory
follows the k-NN result, not the gallery size. Numpy only: importing this module does not load
torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tasks import ties


def relevance(
    query_labels: np.ndarray, neighbor_labels: np.ndarray, valid: np.ndarray | None = None
) -> np.ndarray:
    """Bool ``(Q, k)``: neighbour j of query i has the query's label.

    ``query_labels`` is ``(Q,)``, ``neighbor_labels`` is ``(Q, k)``; labels may be any dtype that
    compares with ``==`` (ints, strings, objects). Padding slots (a search that returned fewer
    than k neighbours) should carry a label that never equals a real one — and/or be switched off
    with ``valid``, a bool ``(Q, k)`` mask that is ANDed in.
    """
    q = np.asarray(query_labels)
    nb = np.asarray(neighbor_labels)
    if q.ndim != 1:
        raise ValueError(f"query_labels must be 1-D (Q,), got shape {q.shape}")
    if nb.ndim != 2 or nb.shape[0] != q.shape[0]:
        raise ValueError(
            f"neighbor_labels must be (Q, k) with Q = {q.shape[0]}, got shape {nb.shape}"
        )
    # Int labels against string labels never compare equal, so every query would silently score 0;
    # that is a caller bug (e.g. labels read back as text on one side), not a result.
    kinds = {q.dtype.kind, nb.dtype.kind}
    if kinds & {"U", "S"} and kinds & {"b", "i", "u", "f"}:
        raise ValueError(
            f"query labels ({q.dtype}) and neighbour labels ({nb.dtype}) have different kinds; "
            "no label could ever match"
        )
    rel = np.asarray(nb == q[:, None])
    # numpy < 2 answers a single False (not an array) for dtypes it cannot compare elementwise.
    if rel.shape != nb.shape or rel.dtype != np.bool_:
        raise ValueError(
            f"cannot compare labels of dtype {q.dtype} with neighbour labels of dtype {nb.dtype}"
        )
    if valid is not None:
        v = np.asarray(valid)
        if v.dtype != np.bool_ or v.shape != nb.shape:
            raise ValueError(f"valid must be a bool array of shape {nb.shape}, got {v.dtype} {v.shape}")
        rel &= v
    return rel


def _check_hits(hits: np.ndarray) -> np.ndarray:
    h = np.asarray(hits)
    if h.ndim != 2:
        raise ValueError(f"hits must be 2-D (Q, k), got shape {h.shape}")
    if h.dtype != np.bool_:
        # 0/1 ints or floats are accepted; anything else is almost surely scores or labels passed
        # by mistake, which astype(bool) would turn into all-True.
        if not (np.issubdtype(h.dtype, np.number) and np.isin(h, (0, 1)).all()):
            raise ValueError(f"hits must be bool (or 0/1), got dtype {h.dtype}")
        h = h.astype(bool)
    return h


def _check_n_relevant(n_relevant: np.ndarray, hits: np.ndarray) -> np.ndarray:
    r = np.asarray(n_relevant)
    if r.ndim != 1 or r.shape[0] != hits.shape[0]:
        raise ValueError(f"n_relevant must be (Q,) with Q = {hits.shape[0]}, got shape {r.shape}")
    if r.size and not np.issubdtype(r.dtype, np.integer):
        raise ValueError(f"n_relevant must hold integers, got dtype {r.dtype}")
    r = r.astype(np.int64)
    if (r < 0).any():
        raise ValueError("n_relevant must be >= 0")
    # More relevant neighbours than relevant gallery items is impossible for consistent inputs;
    # the usual cause is leave-one-out with the query still in its own neighbour list.
    found = hits.sum(axis=1)
    bad = np.flatnonzero(found > r)
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"query {i} has {int(found[i])} relevant neighbours but n_relevant = {int(r[i])} "
            f"({bad.size} such queries); under leave-one-out, was the query itself left in its "
            "neighbour list?"
        )
    return r


def _ranks(k: int) -> np.ndarray:
    """``(1, k)`` float ranks 1..k, to broadcast against ``(Q, k)``."""
    return np.arange(1, k + 1, dtype=np.float64)[None, :]


def _need_r_columns(hits: np.ndarray, r: np.ndarray, metric: str) -> int:
    """Max R over the queries that have one; raise if ``hits`` has fewer columns than that."""
    r_max = int(r.max()) if r.size else 0
    if hits.shape[1] < r_max:
        raise ValueError(
            f"{metric} needs the top R neighbours of every query: hits has k = {hits.shape[1]} "
            f"columns but max R = {r_max}; search with k >= {r_max}"
        )
    return r_max


def _divide_or_nan(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` with NaN where ``den == 0`` (and no RuntimeWarning for it)."""
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def map_at_r(hits: np.ndarray, n_relevant: np.ndarray) -> np.ndarray:
    """Per-query MAP@R, ``(Q,)``.

    Musgrave, Belongie, Lim, "A Metric Learning Reality Check", ECCV 2020:
    ``MAP@R = (1/R) * sum_{i=1..R} P(i) * rel(i)``, with R = ``n_relevant`` of the query and
    ``P(i)`` the precision among the top i neighbours. Unlike mAP over the whole ranking it only
    looks at the top R, and unlike R-Precision it rewards relevant items ranked earlier.

    ``hits`` ``(Q, k)`` needs ``k >= max(R)`` (else ValueError naming the k needed); NaN where R == 0.
    """
    h = _check_hits(hits)
    r = _check_n_relevant(n_relevant, h)
    r_max = _need_r_columns(h, r, "MAP@R")
    # Only the first max(R) columns can count; cutting there keeps the work (Q, max R).
    h = h[:, :r_max]
    in_top_r = np.arange(1, r_max + 1)[None, :] <= r[:, None]
    rel = h & in_top_r
    # P(i) * rel(i): the cumulative hit count at i is the numerator of P(i).
    precision = np.cumsum(rel, axis=1) / _ranks(r_max)
    return _divide_or_nan((precision * rel).sum(axis=1), r)


def r_precision(hits: np.ndarray, n_relevant: np.ndarray) -> np.ndarray:
    """Per-query R-Precision, ``(Q,)``: (relevant items among the top R) / R.

    The classic IR measure (TREC; Manning, Raghavan, Schütze, "Introduction to Information
    Retrieval", 2008, §8.4), used for metric learning by Musgrave et al., ECCV 2020.
    ``hits`` ``(Q, k)`` needs ``k >= max(R)``; NaN where R == 0.
    """
    h = _check_hits(hits)
    r = _check_n_relevant(n_relevant, h)
    r_max = _need_r_columns(h, r, "R-Precision")
    in_top_r = np.arange(1, r_max + 1)[None, :] <= r[:, None]
    return _divide_or_nan((h[:, :r_max] & in_top_r).sum(axis=1), r)


def map_at_k(hits: np.ndarray, n_relevant: np.ndarray, k: int) -> np.ndarray:
    """Per-query AP@k, ``(Q,)``; its mean is mAP@k.

    Google Landmark Retrieval Challenge 2019/2021 (Kaggle) definition, also Weyand et al.,
    "Google Landmarks Dataset v2", CVPR 2020:
    ``AP@k = 1/min(m_q, k) * sum_{i=1..k} P_q(i) * rel_q(i)``, with m_q = ``n_relevant``.
    Dividing by ``min(m_q, k)`` (not by m_q) lets a perfect ranking score 1 when m_q > k.
    NaN where m_q == 0.

    If ``hits`` has fewer than k columns, the missing ranks count as non-relevant. That is only
    correct when the gallery itself had fewer than k items (so there was nothing more to return);
    checking that is the caller's responsibility. Extra columns beyond k are ignored.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    h = _check_hits(hits)
    m = _check_n_relevant(n_relevant, h)
    h = h[:, : int(k)]
    precision = np.cumsum(h, axis=1) / _ranks(h.shape[1])
    return _divide_or_nan((precision * h).sum(axis=1), np.minimum(m, int(k)))


def recall_at_k(hits: np.ndarray, ks: Sequence[int]) -> dict[int, np.ndarray]:
    """Per-query Recall@K for each K in ``ks``: ``{K: (Q,) float 0/1}``.

    The deep-metric-learning "Recall@K" (Oh Song, Xiang, Jegelka, Savarese, "Deep Metric
    Learning via Lifted Structured Feature Embedding", CVPR 2016): 1 when at least one of the top K
    neighbours is relevant, else 0 — not the IR recall (found / all relevant). A K larger than
    ``hits.shape[1]`` uses all columns.
    """
    h = _check_hits(hits)
    for kk in ks:
        if isinstance(kk, bool) or not isinstance(kk, (int, np.integer)) or kk < 1:
            raise ValueError(f"every K in ks must be a positive integer, got {kk!r}")
    # Rank (0-based) of the first hit: one pass answers every K. argmax says 0 for a row without
    # any hit, hence the separate `found`.
    found = h.any(axis=1)
    first = h.argmax(axis=1)
    return {int(kk): (found & (first < kk)).astype(np.float64) for kk in ks}


def precision_at_1(hits: np.ndarray) -> np.ndarray:
    """Per-query Precision@1, ``(Q,)`` float 0/1: is the nearest neighbour relevant.

    Equal to Recall@1; Musgrave et al., ECCV 2020 report it under this name.
    """
    h = _check_hits(hits)
    if h.shape[1] == 0:
        raise ValueError("precision_at_1 needs at least one neighbour column, hits has none")
    return h[:, 0].astype(np.float64)


def per_query(
    hits: np.ndarray, n_relevant: np.ndarray, map_k: int, scores: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Every per-query value the summary needs, for one chunk of queries (so Q never has to fit).

    ``hits`` bool ``(c, k)`` with ``k >= max(R)`` of the chunk, ``n_relevant`` int ``(c,)`` and
    ``scores`` float ``(c, k)``, the search's scores (best first), or None to take the ranking as
    given. Equal scores give no order, so every value is its expectation over all orders of the
    tied items (:mod:`tasks.ties`); without ties, the plain metric. Returns ``(c,)`` arrays: ``map_at_r``,
    ``r_precision``, ``map_at_{map_k}`` (NaN where R == 0), ``first_hit`` (0-based rank of the
    first relevant neighbour — the start of its tie group —, -1 if none in the k), ``first_tied``
    and ``first_tied_hits`` (that group's size and hits: Recall@K and Precision@1 for any K <= k
    follow, :func:`tasks.ties.recall`), ``n_relevant`` and ``tied`` (bool: a relevant and a
    non-relevant item tie, :func:`tasks.ties.tied_across_relevance`). Concatenate chunks along axis 0 and pass
    the result to :func:`summarize_per_query`.
    """
    h = _check_hits(hits)
    r = _check_n_relevant(n_relevant, h)
    if scores is not None and np.shape(scores) != h.shape:
        raise ValueError(f"scores must have the shape of hits {h.shape}, got {np.shape(scores)}")
    found = h.any(axis=1)
    out = {
        "map_at_r": map_at_r(h, r),
        "r_precision": r_precision(h, r),
        f"map_at_{map_k}": map_at_k(h, r, map_k),
        "first_hit": np.where(found, h.argmax(axis=1), -1).astype(np.int64),
        "first_tied": np.ones(len(h), np.int64),
        "first_tied_hits": np.ones(len(h), np.int64),
        "n_relevant": r,
        "tied": np.zeros(len(h), bool) if scores is None else ties.tied_across_relevance(np.asarray(scores), h),
    }
    if out["tied"].any():
        # Only these rows' values depend on the order of tied items (few, unless the model collapsed):
        # their expectations replace the plain values.
        rows = np.flatnonzero(out["tied"])
        g = ties.groups(np.asarray(scores)[rows], h[rows])
        p_rel, ap_terms = ties.expected_terms(g)
        in_top_r = np.arange(h.shape[1])[None, :] < r[rows, None]
        out["map_at_r"][rows] = (ap_terms * in_top_r).sum(axis=1) / r[rows]  # a tied hit: R >= 1
        out["r_precision"][rows] = (p_rel * in_top_r).sum(axis=1) / r[rows]
        out[f"map_at_{map_k}"][rows] = ap_terms[:, : int(map_k)].sum(axis=1) / np.minimum(r[rows], int(map_k))
        out["first_hit"][rows], out["first_tied"][rows], out["first_tied_hits"][rows] = ties.first_group(g)
    return out


def concat(parts: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Chunks of :func:`per_query` -> one dict of ``(Q,)`` arrays, in chunk order."""
    if not parts:
        raise ValueError("no query chunks to concatenate")
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def summarize_per_query(values: dict[str, np.ndarray], recall_ks: Sequence[int], map_k: int) -> dict[str, float | int]:
    """Means over the queries with at least one relevant gallery item; see :func:`summarize`."""
    r = values["n_relevant"]
    keep = r > 0
    if not keep.any():
        raise ValueError(
            f"none of the {r.shape[0]} queries has a relevant item in the gallery; "
            "no retrieval metric is defined"
        )
    for kk in recall_ks:
        if isinstance(kk, bool) or not isinstance(kk, (int, np.integer)) or kk < 1:
            raise ValueError(f"every K in recall_ks must be a positive integer, got {kk!r}")
    first = tuple(values[key][keep] for key in ("first_hit", "first_tied", "first_tied_hits"))
    out: dict[str, float | int] = {
        "map_at_r": float(values["map_at_r"][keep].mean()),
        "r_precision": float(values["r_precision"][keep].mean()),
        f"map_at_{map_k}": float(values[f"map_at_{map_k}"][keep].mean()),
        "precision_at_1": float(ties.recall(*first, 1).mean()),
    }
    for kk in recall_ks:
        out[f"recall_at_{int(kk)}"] = float(ties.recall(*first, int(kk)).mean())
    out["n_queries"] = int(keep.shape[0])
    out["n_queries_without_relevant"] = int((~keep).sum())
    return out


def summarize(
    hits: np.ndarray, n_relevant: np.ndarray, recall_ks: Sequence[int], map_k: int
) -> dict[str, float | int]:
    """Mean of every metric over the queries with at least one relevant gallery item.

    Returns ``{"map_at_r", "r_precision", f"map_at_{map_k}", "precision_at_1",
    f"recall_at_{K}" for K in recall_ks, "n_queries", "n_queries_without_relevant"}``.
    ``n_queries`` is Q (all queries); ``n_queries_without_relevant`` those with R == 0 (a singleton
    class under leave-one-out, or a query class absent from the gallery), which are left out of
    every average — they have no right answer, so scoring them 0 would penalise the model for the
    data split (this matches pytorch-metric-learning's AccuracyCalculator, which drops such "lone"
    queries from all its k-NN metrics). Never NaN: raises ValueError if no query has a relevant
    item. Recall@K with K > k uses all k columns.
    """
    h = _check_hits(hits)
    r = _check_n_relevant(n_relevant, h)
    if (r > 0).any():
        return summarize_per_query(per_query(h, r, map_k), recall_ks, map_k)
    return summarize_per_query({"n_relevant": r}, recall_ks, map_k)  # raises: nothing to average
