"""Running top-k selection over score tiles on the CPU, fused into one pass (numba kernels).

:mod:`tasks.search` multiplies queries by gallery blocks; on the CPU each score tile goes through
here once: every query keeps a min-heap of its best ``h`` (score, position) pairs across all
blocks, ordered by (score desc, position asc). A tile row is read in groups of ``LANES`` columns:
one vectorised max per group, compared with the row's current worst kept score, and only groups
that can enter the heap are looked at one by one — after the first blocks almost none. That one
read replaces the group-max pass, top-k, gathers and the merge of per-block candidate lists that
the torch path (used on CUDA) needs.

Scores are compared as integer *keys*: the bits of an IEEE float (float32 tiles: int32 view;
bfloat16 tiles: int16 view) mapped so that integer order is float order, ``key = b`` for b >= 0
and ``-(b & 0x7F…F)`` for negative b (so -0 and +0 are equal, as floats). That lets one kernel
serve fp32 and bf16 tiles (numba has no bfloat16 type) and needs no conversion pass over the tile.
Empty heap slots hold key ``EMPTY_KEY`` (below every real key, -inf and NaNs included) and
position ``EMPTY_POS``.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

LANES = 16  # columns per group: one vectorised max, then a single compare with the heap's worst
ROWS = 32  # rows per group in push_cols (the same, down the columns)
EMPTY_KEY = np.iinfo(np.int32).min
EMPTY_POS = np.iinfo(np.int64).max
MASKS = {np.dtype(np.int32): 0x7FFFFFFF, np.dtype(np.int16): 0x7FFF}


@numba.njit(inline="always")
def _key(b, mask):
    v = np.int32(b)
    return v if v >= 0 else -(v & mask)


@numba.njit(inline="always")
def _replace_root(hk, hi, key, pos):
    """Put (key, pos) in place of the heap's worst pair (its root) and sift it down. The heap is a
    min-heap under "worse": lower key, or equal key and higher position."""
    h = hk.shape[0]
    at = 0
    while True:
        c = 2 * at + 1
        if c >= h:
            break
        if c + 1 < h and (hk[c + 1] < hk[c] or (hk[c + 1] == hk[c] and hi[c + 1] > hi[c])):
            c += 1
        if hk[c] < key or (hk[c] == key and hi[c] > pos):
            hk[at], hi[at] = hk[c], hi[c]
            at = c
        else:
            break
    hk[at], hi[at] = key, pos


@numba.njit(parallel=True, cache=True, nogil=True)
def push_rows(s, mask, col0, hk, hi):
    """Offer every score of tile ``s`` (n, L) — int16/int32 float bits — to the heap of its row.

    hk int32 (n, h), hi int64 (n, h): the rows' heaps, updated in place; column j of the tile is
    gallery position ``col0 + j``.
    """
    n, length = s.shape
    for r in numba.prange(n):
        keys, pos = hk[r], hi[r]
        worst = keys[0]
        for j0 in range(0, length, LANES):
            j1 = min(j0 + LANES, length)
            best = EMPTY_KEY
            if worst >= 0:  # then key >= worst <=> raw bits >= worst (negatives are below both): no key map
                for j in range(j0, j1):
                    best = max(best, np.int32(s[r, j]))
            else:
                for j in range(j0, j1):
                    best = max(best, _key(s[r, j], mask))
            if best < worst:
                continue
            for j in range(j0, j1):
                v = _key(s[r, j], mask)
                if v > worst or (v == worst and col0 + j < pos[0]):
                    _replace_root(keys, pos, v, col0 + j)
                    worst = keys[0]


@numba.njit(parallel=True, cache=True, nogil=True)
def push_cols(s, mask, row0, hk, hi, worst):
    """Offer every score of tile ``s`` (n, L) to the heap of its *column*: the transposed tile,
    read in row order (no copy). Row i of the tile is gallery position ``row0 + i``.

    hk int32 (L, h), hi int64 (L, h): the columns' heaps; worst int32 (L,): ``hk[:, 0]``, updated.
    Columns are split into strips, one per task, so no two threads touch the same heap; within a
    strip, ROWS rows at a time, one vectorised column-wise max is compared with each column's
    worst kept score, and only columns that can gain are looked at row by row.
    """
    n, length = s.shape
    strip = 256
    for c in numba.prange((length + strip - 1) // strip):
        a, b = c * strip, min(c * strip + strip, length)
        top = np.empty(b - a, np.int32)
        # A column whose worst key is >= 0 needs raw bits >= it (negative bits are below both);
        # below 0, every column is looked at.
        raw_worst = np.empty(b - a, np.int32)
        for j in range(a, b):
            raw_worst[j - a] = worst[j] if worst[j] >= 0 else EMPTY_KEY
        for i0 in range(0, n, ROWS):
            i1 = min(i0 + ROWS, n)
            top[:] = EMPTY_KEY
            for i in range(i0, i1):
                for j in range(a, b):
                    top[j - a] = max(top[j - a], np.int32(s[i, j]))
            for j in range(a, b):
                if top[j - a] < raw_worst[j - a]:
                    continue
                for i in range(i0, i1):
                    v = _key(s[i, j], mask)
                    if v > worst[j] or (v == worst[j] and row0 + i < hi[j, 0]):
                        _replace_root(hk[j], hi[j], v, row0 + i)
                        worst[j] = hk[j, 0]
                        raw_worst[j - a] = worst[j] if worst[j] >= 0 else EMPTY_KEY


@numba.njit(parallel=True, cache=True, nogil=True)
def drain(hk, hi):
    """Sort every heap best first — (key desc, position asc) — in place, by popping its worst pair
    into the freed last slot (heap sort, O(h log h) per row)."""
    n, h = hk.shape
    for r in numba.prange(n):
        keys, pos = hk[r], hi[r]
        for end in range(h - 1, 0, -1):
            k0, p0 = keys[0], pos[0]
            _replace_root(keys[:end], pos[:end], keys[end], pos[end])
            keys[end], pos[end] = k0, p0


@numba.njit(parallel=True, cache=True, nogil=True)
def dots(q, g, pos, out):
    """out[r, j] = q[r] · g[pos[r, j]] in float32, summed in index order (q (c, D), g (G, D) float32;
    pos (c, h) int64, EMPTY_POS slots get -inf). The candidates' fp32 scores, without gathering
    their vectors into a (c, h, D) copy."""
    c, h = pos.shape
    for r in numba.prange(c):
        for j in range(h):
            p = pos[r, j]
            if p == EMPTY_POS:
                out[r, j] = -np.inf
                continue
            acc = np.float32(0.0)
            for d in range(q.shape[1]):
                acc += q[r, d] * g[p, d]
            out[r, j] = acc


def new_heaps(rows: int, h: int) -> tuple[np.ndarray, np.ndarray]:
    """Empty heaps: keys int32 (rows, h), positions int64 (rows, h)."""
    return np.full((rows, h), EMPTY_KEY, np.int32), np.full((rows, h), EMPTY_POS, np.int64)


def key_to_float(keys: np.ndarray, bits: int) -> np.ndarray:
    """int32 keys of ``bits``-bit floats (32: float32, 16: bfloat16) -> float32 values; empty
    slots (``EMPTY_KEY``) -> -inf."""
    k = keys.astype(np.int64)
    raw = np.where(k >= 0, k, (-k) | (1 << (bits - 1)))
    out = (raw << (32 - bits)).astype(np.uint32).view(np.float32)
    return np.where(keys == EMPTY_KEY, np.float32(-np.inf), out)


def bf16_error(d: int) -> float:
    """Relative bound on |ŝ - s| for ŝ = bf16(bf16(q) · bf16(g)) summed in fp32 and s the fp32
    product, both against the exact q·g: inputs rounded to bf16 (2u, u = 2⁻⁸), the output rounded
    once (u), fp32 accumulation of d terms for each (γ_d = d·2⁻²⁴ / (1 - d·2⁻²⁴)), with a margin
    for the bound's own rounding. Multiplied by |q|·|g| it bounds the absolute error."""
    u, g = 2.0**-8, d * 2.0**-24 / (1 - d * 2.0**-24)
    return (3 * u + 4 * u * u + 2 * g) * (1 + 2.0**-10)


