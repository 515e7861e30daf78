"""Retrieval scoring: k-NN chunks (:mod:`tasks.search`) in, per-query metrics (:mod:`tasks.metrics`) out.

Protocols, all from the same three inputs (query labels, gallery labels, ``self_pos``):

* leave-one-out on one set — every query is in the gallery; it never retrieves itself and does not
  count itself as relevant (R = class size - 1; a singleton class has R = 0);
* separate query and gallery sets — ``self_pos`` all -1, R = the class's gallery count;
* queries whose class is absent from the gallery — R = 0: counted as
  ``n_queries_without_relevant`` and left out of the averages, never NaN.

Memory: per chunk ``(c, k)`` arrays; kept for all queries only ``(Q,)`` metric values and the first
``keep_top`` neighbours (for pictures), so 100k queries cost a few MB.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from tasks import metrics, ties
from tasks.search import Chunk


@dataclass(frozen=True)
class Retrieval:
    """values: per-query ``(Q,)`` arrays of :func:`tasks.metrics.per_query`;
    top_pos int64 (Q, t) / top_scores float32 (Q, t): the first t neighbours; hits bool (Q, t)."""

    values: dict[str, np.ndarray]
    top_pos: np.ndarray
    top_scores: np.ndarray
    top_hits: np.ndarray
    k: int


def label_codes(query_labels: np.ndarray, gallery_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels of any comparable dtype -> int64 codes (Q,), (G,); equal labels get equal codes,
    so relevance is an integer comparison (fast, and no object arrays per chunk)."""
    both = np.concatenate([np.asarray(gallery_labels), np.asarray(query_labels)])
    _, codes = np.unique(both, return_inverse=True)
    codes = codes.astype(np.int64).ravel()
    return codes[len(gallery_labels):], codes[: len(gallery_labels)]


def n_relevant(query_codes: np.ndarray, gallery_codes: np.ndarray, self_pos: np.ndarray) -> np.ndarray:
    """R per query (Q,): gallery items with the query's label, minus the query itself if it is in
    the gallery (``self_pos >= 0``). 0 for a class absent from the gallery."""
    size = int(max(query_codes.max(initial=-1), gallery_codes.max(initial=-1))) + 1
    counts = np.bincount(gallery_codes, minlength=size)
    return counts[query_codes] - (self_pos >= 0).astype(np.int64)


def needed_k(r: np.ndarray, n_gallery: int, *at_least: int) -> int:
    """The k every metric needs: max R (MAP@R and R-Precision look at the top R — a smaller k is
    the most common way to get a wrong MAP@R) and the largest K asked for, capped at the gallery."""
    return max(1, min(max((int(r.max(initial=1)), *at_least)), n_gallery))


def score(
    chunks: Iterable[Chunk],
    query_codes: np.ndarray,
    gallery_codes: np.ndarray,
    r: np.ndarray,
    map_k: int,
    keep_top: int = 0,
) -> Retrieval:
    """Reduce search chunks to per-query metrics. Every chunk needs k >= max R of its queries."""
    parts, tops, top_scores, top_hits, k = [], [], [], [], 0
    for ch in chunks:
        rows = slice(ch.start, ch.start + len(ch.pos))
        valid = ch.pos >= 0
        hits = valid & (gallery_codes[np.maximum(ch.pos, 0)] == query_codes[rows, None])
        parts.append(metrics.per_query(hits, r[rows], map_k, ch.scores))
        tops.append(ch.pos[:, :keep_top])
        top_scores.append(ch.scores[:, :keep_top])
        top_hits.append(hits[:, :keep_top])
        k = ch.pos.shape[1]
    if not parts:
        raise ValueError("no queries to score")
    return Retrieval(metrics.concat(parts), np.concatenate(tops), np.concatenate(top_scores), np.concatenate(top_hits), k)


def summary(ret: Retrieval, recall_ks: Sequence[int], map_k: int) -> dict[str, float | int]:
    """The averaged metrics (see :func:`tasks.metrics.summarize`) and ``n_queries_tied``: of the
    queries averaged, those with a relevant and a non-relevant item tied (:func:`tasks.ties.tied_across_relevance`)."""
    out = metrics.summarize_per_query(ret.values, recall_ks, map_k)
    return out | {"n_queries_tied": int((ret.values["tied"] & (ret.values["n_relevant"] > 0)).sum())}


def recall_curve(ret: Retrieval, max_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Recall@K for K = 1..max_k over the queries with R > 0 -> (ks, recall), each the expectation
    over the orders of tied neighbours, as in :func:`summary`."""
    keep = ret.values["n_relevant"] > 0
    first = tuple(ret.values[key][keep] for key in ("first_hit", "first_tied", "first_tied_hits"))
    ks = np.arange(1, max_k + 1)
    return ks, np.array([ties.recall(*first, int(kk)).mean() if len(first[0]) else 0.0 for kk in ks])
