"""k-nearest-neighbour search in query chunks: exact (matmul + top-k, torch) or through a faiss index.

Both engines yield :class:`Chunk` s — the top-``k`` gallery positions and scores of a contiguous
run of queries — so callers reduce metrics chunk by chunk and memory never depends on Q × G.

Exact search (:func:`exact_chunks`) multiplies a chunk of queries by a block of the gallery, keeps
each block's top-k set (a group-max pre-selection makes that far cheaper than a top-k over every
score, see :func:`_block_topk`) and ranks their union once per chunk. Memory: one
``query_chunk × gallery_block`` float32 tile (two for L2 leave-one-out) plus ``(Q, k)``-sized
candidate lists. It runs in float32 on the CPU or on CUDA (TF32 is switched off for the call, so
GPU scores are fp32 too). Leave-one-out on one set uses each tile twice (the score matrix is
symmetric), halving the products.

Scores are "higher is more similar": the inner product for ``inner_product``, the *negative squared*
L2 distance for ``l2`` (faiss reports the positive squared distance; we negate it so one ordering
serves both).

**Ties** are broken deterministically: equal scores are ranked by gallery position, lower first,
including at the k-th cut (rows whose k-th and (k+1)-th scores are equal inside a block are re-ranked
with a full stable sort), so the result does not depend on block sizes. "Equal" means equal as
computed in fp32: BLAS does not promise that two duplicate gallery vectors get bit-identical dot
products when they fall at different places in a tile, so near-exact duplicates may come out in
either order. The faiss path inherits faiss's order, deterministic for a given index.

**Leave-one-out**: ``self_pos[i]`` is the gallery position of query i (or -1 when the query is not in
the gallery); that one score is set to -inf before the top-k, so the query never retrieves itself,
even when a duplicate scores exactly as high.

Slots with no result (gallery smaller than k, or an approximate index that returned fewer) have
position -1 and score NaN.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch


METRICS = ("inner_product", "l2")


@dataclass(frozen=True)
class Chunk:
    """The neighbours of queries ``start .. start + len(pos)``.

    pos int64 (c, k): gallery positions, best first, -1 = no result;
    scores float32 (c, k): higher = more similar, NaN where pos == -1.
    """

    start: int
    pos: np.ndarray
    scores: np.ndarray


@contextmanager
def _fp32_matmul() -> Iterator[None]:
    """Exact fp32 products on CUDA too (TF32 would round inputs to 10 mantissa bits)."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def _scores(q: torch.Tensor, g: torch.Tensor, gh: torch.Tensor | None) -> torch.Tensor:
    """(c, D) × (b, D) -> (c, b) ranking scores: q·g, or for L2 ``q·g - |g|²/2`` (``gh`` = |g|²/2).

    ``-|q - g|² = 2 (q·g - |g|²/2) - |q|²``: ``|q|²`` is the same along a query's row and the factor
    2 is exact, so this ranks like -|q - g|²; :func:`_finish` converts the k kept scores. One BLAS
    call (addmm: -|g|²/2 broadcast, then += q·g) instead of extra passes over the tile.
    """
    if gh is None:
        return q @ g.T
    return torch.addmm(gh[None, :].neg().expand(len(q), -1), q, g.T)


GROUP = 16  # columns per group for the group-max pre-selection in _block_topk


