"""k-nearest-neighbour search in query chunks: exact (matmul + top-k, torch) or through a faiss index.

Both engines yield :class:`Chunk` s — the top-``k`` gallery positions and scores of a contiguous
run of queries — so callers reduce metrics chunk by chunk and memory never depends on Q × G.

Exact search (:func:`exact_chunks`) multiplies a chunk of queries by a block of the gallery and
selects from each score tile as it comes. On the CPU every query keeps a running heap, fed by one
fused pass over the tile (:mod:`tasks.topk_heap`, numba). On CUDA each block's top-k set is kept
(a group-max pre-selection makes that far cheaper than a top-k over every score, see
:func:`tasks.block_topk.block_topk`) and their union ranked once per chunk. Memory: one ``query_chunk ×
gallery_block`` tile (two for L2 leave-one-out) plus ``(Q, k)``-sized candidate lists. Scores are
float32 on both (TF32 is switched off for the call, so GPU scores are fp32 too). Leave-one-out on
one set uses each tile twice (the score matrix is symmetric), halving the products.

**bf16 candidates, fp32 answer** (CPU, inner product, where the CPU multiplies bf16 natively —
~3× the fp32 rate): tiles are bf16 products, each query keeps its k + BF16_SPARE best by those, and
the candidates are re-scored in fp32. A proven bound on the bf16 error certifies, row by row, that
nothing left out could enter the fp32 top k; rows it cannot certify (near-ties across the cut) are
searched again in fp32 (:func:`_rescore`). So the answer is the fp32 one whatever the rounding.

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

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from tasks import block_topk, topk_heap
from tasks.hardware import native_bf16_cpu


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


# On the CPU, tiles go through the fused heap kernels (tasks.topk_heap); tasks.block_topk serves
# CUDA (and the CPU when this is False: the tests run both there).
HEAPS_ON_CPU = True
CPU_TILE = 2048  # at most this many queries × gallery items per CPU tile (8 MiB in bf16)


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
    precision: str = "auto",
) -> Iterator[Chunk]:
    """Exact top-``k`` of every query over the gallery, one :class:`Chunk` per ``query_chunk`` queries.

    queries float32 (Q, D), gallery float32 (G, D), self_pos int64 (Q,) or None (see module doc).
    When queries and gallery are the same set (``self_pos == arange(Q)``, Q == G: leave-one-out on
    one set), each tile is computed once and used for both of its query blocks — the score matrix
    is symmetric — which halves the matrix products.

    ``precision``: ``fp32`` tiles, or ``bf16`` candidate tiles re-scored in fp32 (CPU, inner
    product; see :func:`_rescore` — the result is the fp32 one). ``auto``: bf16 where that holds
    and the CPU multiplies bf16 natively, else fp32.
    """
    _check(queries, gallery, k, metric, self_pos)
    device = torch.device(device)
    bf16 = _use_bf16(precision, metric, device)
    if device.type == "cpu" and HEAPS_ON_CPU:
        # Heaps carry no per-tile candidate lists, so small tiles cost nothing there, and tiles
        # that stay in cache make the products faster (60k leave-one-out, bf16: 4096² tiles
        # 3.3 s, 2048² 2.2 s).
        query_chunk, gallery_block = min(query_chunk, CPU_TILE), min(gallery_block, CPU_TILE)
    q_all = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
    g_all = torch.from_numpy(np.ascontiguousarray(gallery, dtype=np.float32)).to(device)
    gn = (g_all * g_all).sum(1) / 2 if metric == "l2" else None  # |g|²/2, see _scores
    sp = None if self_pos is None else torch.from_numpy(np.asarray(self_pos, dtype=np.int64))
    symmetric = (
        sp is not None and len(queries) == len(gallery) and bool((sp == torch.arange(len(sp))).all())
        and (queries is gallery or np.array_equal(queries, gallery))
    )
    search = _Search(g_all, gn, k, device, gallery_block, bf16)

    def steps() -> Iterator[Chunk]:
        if symmetric:
            yield from _symmetric(search, query_chunk)
            return
        for start in range(0, len(q_all), query_chunk):
            q = q_all[start : start + query_chunk].to(device)
            s_pos = None if sp is None else sp[start : start + len(q)].to(device)
            yield _finish(start, *search.topk(q, s_pos, bf16), k, None if gn is None else (q * q).sum(1))

    yield from _scoped(steps())


def _use_bf16(precision: str, metric: str, device: torch.device) -> bool:
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', got {precision!r}")
    possible = device.type == "cpu" and metric == "inner_product" and HEAPS_ON_CPU
    if precision == "bf16" and not possible:
        raise ValueError("bf16 candidate search is for metric inner_product on the CPU")
    return possible and (precision == "bf16" or (precision == "auto" and native_bf16_cpu()))


class _Search:
    """One gallery, searched chunk by chunk: selectors (CPU heaps or CUDA group-max candidate
    lists) and the bf16 candidates' exact re-scoring."""

    def __init__(self, g: torch.Tensor, gh: torch.Tensor | None, k: int, device: torch.device, block: int, bf16: bool):
        self.g, self.gh, self.k, self.device, self.block, self.bf16 = g, gh, k, device, block, bf16
        self.g_low = g.bfloat16() if bf16 else g
        self.g_norm_max = float(g.norm(dim=1).max()) if bf16 and len(g) else 0.0

    def selector(self, rows: int, bf16: bool):
        if self.device.type != "cpu" or not HEAPS_ON_CPU:
            return block_topk.Candidates(self.k, rows, self.device)
        # bf16: BF16_SPARE extra candidates per query, so the re-scored top-k is usually certified.
        return topk_heap.Heaps(rows, self.k + (BF16_SPARE if bf16 else 0))

    def topk(self, q: torch.Tensor, s_pos: torch.Tensor | None, bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries q (c, D) against the whole gallery -> (values (c, k'), positions (c, k'))."""
        sel, g = self.selector(len(q), bf16), self.g_low if bf16 else self.g
        qs = q.bfloat16() if bf16 else q
        for col0 in range(0, len(g), self.block):
            s = _scores(qs, g[col0 : col0 + self.block], None if self.gh is None else self.gh[col0 : col0 + self.block])
            if s_pos is not None:
                local = s_pos - col0
                rows = ((local >= 0) & (local < s.shape[1])).nonzero().squeeze(1)
                s[rows, local[rows]] = -torch.inf
            sel.add_tile(s, col0)
        return self.result(sel, q, s_pos, bf16)

    def result(self, sel, q: torch.Tensor, s_pos: torch.Tensor | None, bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The selector of queries q, fed every tile -> their top-k. bf16 heaps are re-scored to
        the exact fp32 top-k; rows :func:`_rescore` cannot certify are searched again in fp32 (the
        answer never depends on bf16 rounding)."""
        if not bf16:
            return sel.result()
        keys, pos = sel.drained()
        q_norm = q.norm(dim=1)
        bound = q_norm * self.g_norm_max * topk_heap.bf16_error(q.shape[1])
        bound += (q.shape[1] + 1) * 2.0**-125 * (q_norm + self.g_norm_max + 1)  # bf16 subnormals flushed
        vals, idx, certified = _rescore(q, self.g, keys, pos, s_pos, self.k, bound)
        redo = (~certified).nonzero().squeeze(1)
        if len(redo):
            v, i = self.topk(q[redo], None if s_pos is None else s_pos[redo], bf16=False)
            vals[redo], idx[redo] = v, i
        return vals, idx


BF16_SPARE = 32


def _rescore(
    q: torch.Tensor, g: torch.Tensor, keys: np.ndarray, pos: np.ndarray, s_pos: torch.Tensor | None, k: int, bound: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """bf16 candidates -> fp32 top-k, and whether each row's answer is certified exact.

    keys/pos (c, h), best first (:meth:`tasks.topk_heap.Heaps.drained`): each query's h = k +
    BF16_SPARE best gallery items by bf16 score ŝ. Their fp32 scores s = q·g are computed and
    ranked (score desc, position asc). ``bound`` (c,) bounds |ŝ - s| (both against the exact
    product, :func:`tasks.topk_heap.bf16_error`), so an item left out — ŝ <= ŝ_h, the h-th bf16
    score — has s <= ŝ_h + bound. If that is below the k-th re-scored score, no item left out can
    enter the top k: the row is certified. A heap that is not full holds every item: certified.
    """
    pos_t = torch.from_numpy(pos)
    valid = pos_t != topk_heap.EMPTY_POS
    s = torch.empty(pos.shape)
    topk_heap.dots(q.contiguous().numpy(), g.numpy(), pos, s.numpy())
    if s_pos is not None:
        s = s.masked_fill(pos_t == s_pos[:, None], -torch.inf)
    vals, idx = block_topk.rank([s], [pos_t], k)
    low = torch.from_numpy(topk_heap.key_to_float(keys[:, -1], 16))
    certified = ~valid.all(1) | (low + bound < vals[:, k - 1])
    return vals, idx, certified


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


def _symmetric(search: _Search, b: int) -> Iterator[Chunk]:
    """Leave-one-out on one set x = ``search.g`` (N, D): tile (i, j), j >= i, serves rows of block i
    directly and rows of block j through its transpose, so each product is computed once.

    For L2 both directions are made from the same product tile P = x_i·x_jᵀ by one pass each
    (``P - |x_b|²/2`` for block i's rows, ``P - |x_a|²/2`` read column-wise for block j's), so
    equal distances stay exactly equal whichever side of the tile they come from. With bf16 the
    tile is bf16 and each block's heaps are re-scored when its last tile is in (:func:`_rescore`).
    """
    x, xh, bf16 = search.g, search.gh, search.bf16
    low = search.g_low
    starts = list(range(0, len(x), b))
    pending = {bj: search.selector(min(b, len(x) - s0), bf16) for bj, s0 in enumerate(starts)}
    for bi, r0 in enumerate(starts):
        xi = low[r0 : r0 + b]
        cand = pending.pop(bi)
        for bj in range(bi, len(starts)):
            c0 = starts[bj]
            p = xi @ low[c0 : c0 + b].T
            s = p if xh is None else torch.sub(p, xh[c0 : c0 + b][None, :])
            if bj == bi:
                s.fill_diagonal_(-torch.inf)  # the query itself
            cand.add_tile(s, c0)
            if bj > bi:  # the same tile seen from block j's queries: gallery rows of block i
                t = p if xh is None else p.sub_(xh[r0 : r0 + b][:, None])
                pending[bj].add_tile(t, r0, along_rows=False)
        rows = len(xi)
        v, i = search.result(cand, x[r0 : r0 + rows], torch.arange(r0, r0 + rows, device=x.device), bf16)
        yield _finish(r0, v, i, search.k, None if xh is None else 2 * xh[r0 : r0 + rows])


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


# (query rows (m,), k) -> their top k as one Chunk (start 0), searched as the first pass was: how
# tasks.retrieval sees where a tie group running past the k-th column ends.
Research = Callable[[np.ndarray, int], Chunk]


def exact_research(
    queries: np.ndarray, gallery: np.ndarray, metric: str, self_pos: np.ndarray | None, device: torch.device | str,
    gallery_block: int, seed: int = 0, shuffle_from: int = 0,
) -> Research:
    """A :data:`Research` by :func:`exact_chunks`. From ``shuffle_from`` neighbours on (the width
    at which tasks.retrieval cuts a group it cannot list whole), over the gallery in a seeded random
    order, mapped back: the items that make such a cut are then a random draw from the group —
    whose tie-aware metrics are unbiased — not the lowest gallery positions (ingest sorts rows by
    label). The shuffled copy of the gallery is made at the first such call only, so narrower
    searches (a few duplicate images) never pay for it."""
    state: dict[str, np.ndarray] = {}

    def research(rows: np.ndarray, k: int) -> Chunk:
        sp = None if self_pos is None else self_pos[rows]
        if k < shuffle_from:
            return _joined(exact_chunks(queries[rows], gallery, k, metric, sp, device, len(rows), gallery_block))
        if not state:
            perm = np.random.default_rng(seed).permutation(len(gallery))
            state.update(perm=perm, gallery=gallery[perm], moved_to=np.argsort(perm))
        if sp is not None:
            sp = np.where(sp >= 0, state["moved_to"][np.maximum(sp, 0)], -1)
        ch = _joined(exact_chunks(queries[rows], state["gallery"], k, metric, sp, device, len(rows), gallery_block))
        return Chunk(0, np.where(ch.pos >= 0, state["perm"][np.maximum(ch.pos, 0)], -1), ch.scores)

    return research


def index_research(index, queries: np.ndarray, self_pos: np.ndarray | None, negate: bool) -> Research:
    """A :data:`Research` by :func:`index_chunks` through the same faiss index."""
    return lambda rows, k: _joined(index_chunks(
        index, queries[rows], k, None if self_pos is None else self_pos[rows], max(len(rows), 1), negate))


def _joined(chunks: Iterator[Chunk]) -> Chunk:
    parts = list(chunks)
    return Chunk(0, np.concatenate([c.pos for c in parts]), np.concatenate([c.scores for c in parts]))

