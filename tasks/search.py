"""k-nearest-neighbour search in query chunks: exact (matmul + top-k, torch) or through a faiss index.

Both engines yield :class:`Chunk` s — the top-``k`` gallery positions and scores of a contiguous
run of queries — so callers reduce metrics chunk by chunk and memory never depends on Q × G.

Exact search (:func:`exact_chunks`) multiplies a chunk of queries by a block of the gallery, keeps
each block's top-k and merges it into a running top-k. Memory: one ``query_chunk × gallery_block``
float32 tile (plus, in the symmetric leave-one-out case, its transpose and a ``(Q, k)`` running
result). It runs in float32 on the CPU or on CUDA (``torch.backends.cuda.matmul.allow_tf32`` is
switched off for the call, so GPU scores are fp32 too).

Scores are "higher is more similar": the inner product for ``inner_product``, the *negative squared*
L2 distance for ``l2`` (faiss reports the positive squared distance; we negate it so one ordering
serves both).

**Ties** are broken deterministically: equal scores are ranked by gallery position, lower first,
including at the k-th cut (rows whose k-th and (k+1)-th scores are equal inside a block are re-ranked
with a full stable sort). So results do not depend on the block sizes. The faiss path inherits
faiss's own order, which is deterministic for a given index but not specified for ties.

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

from tasks.errors import ParamsError

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


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA when present, else the CPU; ``cuda`` without CUDA is a ParamsError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ParamsError(f"device {name!r} asked for, but CUDA is not available here")
    return torch.device(name)


@contextmanager
def _fp32_matmul() -> Iterator[None]:
    """Exact fp32 products on CUDA too (TF32 would round inputs to 10 mantissa bits)."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def _scores(q: torch.Tensor, g: torch.Tensor, qn: torch.Tensor | None, gn: torch.Tensor | None) -> torch.Tensor:
    """(c, D) × (b, D) -> (c, b) scores: inner product, or -squared L2 when norms are given."""
    s = q @ g.T
    if qn is not None:
        # -(|q|² + |g|² - 2 q·g), the same expansion faiss's IndexFlatL2 uses.
        s.mul_(2).sub_(qn[:, None]).sub_(gn[None, :])
    return s


def _block_topk(s: torch.Tensor, k: int, col0: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` of each row of a score tile ``s`` (c, b), ranked (score desc, column asc).

    Returns values (c, k') and global positions (c, k') with k' = min(k, b); -inf values are
    excluded slots (the caller turns them into -1).
    """
    b = s.shape[1]
    kk = min(k + 1, b)  # one more than needed: tells whether the k-th place is tied
    vals, idx = s.topk(kk, dim=1, largest=True, sorted=False)
    # Within the kept candidates: order by column, then stable sort by score -> ties by position.
    idx, order = idx.sort(dim=1)
    vals = vals.gather(1, order)
    vals, order = vals.sort(dim=1, descending=True, stable=True)
    idx = idx.gather(1, order)
    if kk > k:
        # A tie across the k-th cut means topk may have kept an arbitrary one of the tied items;
        # re-rank those (rare) rows over the whole block with a stable sort: lowest column wins.
        tied = (vals[:, k - 1] == vals[:, k]) & torch.isfinite(vals[:, k])
        if bool(tied.any()):
            rows = tied.nonzero().squeeze(1)
            v, i = s[rows].sort(dim=1, descending=True, stable=True)
            vals[rows], idx[rows] = v[:, :kk], i[:, :kk]
        vals, idx = vals[:, :k], idx[:, :k]
    return vals, idx + col0


def _merge(best_v, best_i, new_v, new_i, k: int):
    """Merge two ranked lists whose ties are already by position and where ``best`` holds lower
    positions than ``new``: a stable sort keeps that order for equal scores."""
    if best_v is None:
        return new_v, new_i
    v = torch.cat([best_v, new_v], dim=1)
    i = torch.cat([best_i, new_i], dim=1)
    v, order = v.sort(dim=1, descending=True, stable=True)
    return v[:, :k], i.gather(1, order)[:, :k]


def _finish(start: int, v: torch.Tensor, i: torch.Tensor, k: int) -> Chunk:
    """-> numpy Chunk padded to k columns; -inf (excluded / missing) -> position -1, score NaN."""
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
    l2 = metric == "l2"
    gn = (g_all * g_all).sum(1) if l2 else None
    sp = None if self_pos is None else torch.from_numpy(np.asarray(self_pos, dtype=np.int64))
    symmetric = (
        sp is not None and len(queries) == len(gallery) and bool((sp == torch.arange(len(sp))).all())
        and (queries is gallery or np.array_equal(queries, gallery))
    )
    with _fp32_matmul(), torch.inference_mode():
        if symmetric:
            yield from _symmetric(g_all, k, gn, device, query_chunk)
            return
        for start in range(0, len(q_all), query_chunk):
            q = q_all[start : start + query_chunk].to(device)
            qn = (q * q).sum(1) if l2 else None
            s_pos = None if sp is None else sp[start : start + len(q)].to(device)
            best_v = best_i = None
            for col0 in range(0, len(g_all), gallery_block):
                s = _scores(q, g_all[col0 : col0 + gallery_block], qn, None if gn is None else gn[col0 : col0 + gallery_block])
                if s_pos is not None:
                    local = s_pos - col0
                    inside = (local >= 0) & (local < s.shape[1])
                    rows = inside.nonzero().squeeze(1)
                    s[rows, local[rows]] = -torch.inf
                v, i = _block_topk(s, k, col0)
                best_v, best_i = _merge(best_v, best_i, v, i, k)
            if best_v is None:  # empty gallery
                best_v = torch.full((len(q), 0), -torch.inf)
                best_i = torch.zeros((len(q), 0), dtype=torch.int64)
            yield _finish(start, best_v, best_i, k)


def _symmetric(x: torch.Tensor, k: int, xn: torch.Tensor | None, device: torch.device, b: int) -> Iterator[Chunk]:
    """Leave-one-out on one set x (N, D): tile (i, j), j >= i, serves rows of block i directly and
    rows of block j through its transpose. Block j's gallery columns arrive in increasing order
    (tiles (0, j) .. (j-1, j) transposed, then (j, j) .. (j, n-1)), as :func:`_merge` needs."""
    n = len(x)
    starts = list(range(0, n, b))
    pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for bi, r0 in enumerate(starts):
        xi = x[r0 : r0 + b]
        ni = None if xn is None else xn[r0 : r0 + b]
        best_v, best_i = pending.pop(bi, (None, None))
        for bj in range(bi, len(starts)):
            c0 = starts[bj]
            s = _scores(xi, x[c0 : c0 + b], ni, None if xn is None else xn[c0 : c0 + b])
            if bj == bi:
                s.fill_diagonal_(-torch.inf)  # the query itself
            v, i = _block_topk(s, k, c0)
            best_v, best_i = _merge(best_v, best_i, v, i, k)
            if bj > bi:  # the same tile, seen from block j's queries: gallery columns of block i
                pv, pi = pending.get(bj, (None, None))
                tv, ti = _block_topk(s.T.contiguous(), k, r0)
                pending[bj] = _merge(pv, pi, tv, ti, k)
        yield _finish(r0, best_v, best_i, k)


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
