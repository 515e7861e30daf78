"""The fused triplet objective's (anchor, positive, negative) pass as one Triton kernel, for CUDA.

:mod:`tasks.fused_triplet` computes the gaps of a P×K batch's (B, K−1, B) triplets with about
twenty separate torch kernels (subtract, compare, and, multiply, reduce...). On a GPU at 28 px each
launch costs about as much as its work, and the step is launch-bound. Here one program per anchor
walks its row of the distance matrix in blocks and writes only what the loss, its gradient and
the statistics need: per-anchor sums, and the active triplets per (anchor, negative) and per
(anchor, positive). Same numbers as the torch pass (integer counts equal, sums to float
rounding): tested on the CPU through Triton's interpreter, and on CUDA by the CUDA tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# type_of_triplets -> the kernel's constexpr; "hard" is "all" under min(mine_margin, 0).
_CODES = {"easy": 0, "semihard": 1, "all": 2, "hard": 2}
SUMS = ("violation", "active", "chosen", "pos_distance", "neg_distance")


@triton.jit
def _rows(
    dist_ptr, labels_ptr, d_ap_ptr, counts_ptr, count_ap_ptr, sums_ptr, B, KM1, margin, mine_margin,
    TRIPLETS: tl.constexpr, KP: tl.constexpr, BLOCK_N: tl.constexpr,
):
    a = tl.program_id(0)
    j = tl.arange(0, KP)  # this anchor's positives, padded to a power of two
    jm = j < KM1
    d_ap = tl.load(d_ap_ptr + a * KM1 + j, mask=jm, other=0.0)
    label = tl.load(labels_ptr + a)
    violation_sum = tl.zeros((KP,), tl.float32)
    n_active = tl.zeros((KP,), tl.float32)
    n_chosen = tl.zeros((KP,), tl.float32)
    neg_sum = tl.zeros((KP,), tl.float32)
    for start in range(0, B, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        nm = n < B
        d = tl.load(dist_ptr + a * B + n, mask=nm, other=0.0)
        negative = (tl.load(labels_ptr + n, mask=nm, other=0) != label) & nm
        gap = d[None, :] - d_ap[:, None]  # (KP, BLOCK_N), pml's "triplet_margin"
        if TRIPLETS == 0:
            chosen = gap > mine_margin
        elif TRIPLETS == 1:
            chosen = (gap > 0) & (gap <= mine_margin)
        else:
            chosen = gap <= mine_margin
        chosen = chosen & negative[None, :] & jm[:, None]
        violation = margin - gap
        active = (chosen & (violation > 0)).to(tl.float32)
        picked = chosen.to(tl.float32)
        # Multiplied, not selected: a NaN distance makes the loss NaN, as the torch pass does.
        violation_sum += tl.sum(violation * active, axis=1)
        n_active += tl.sum(active, axis=1)
        n_chosen += tl.sum(picked, axis=1)
        neg_sum += tl.sum(picked * d[None, :], axis=1)
        tl.store(counts_ptr + a * B + n, tl.sum(active, axis=0), mask=nm)
    tl.store(count_ap_ptr + a * KM1 + j, n_active, mask=jm)
    tl.store(sums_ptr + a * 5 + 0, tl.sum(violation_sum, axis=0))
    tl.store(sums_ptr + a * 5 + 1, tl.sum(n_active, axis=0))
    tl.store(sums_ptr + a * 5 + 2, tl.sum(n_chosen, axis=0))
    tl.store(sums_ptr + a * 5 + 3, tl.sum(n_chosen * d_ap, axis=0))
    tl.store(sums_ptr + a * 5 + 4, tl.sum(neg_sum, axis=0))


def triplet_rows(
    dist: torch.Tensor, labels: torch.Tensor, d_ap: torch.Tensor, margin: float, mine_margin: float, triplets: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dist (B, B) float32, labels (B,), d_ap (B, K−1) each anchor's positive distances ->
    (active triplets per (anchor, negative) (B, B), per (anchor, positive) (B, K−1), the
    batch's sums (5,) named by ``SUMS``), all float32."""
    b, km1 = d_ap.shape
    dist, labels, d_ap = dist.contiguous(), labels.contiguous(), d_ap.contiguous()
    counts = torch.empty_like(dist)
    count_ap = torch.empty_like(d_ap)
    per_anchor = torch.empty(b, 5, dtype=torch.float32, device=dist.device)
    bound = min(mine_margin, 0.0) if triplets == "hard" else mine_margin
    _rows[(b,)](
        dist, labels, d_ap, counts, count_ap, per_anchor, b, km1, float(margin), float(bound),
        TRIPLETS=_CODES[triplets], KP=triton.next_power_of_2(km1), BLOCK_N=128,
    )
    return counts, count_ap, per_anchor.sum(0)  # a sum over rows: no atomics, deterministic
