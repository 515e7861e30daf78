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

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from tasks import metrics, ties
from tasks.search import Chunk, Research


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
    research: Research | None = None,
) -> Retrieval:
    """Reduce search chunks to per-query metrics. Every chunk needs k >= max R of its queries.

    With ``research``, chunks carry one spare column past the k the metrics need: a row whose last
    two scores are equal has a tie group that may run on past it, and which of its items made the
    cut was the tie-break's choice. Such rows are searched again, ``GROW`` times wider each time,
    until their last group closes (or ``MAX_WIDTH``, or the whole gallery), so the tie-aware
    metrics see every item of every group they average over (:func:`_closed`)."""
    parts, tops, top_scores, top_hits, k = [], [], [], [], 0
    for ch in chunks:
        rows = slice(ch.start, ch.start + len(ch.pos))
        hits = _hits(ch.pos, query_codes[rows], gallery_codes)
        values = metrics.per_query(hits, r[rows], map_k, ch.scores)
        if research is not None:
            # One wider search at least, however wide the first (k past MAX_WIDTH: R or a K that large).
            for local, wide in _closed(ch, research, min(len(gallery_codes), max(MAX_WIDTH, GROW * ch.pos.shape[1]))):
                again = metrics.per_query(_hits(wide.pos, query_codes[rows][local], gallery_codes), r[rows][local], map_k, wide.scores)
                for key, v in again.items():
                    values[key][local] = v
        parts.append(values)
        tops.append(ch.pos[:, :keep_top])
        top_scores.append(ch.scores[:, :keep_top])
        top_hits.append(hits[:, :keep_top])
        k = ch.pos.shape[1]
    if not parts:
        raise ValueError("no queries to score")
    return Retrieval(metrics.concat(parts), np.concatenate(tops), np.concatenate(top_scores), np.concatenate(top_hits), k)


# A re-search grows by GROW (few rounds, and at most GROW× the width it needed) and holds at most
# CELLS neighbours at a time (~200 MB with the metrics' (rows, width) arrays); MAX_WIDTH bounds the
# work a collapsed model (every item tied) costs: a group still open there is scored from the part
# the widest search lists (_with_group).
GROW, CELLS, MAX_WIDTH = 8, 1 << 21, 1 << 12
# Warn above this share of tied queries: a few exact ties happen (near-duplicate images); many
# mean the model (or the index) no longer tells those items apart.
TIED_WARN = 0.01


def _hits(pos: np.ndarray, query_codes: np.ndarray, gallery_codes: np.ndarray) -> np.ndarray:
    """bool (c, w): neighbour j of query i is relevant (a real result with the query's label)."""
    return (pos >= 0) & (gallery_codes[np.maximum(pos, 0)] == query_codes[:, None])


def _open(scores: np.ndarray) -> np.ndarray:
    """bool (c,): the last two columns tie (NaN, an empty slot, ties nothing): the last group may
    run on past the columns searched."""
    return scores[:, -1] == scores[:, -2] if scores.shape[1] >= 2 else np.zeros(len(scores), bool)