def _block_topk(s: torch.Tensor, k: int, col0: int, along_rows: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-``k`` *set* of each row of a score tile ``s`` (c, b) — or, ``along_rows=False``, of
    each row of ``s.T`` (without copying it) — under the order (score desc, column asc).

    Returns values (n, k') and global positions (n, k'), k' = min(k, L), not yet ordered
    (:func:`_rank` orders the union of all blocks once). -inf values are excluded slots.

    Pre-selection (exact, and much cheaper than a top-k over every score): split each row into
    groups of GROUP consecutive columns and take each group's max (one fast reduction pass). If
    the k-th largest group max is strictly above the (k+1)-th, every one of the row's top k scores
    lies in those k groups — each of the k groups holds a score >= the k-th group max, so the k-th
    best score is >= it, while every score outside is <= the (k+1)-th group max — so the top-k is
    taken among those k × GROUP candidates only. Rows where the cut is tied (group maxima, or
    candidate scores) are re-ranked over the whole block with a stable sort: lowest column wins.
    """
    m = s if along_rows else s.T  # (n, L): what is ranked along dim 1
    n, length = m.shape
    kk = min(k + 1, length)  # one more than needed: tells whether the k-th place is tied
    groups = length // GROUP
    if length % GROUP or groups <= k + 1:
        vals, idx = m.topk(kk, dim=1, largest=True, sorted=True)
        tied = torch.zeros(n, dtype=torch.bool, device=s.device)
    else:
        gm = s.view(n, groups, GROUP).amax(2) if along_rows else s.view(groups, GROUP, n).amax(1).T.contiguous()
        gv, gi = gm.topk(k + 1, dim=1, sorted=True)
        cols = (gi[:, :k, None] * GROUP + torch.arange(GROUP, device=s.device)).reshape(n, k * GROUP)
        vals, sel = m.gather(1, cols).topk(kk, dim=1, largest=True, sorted=True)
        idx = cols.gather(1, sel)
        tied = ~(gv[:, k - 1] > gv[:, k])
    if kk > k:
        tied |= (vals[:, k - 1] == vals[:, k]) & torch.isfinite(vals[:, k])
        if bool(tied.any()):
            rows = tied.nonzero().squeeze(1)
            v, i = m[rows].sort(dim=1, descending=True, stable=True)
            vals[rows], idx[rows] = v[:, :kk], i[:, :kk]
        vals, idx = vals[:, :k], idx[:, :k]
    return vals, idx + col0


def _rank(vals: list[torch.Tensor], idx: list[torch.Tensor], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Union of per-block top-k sets -> the top ``k`` ranked by (score desc, position asc).

    Positions are unique within a row, so sorting by position and then *stably* by score puts equal
    scores in position order. Correct because the global top-k under that order is the top-k of
    the union of every block's top-k set.
    """
    v, i = torch.cat(vals, dim=1), torch.cat(idx, dim=1)
    i, order = i.sort(dim=1)
    v, order = v.gather(1, order).sort(dim=1, descending=True, stable=True)
    return v[:, :k], i.gather(1, order)[:, :k]


class _Candidates:
    """Per-block top-k sets of one chunk of queries, ranked once (every ``every`` blocks, to bound
    memory at ``every × k`` candidates per query)."""

    def __init__(self, k: int, every: int = 16):
        self.k, self.every, self.vals, self.idx = k, every, [], []

    def add(self, v: torch.Tensor, i: torch.Tensor) -> None:
        self.vals.append(v)
        self.idx.append(i)
        if len(self.vals) > self.every:
            v, i = _rank(self.vals, self.idx, self.k)
            self.vals, self.idx = [v], [i]

    def result(self, rows: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.vals:  # empty gallery
            return torch.full((rows, 0), -torch.inf, device=device), torch.zeros((rows, 0), dtype=torch.int64, device=device)
        return _rank(self.vals, self.idx, self.k)


def _finish(start: int, v: torch.Tensor, i: torch.Tensor, k: int, qn: torch.Tensor | None = None) -> Chunk:
    """-> numpy Chunk padded to k columns; -inf (excluded / missing) -> position -1, score NaN.
    ``qn`` (c,): squared query norms, to turn L2 ranking scores (see :func:`_scores`) into -|q - g|²."""
    if qn is not None:
        v = 2 * v - qn[:, None]
    v, i = v.float().cpu().numpy(), i.cpu().numpy().astype(np.int64)
    missing = ~np.isfinite(v)
    i[missing], v[missing] = -1, np.nan
    if v.shape[1] < k:
        pad = ((0, 0), (0, k - v.shape[1]))
        v, i = np.pad(v, pad, constant_values=np.nan), np.pad(i, pad, constant_values=-1)
    return Chunk(start, i, v.astype(np.float32, copy=False))


def _check(queries: np.ndarray, gallery: np.ndarray, k: int, metric: str, self_pos: np.ndarray | None) -> None:
    if queries.ndim != 2 or gallery.ndim != 2 or queries.shape[1] != gallery.shape[1]:
        raise ValueError(f"queries (Q, D) and gallery (G, D) must share D, got {queries.shape} and {gallery.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if self_pos is not None and self_pos.shape != (queries.shape[0],):
        raise ValueError(f"self_pos must be (Q,) = ({queries.shape[0]},), got {self_pos.shape}")


def exact_chunks(
    queries: np.ndarray,
    gallery: np.ndarray,
    k: int,
    metric: str = "inner_product",
    self_pos: np.ndarray | None = None,
    device: torch.device | str = "cpu",
    query_chunk: int = 4096,
    gallery_block: int = 16384,
) -> Iterator[Chunk]:
    """Exact top-``k`` of every query over the gallery, one :class:`Chunk` per ``query_chunk`` queries.

    queries float32 (Q, D), gallery float32 (G, D), self_pos int64 (Q,) or None (see module doc).
    When queries and gallery are the same set (``self_pos == arange(Q)``, Q == G: leave-one-out on
    one set), each tile is computed once and used for both of its query blocks — the score matrix
    is symmetric — which halves the matrix products.
    """
    _check(queries, gallery, k, metric, self_pos)
    device = torch.device(device)
    q_all = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
    g_all = torch.from_numpy(np.ascontiguousarray(gallery, dtype=np.float32)).to(device)
    gn = (g_all * g_all).sum(1) / 2 if metric == "l2" else None  # |g|²/2, see _scores
    sp = None if self_pos is None else torch.from_numpy(np.asarray(self_pos, dtype=np.int64))
    symmetric = (
        sp is not None and len(queries) == len(gallery) and bool((sp == torch.arange(len(sp))).all())
        and (queries is gallery or np.array_equal(queries, gallery))
    )
    def steps() -> Iterator[Chunk]:
        if symmetric:
            yield from _symmetric(g_all, k, gn, device, query_chunk)
            return
        for start in range(0, len(q_all), query_chunk):
            q = q_all[start : start + query_chunk].to(device)
            s_pos = None if sp is None else sp[start : start + len(q)].to(device)
            cand = _Candidates(k)
            for col0 in range(0, len(g_all), gallery_block):
                s = _scores(q, g_all[col0 : col0 + gallery_block], None if gn is None else gn[col0 : col0 + gallery_block])
                if s_pos is not None:
                    local = s_pos - col0
                    rows = ((local >= 0) & (local < s.shape[1])).nonzero().squeeze(1)
                    s[rows, local[rows]] = -torch.inf
                cand.add(*_block_topk(s, k, col0))
            yield _finish(start, *cand.result(len(q), device), k, None if gn is None else (q * q).sum(1))

    yield from _scoped(steps())


def _scoped(gen: Iterator[Chunk]) -> Iterator[Chunk]:
    """Each step of ``gen`` under exact fp32 matmuls and inference mode — but not the caller's code
    between steps (a context held across ``yield`` would leak both into it)."""
    while True:
        with _fp32_matmul(), torch.inference_mode():
            try:
                chunk = next(gen)
            except StopIteration:
                return
        yield chunk


def _symmetric(x: torch.Tensor, k: int, xh: torch.Tensor | None, device: torch.device, b: int) -> Iterator[Chunk]:
    """Leave-one-out on one set x (N, D): tile (i, j), j >= i, serves rows of block i directly and
    rows of block j through its transpose, so each product is computed once. ``xh`` = |x|²/2 (L2).

    For L2 both directions are made from the same product tile P = x_i·x_jᵀ by one pass each
    (``P - |x_b|²/2`` for block i's rows, ``P - |x_a|²/2`` read column-wise for block j's), so
    equal distances stay exactly equal whichever side of the tile they come from.
    """
    n = len(x)
    starts = list(range(0, n, b))
    pending = {bj: _Candidates(k) for bj in range(len(starts))}
    for bi, r0 in enumerate(starts):
        xi = x[r0 : r0 + b]
        cand = pending.pop(bi)
        for bj in range(bi, len(starts)):
            c0 = starts[bj]
            p = xi @ x[c0 : c0 + b].T
            s = p if xh is None else torch.sub(p, xh[c0 : c0 + b][None, :])
            if bj == bi:
                s.fill_diagonal_(-torch.inf)  # the query itself
            cand.add(*_block_topk(s, k, c0))
            if bj > bi:  # the same tile seen from block j's queries: gallery rows of block i
                t = p if xh is None else p.sub_(xh[r0 : r0 + b][:, None])
                pending[bj].add(*_block_topk(t, k, r0, along_rows=False))
        yield _finish(r0, *cand.result(len(xi), device), k, None if xh is None else 2 * xh[r0 : r0 + b])


def index_chunks(
    index, queries: np.ndarray, k: int, self_pos: np.ndarray | None = None, query_chunk: int = 4096, negate: bool = False
) -> Iterator[Chunk]:
    """Top-``k`` through a faiss index, one :class:`Chunk` per ``query_chunk`` queries.

    Searches k + 1 when queries may be in the gallery and drops each query's own position where
    found (else the last column), so every query gets k candidates. ``negate``: the index reports
    distances (L2), turn them into "higher is more similar" scores.
    """
    k_search = min(k + (0 if self_pos is None else 1), index.ntotal)
    for start in range(0, len(queries), query_chunk):
        q = np.ascontiguousarray(queries[start : start + query_chunk], dtype=np.float32)
        if k_search == 0:
            yield _finish(start, torch.full((len(q), 0), -torch.inf), torch.zeros((len(q), 0), dtype=torch.int64), k)
            continue
        scores, pos = index.search(q, k_search)
        scores = -scores if negate else scores
        if self_pos is not None:
            is_self = (pos >= 0) & (pos == self_pos[start : start + len(q), None])
            # Stable sort on the self flag moves the self match to the end, the rest keep their order.
            order = np.argsort(is_self, axis=1, kind="stable")
            pos, scores = np.take_along_axis(pos, order, 1), np.take_along_axis(scores, order, 1)
            moved = np.take_along_axis(is_self, order, 1)
            pos[moved], scores[moved] = -1, -np.inf  # the whole gallery fit in k: blank self out
            pos, scores = pos[:, :k], scores[:, :k]
        scores = np.where(pos >= 0, scores, -np.inf).astype(np.float32)
        yield _finish(start, torch.from_numpy(scores), torch.from_numpy(pos), k)
