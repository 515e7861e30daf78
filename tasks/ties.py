"""Tie-aware retrieval metrics: the expected value of each metric over every order of tied items.

Equal scores give no order: faiss returns tied neighbours in whatever order its scan met them,
our exact search by gallery position — and ingest orders rows by label, so a collapsed model (one
embedding for many classes) would score far above chance by row order alone. McSherry & Najork,
"Computing Information Retrieval Performance Measures Efficiently in the Presence of Tied Scores",
ECIR 2008: average each metric over all orders of the tied items, which needs no enumeration.

Within a *tie group* (a run of equal scores, positions ``s .. s+n-1`` of a ranking, ``h`` of its
``n`` items relevant, ``c`` relevant items ranked before it), every order is equally likely, so
at a position ``i = s + t`` of the group:

* ``E[rel(i)] = h / n``;
* ``E[rel(i) · hits in the top i+1] = h/n · (1 + c + t·(h-1)/(n-1))`` — the ``t`` group positions
  before ``i`` hold a relevant item, given ``i`` does, with probability ``(h-1)/(n-1)``.

Sums of these over ranks are linear, so MAP@R, R-Precision and AP@k are exact expectations even
when the cut (R or k) falls inside a group. Recall@K needs the first tie group holding a hit
(start ``f``, size ``n``, ``h`` hits): ``P(no hit in the top K) = C(n-h, m) / C(n, m)`` with
``m = K - f`` of its positions inside the top K. Without ties (every ``n = 1``) each value is the
plain metric of :mod:`tasks.metrics`.

Only the neighbours searched are seen: a group running past the last column is taken to end there.
Classification by the nearest item or prototype (few-shot, one-shot) is scored the same way
(:func:`argmax_hit`). Numpy only, ``(c, k)`` arrays.
"""

from __future__ import annotations

import numpy as np


def tied_across_relevance(scores: np.ndarray, hits: np.ndarray) -> np.ndarray:
    """bool (c,): the query's neighbour list (scores (c, k), best first; hits (c, k)) holds equal
    scores for a relevant and a non-relevant item. Equal scores sit side by side, so one adjacent
    pair shows it. Only these rows need :func:`groups`: a group of hits only (or misses only)
    gives the same ranking in every order. Only the k neighbours searched are seen: a list of
    misses tied with relevant items past the k-th is not flagged, so a count of these rows is a
    lower bound."""
    return ((scores[:, 1:] == scores[:, :-1]) & (hits[:, 1:] != hits[:, :-1])).any(axis=1)


def groups(scores: np.ndarray, hits: np.ndarray) -> dict[str, np.ndarray]:
    """Tie groups of each ranking: scores float ``(c, k)`` (best first, equal values adjacent, NaN
    where a slot is empty — NaN equals nothing, so never ties) and hits bool ``(c, k)``.

    Returns int64 ``(c, k)`` arrays for each position: ``start`` (0-based column of its group's
    first item), ``size`` (n), ``hits`` (h, relevant items in its group) and ``before`` (c,
    relevant items ranked before its group)."""
    s, h = np.asarray(scores), np.asarray(hits, dtype=bool)
    if s.shape != h.shape or s.ndim != 2:
        raise ValueError(f"scores {s.shape} and hits {h.shape} must be the same (c, k) shape")
    c, k = s.shape
    col = np.broadcast_to(np.arange(k), (c, k))
    opens = np.ones((c, k), dtype=bool)
    opens[:, 1:] = s[:, 1:] != s[:, :-1]
    closes = np.ones((c, k), dtype=bool)
    closes[:, :-1] = opens[:, 1:]
    start = np.maximum.accumulate(np.where(opens, col, 0), axis=1)
    end = np.minimum.accumulate(np.where(closes, col, k - 1)[:, ::-1], axis=1)[:, ::-1]
    upto = np.cumsum(h, axis=1)  # hits in columns 0..j
    before = np.take_along_axis(upto - h, start, axis=1)
    return {"start": start, "size": end - start + 1, "hits": np.take_along_axis(upto, end, axis=1) - before,
            "before": before}


def expected_terms(g: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """float64 ``(c, k)``: ``E[rel(i)]`` and ``E[P(i) · rel(i)]`` (precision at rank i + 1 times
    relevance) at each 0-based position i, over the orders of each tie group (:func:`groups`)."""
    n, h = g["size"], g["hits"]
    p_rel = h / n
    t = np.arange(n.shape[1])[None, :] - g["start"]
    # n == 1 has t == 0: the second factor's value there does not matter, only that it is finite.
    same_group = t * (h - 1) / np.maximum(n - 1, 1)
    ranks = np.arange(1, n.shape[1] + 1, dtype=np.float64)[None, :]
    return p_rel, p_rel * (1 + g["before"] + same_group) / ranks


def first_group(g: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """int64 ``(c,)`` each: start of the first tie group holding a hit (-1 if none), its size n and
    its hits h (1 and 1 where there is none, so :func:`recall` needs no special case)."""
    has = g["hits"] > 0
    found = has.any(axis=1)
    first = has.argmax(axis=1)
    take = lambda a: np.where(found, np.take_along_axis(a, first[:, None], axis=1)[:, 0], 1)  # noqa: E731
    return np.where(found, first, -1).astype(np.int64), take(g["size"]).astype(np.int64), take(g["hits"]).astype(np.int64)


def recall(first: np.ndarray, size: np.ndarray, hits: np.ndarray, k: int) -> np.ndarray:
    """Expected Recall@k, float64 ``(c,)``, from :func:`first_group`'s arrays: 1 - the chance that
    the ``m = k - first`` group positions inside the top k all hold misses,
    ``C(n-h, m) / C(n, m)`` — from a table of log-factorials, so O(1) per query whatever n."""
    m = np.clip(k - first, 0, size)
    rest = size - hits - m  # misses left over once m are drawn; < 0: a hit must be among them
    lf = _log_factorials(int(size.max(initial=1)))
    log_miss = lf[np.maximum(size - hits, 0)] - lf[np.maximum(rest, 0)] - lf[size] + lf[size - m]
    return np.where((first >= 0) & (rest >= 0), -np.expm1(log_miss), np.where(first >= 0, 1.0, 0.0))  # 1 - miss, exact near 0


def _log_factorials(n: int) -> np.ndarray:
    """float64 (n + 1,): log(i!) for i = 0..n."""
    return np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, n + 1, dtype=np.float64)))])


def argmax_hit(score: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """float64 ``(c,)``: the chance that ``argmax`` of each row of ``score`` (c, n) is ``truth``
    (c,) when tied maxima are drawn at random — 1 / (number of tied maxima) where the truth is one
    of them, else 0. A classification accuracy with no tie-break to favour any class."""
    s = np.asarray(score)
    top = s == s.max(axis=1, keepdims=True)
    right = np.take_along_axis(top, np.asarray(truth)[:, None], axis=1)[:, 0]
    return np.where(right, 1.0 / np.maximum(top.sum(axis=1), 1), 0.0)