def _closed(ch: Chunk, research: Research, limit: int) -> Iterator[tuple[np.ndarray, Chunk]]:
    """(local rows, their neighbour lists with the last tie group whole) for every open row of
    ``ch``: searched ``GROW``× wider until the group's score is no longer the last column's (or the
    width reaches ``limit``: then the group as far as it was seen)."""
    rows, width = np.flatnonzero(_open(ch.scores)), ch.pos.shape[1]
    while rows.size and width < limit:
        width, still = min(width * GROW, limit), []
        step = max(1, CELLS // width)  # rows per wider search: CELLS neighbours at most
        for b in range(0, len(rows), step):
            local = rows[b : b + step]
            wide = research(ch.start + local, width)
            # The group's score as the wider search computes it: another tiling (leave-one-out's
            # symmetric pass against a plain one) may round the same dot product another way.
            # Not listed (a cut group drawn at random, an approximate index): at the widest search
            # its last column is the group's, else the first pass's value is all there is.
            same = wide.pos == ch.pos[local, -1:]
            fallback = wide.scores[:, -1] if width >= limit else ch.scores[local, -1]
            value = np.where(same.any(axis=1), wide.scores[np.arange(len(local)), same.argmax(axis=1)], fallback)
            cut = (wide.scores[:, -1] == value) & (width >= limit)
            done = (wide.scores[:, -1] != value) | cut
            if done.any():
                yield local[done], _with_group(ch, local[done], Chunk(0, wide.pos[done], wide.scores[done]), value[done], cut[done])
            still.append(local[~done])
        rows = np.concatenate(still)


def _with_group(ch: Chunk, local: np.ndarray, wide: Chunk, value: np.ndarray, cut: np.ndarray) -> Chunk:
    """Rows ``local`` of ``ch`` as searched up to their last tie group, then that group whole: its
    items in ``ch`` and every other item that ``wide`` (the same rows searched wider) scores
    ``value`` (c,), the group's score there. Only the group is taken from the wider search — an
    approximate index may find other neighbours when asked for more (HNSW searches
    max(efSearch, k)), and the metrics must be those of the search as deployed; an item ``ch``
    ranked before the group stays there, whatever ``wide`` scores it. Where the group was ``cut``
    (c,) at the widest search, only ``wide``'s part of it: a random draw from the group when the
    research shuffles the gallery (:func:`tasks.search.exact_research`), which ``ch``'s lowest
    positions are not. (c, w) arrays padded with -1 / NaN."""
    pos, scores = [], []
    for i, row in enumerate(local):
        s, v = ch.scores[row], ch.scores[row, -1]
        start = len(s) - int(np.argmin(s[::-1] == v)) if (s != v).any() else 0  # first column of the last group
        found = wide.pos[i][wide.scores[i] == value[i]]
        found = found[~np.isin(found, ch.pos[row, :start])]
        group = np.sort(found if cut[i] else np.concatenate([ch.pos[row, start:], found]))
        group = group[np.r_[True, group[1:] != group[:-1]]]  # each item once (np.union1d hashes: 5x slower here)
        if start + len(group) < len(s):  # found less than the first pass showed: keep that
            pos.append(ch.pos[row])
            scores.append(s)
            continue
        pos.append(np.concatenate([ch.pos[row, :start], group]))
        scores.append(np.concatenate([s[:start], np.full(len(group), v, np.float32)]))
    w = max(map(len, pos), default=0)
    return Chunk(0, np.array([np.pad(p, (0, w - len(p)), constant_values=-1) for p in pos], np.int64).reshape(len(pos), w),
                 np.array([np.pad(x, (0, w - len(x)), constant_values=np.nan) for x in scores], np.float32).reshape(len(pos), w))


def summary(ret: Retrieval, recall_ks: Sequence[int], map_k: int) -> dict[str, float | int]:
    """The averaged metrics (see :func:`tasks.metrics.summarize`) and ``n_queries_tied``: of the
    queries averaged, those with a relevant and a non-relevant item tied (:func:`tasks.ties.tied_across_relevance`)."""
    out = metrics.summarize_per_query(ret.values, recall_ks, map_k)
    return out | {"n_queries_tied": int((ret.values["tied"] & (ret.values["n_relevant"] > 0)).sum())}


def tied_warning(result: dict[str, float | int]) -> str | None:
    """What to tell a user when over TIED_WARN of the answered queries in ``result`` (a
    :func:`summary`) have a tie across relevance; None below it."""
    answered = result["n_queries"] - result["n_queries_without_relevant"]
    if result["n_queries_tied"] <= TIED_WARN * answered:
        return None
    return (f"for {result['n_queries_tied']:,} of {answered:,} queries a relevant and a non-relevant item score exactly "
            "alike: the model (or index) cannot tell them apart, and their metrics are the chance of a random order there "
            "(identical embeddings: a collapsed model, duplicate images, or a coarse PQ index)")


def recall_curve(ret: Retrieval, max_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Recall@K for K = 1..max_k over the queries with R > 0 -> (ks, recall), each the expectation
    over the orders of tied neighbours, as in :func:`summary`."""
    keep = ret.values["n_relevant"] > 0
    first, size, hits = (ret.values[key][keep] for key in ("first_hit", "first_tied", "first_tied_hits"))
    ks = np.arange(1, max_k + 1)
    # A first hit without a tie counts from its rank on: a cumulative histogram. Only queries whose
    # first hit is tied need the expectation, K by K.
    plain = (size == 1) & (first >= 0)
    found = np.cumsum(np.bincount(first[plain & (first < max_k)], minlength=max_k)).astype(np.float64)
    tied = (size > 1) & (first >= 0)
    if tied.any():
        found += [ties.recall(first[tied], size[tied], hits[tied], int(kk)).sum() for kk in ks]
    return ks, found / max(len(first), 1)
