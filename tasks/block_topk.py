"""Top-k selection on CUDA: each score tile's top-k *set* by a group-max pre-selection, the union
of the sets ranked once per chunk of queries (torch ops only: launch-friendly, no custom kernel).

:mod:`tasks.search` uses it where its CPU heap kernels (:mod:`tasks.topk_heap`) do not run. Order
throughout: score descending, then gallery position ascending (ties broken by position, whatever
the block sizes).
"""

from __future__ import annotations

import torch


GROUP = 16  # columns per group for the group-max pre-selection in block_topk


def block_topk(s: torch.Tensor, k: int, col0: int, along_rows: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-``k`` *set* of each row of a score tile ``s`` (c, b) — or, ``along_rows=False``, of
    each row of ``s.T`` (without copying it) — under the order (score desc, column asc).

    Returns values (n, k') and global positions (n, k'), k' = min(k, L), not yet ordered
    (:func:`rank` orders the union of all blocks once). -inf values are excluded slots.

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


def rank(vals: list[torch.Tensor], idx: list[torch.Tensor], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Union of per-block top-k sets -> the top ``k`` ranked by (score desc, position asc).

    Positions are unique within a row, so sorting by position and then *stably* by score puts equal
    scores in position order. Correct because the global top-k under that order is the top-k of
    the union of every block's top-k set.
    """
    v, i = torch.cat(vals, dim=1), torch.cat(idx, dim=1)
    i, order = i.sort(dim=1)
    v, order = v.gather(1, order).sort(dim=1, descending=True, stable=True)
    return v[:, :k], i.gather(1, order)[:, :k]


class Candidates:
    """Per-block top-k sets of one chunk of queries, ranked once (every ``every`` blocks, to bound
    memory at ``every × k`` candidates per query)."""

    def __init__(self, k: int, rows: int, device: torch.device, every: int = 16):
        self.k, self.rows, self.device, self.every, self.vals, self.idx = k, rows, device, every, [], []

    def add_tile(self, s: torch.Tensor, col0: int, along_rows: bool = True) -> None:
        """The same interface as :class:`tasks.topk_heap.Heaps` (the CPU's selector)."""
        self.add(*block_topk(s, self.k, col0, along_rows))

    def add(self, v: torch.Tensor, i: torch.Tensor) -> None:
        self.vals.append(v)
        self.idx.append(i)
        if len(self.vals) > self.every:
            v, i = rank(self.vals, self.idx, self.k)
            self.vals, self.idx = [v], [i]

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.vals:  # empty gallery
            return (torch.full((self.rows, 0), -torch.inf, device=self.device),
                    torch.zeros((self.rows, 0), dtype=torch.int64, device=self.device))
        return rank(self.vals, self.idx, self.k)