class Heaps:
    """Running top-``h`` heaps of ``rows`` queries, fed tile by tile (fp32 or bf16 torch tiles)."""

    def __init__(self, rows: int, h: int):
        self.keys, self.pos = new_heaps(rows, h)

    def add_tile(self, s: torch.Tensor, col0: int, along_rows: bool = True) -> None:
        """s (c, b) scores of these rows against gallery ``col0 ..`` — or, ``along_rows=False``,
        (b, c) with these queries along the columns and gallery ``col0 ..`` along the rows."""
        raw = s.contiguous().view(torch.int16 if s.dtype == torch.bfloat16 else torch.int32).numpy()
        mask = MASKS[raw.dtype]
        if along_rows:
            push_rows(raw, mask, col0, self.keys, self.pos)
        else:
            push_cols(raw, mask, col0, self.keys, self.pos, np.ascontiguousarray(self.keys[:, 0]))

    def drained(self) -> tuple[np.ndarray, np.ndarray]:
        """(keys, positions), each row best first; empty slots last (key EMPTY_KEY, position EMPTY_POS)."""
        drain(self.keys, self.pos)
        return self.keys, self.pos

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact (fp32) tiles only: -> torch (values float32 (rows, h), positions int64 (rows, h)),
        best first, -inf / EMPTY_POS in empty slots."""
        keys, pos = self.drained()
        return torch.from_numpy(key_to_float(keys, 32)), torch.from_numpy(pos)
