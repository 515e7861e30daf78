"""pytorch-metric-learning's TripletMarginMiner + TripletMarginLoss as one autograd Function.

Same loss, gradient and statistics as pml (tested on random batches), with few kernels: pml builds a
B×B×B triplet mask and index lists (at B = 512, 134 M elements; ~half of a small CNN's step on an
H200). Here the loss is one pass over (positive pair × batch) gaps, and the backward is written
out instead of recorded op by op: the loss is an average of ``margin + d_ap − d_an`` over the
active triplets, so its gradient with respect to the distance matrix is a count of active
triplets per (anchor, positive) and per (anchor, negative) divided by their number. Forward +
backward dispatch 69 ops where the same formula left to autograd dispatched 109 and pml 144
(benchmarks/objective_speed.py); on a GPU at 28 px each is a kernel launch of a few microseconds
in a step of a few milliseconds.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.autograd.function import once_differentiable

_EPS = 1e-12  # F.normalize's and the squared distance's floor (the diagonal: no triplet uses it)


# The Triton pass (tasks.triplet_kernel) for P×K batches: "auto" on CUDA tensors outside
# torch.compile (which writes its own fused kernels), "always" (tests: on CPU tensors through
# Triton's interpreter), "never". A kernel that fails to build switches it to "never", warning once.
KERNEL = "auto"


@contextmanager
def kernel_setting(setting: str) -> Iterator[None]:
    """``KERNEL`` set to ``setting`` for the block (benchmarks and tests compare the passes)."""
    global KERNEL
    before, KERNEL = KERNEL, setting
    try:
        yield
    finally:
        KERNEL = before


def _use_kernel(dist: torch.Tensor) -> bool:
    if KERNEL == "auto":
        return dist.is_cuda and not torch.compiler.is_compiling()
    return KERNEL == "always"


def _kernel_pass(dist, labels, d_ap, pos, margin, mine_margin, triplets, grad: bool):
    """The Triton pass -> (Σ violation, active, chosen, Σ d_ap, Σ d_an) 0-d tensors, counts or None."""
    from tasks import triplet_kernel  # here: only where the kernel runs needs triton

    counts, count_ap, sums = triplet_kernel.triplet_rows(dist, labels, d_ap, margin, mine_margin, triplets)
    if not grad:
        return (*sums.unbind(), None)
    counts.scatter_add_(1, pos, count_ap.neg_())  # −1 per active triplet at (anchor, positive)
    return (*sums.unbind(), counts)


def _torch_pass(dist, same, d_ap, pos, anchors, margin, mine_margin, triplets, grad: bool):
    """The same in torch ops; d_ap (B, K-1) with anchors None (P×K), else (M,) pairs' anchors."""
    if anchors is None:
        d_ap = d_ap[:, :, None]  # (B, K-1, 1)
        d_an, negative = dist[:, None, :], ~same[:, None, :]  # (B, 1, B) views
    else:
        d_ap = d_ap[:, None]  # (M, 1)
        d_an, negative = dist[anchors], ~same[anchors]  # (M, B)
    gap = d_an - d_ap  # pml's "triplet_margin", (B, K-1, B) or (M, B)
    if triplets == "easy":
        chosen = gap > mine_margin
    elif triplets == "semihard":
        chosen = (gap > 0) & (gap <= mine_margin)
    else:  # "all", or "hard" (gap ≤ 0 as well)
        chosen = gap <= (min(mine_margin, 0.0) if triplets == "hard" else mine_margin)
    chosen &= negative
    violation = margin - gap  # relu(d_ap − d_an + margin), non-zero where active
    active = chosen & (violation > 0)
    # Masks multiply (where() is ~6× slower on CPUs), which also keeps a NaN: a NaN or infinite
    # embedding selects nothing, yet makes the loss NaN (see FusedTriplet).
    sums = ((violation * active).sum(), active.sum(), chosen.sum(), (d_ap * chosen).sum(), (d_an * chosen).sum())
    counts = None
    if grad:  # −∂loss/∂dist · n_active: +1 per active triplet at (a, n), −1 at (a, p), (B, B)
        if anchors is None:
            counts = active.sum(1, dtype=dist.dtype)
            counts.scatter_add_(1, pos, active.sum(2, dtype=dist.dtype).neg_())
        else:
            counts = torch.zeros_like(dist).index_add_(0, anchors, active.to(dist.dtype))
            counts.index_put_((anchors, pos), active.sum(1, dtype=dist.dtype).neg_(), accumulate=True)
    return (*sums, counts)


class _TripletFn(torch.autograd.Function):
    """(emb (B, D) float32, labels (B,)) -> (loss, stats (4,): chosen triplets, active triplets,
    Σ d_ap and Σ d_an over the chosen); only the loss has a gradient. Rows are L2-normalised
    inside (F.normalize's floor), so the whole objective is one recorded op. Distances take the
    rows as unit (|a−b|² = 2 − 2a·b): an all-zero embedding — which the model's normalised head
    gives only for an exactly zero output — sits at √2 from every row, where pml puts it at 1.
    ``grad``: a backward will follow (else the gradient's counts are not reduced)."""

    @staticmethod
    def forward(ctx, emb, labels, per_class: int | None, margin: float, mine_margin: float, triplets: str, grad: bool):
        global KERNEL
        ctx.set_materialize_grads(False)  # no zero gradients made for the statistics
        norm = torch.linalg.vector_norm(emb, dim=1, keepdim=True)  # (B, 1)
        x = emb / norm.clamp_min(_EPS)
        r = torch.mm(x, x.T).mul_(-2).add_(2)  # |a−b|² = 2 − 2a·b for unit rows, (B, B)
        dist = r.clamp_min(_EPS).sqrt_()
        same = labels[:, None] == labels[None, :]
        anchors = None
        if per_class:
            # A P×K batch: each anchor's K − 1 positives are its largest "same class, not itself"
            # distances, values and columns from one top-k — static shapes, no host
            # synchronisation, and no gather (under torch.compile an indexed load inside the
            # fused loops made them ~6× slower on CPUs). -1: below every distance.
            d_ap, pos = torch.topk(torch.where(same, dist, -1.0).fill_diagonal_(-1), per_class - 1, dim=1)
        else:
            anchors, pos = (same & ~torch.eye(len(labels), dtype=torch.bool, device=emb.device)).nonzero(as_tuple=True)
            d_ap = dist[anchors, pos]  # (M,)
        out = None
        if per_class and _use_kernel(dist):
            try:
                out = _kernel_pass(dist, labels, d_ap, pos, margin, mine_margin, triplets, grad)
            except Exception as error:  # a Triton build failure must not lose the run: same numbers below
                warnings.warn(f"fused triplet kernel unavailable ({type(error).__name__}: {error}); using torch ops")
                KERNEL = "never"
        if out is None:
            out = _torch_pass(dist, same, d_ap, pos, anchors, margin, mine_margin, triplets, grad)
        violation, n_active, n_chosen, d_ap_sum, d_an_sum, counts = out
        denom = n_active.clamp(min=1)
        loss = violation / denom  # mean over the non-zero losses (pml's AvgNonZeroReducer); 0 with none
        stats = torch.stack([n_chosen, n_active, d_ap_sum, d_an_sum])  # float32
        if counts is not None:
            ctx.save_for_backward(x, norm, r, dist, counts, denom)
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_stats):
        if grad_loss is None:
            return (None,) * 7
        x, norm, r, dist, counts, denom = ctx.saved_tensors
        # dist = sqrt(max(2 − 2x·xᵀ, eps)): ∂dist/∂(x·xᵀ) = −1/dist where the floor is not hit.
        grad_s = (counts / dist).masked_fill_(r < _EPS, 0)
        grad_x = torch.mm(grad_s + grad_s.T, x)  # ∂loss/∂x · n_active / grad_loss
        # Through x = emb / max(|emb|, eps): remove the radial part (none where the floor is hit).
        radial = (grad_x * x).sum(1, keepdim=True).masked_fill_(norm < _EPS, 0)
        grad_emb = (grad_x - x * radial).mul_((grad_loss / denom) / norm.clamp_min(_EPS))
        return grad_emb, None, None, None, None, None, None


class FusedTriplet:
    """TripletMarginMiner(margin=mine_margin, type_of_triplets) + TripletMarginLoss(margin), fused.

    Distances are Euclidean between L2-normalised embeddings (pml's default LpDistance); the loss
    is the mean of relu(d_ap − d_an + margin) over the selected triplets whose loss is non-zero
    (pml's AvgNonZeroReducer). ``mine_margin=inf, triplets="all"`` is batch-all (no miner).
    ``per_class``: every batch holds exactly that many images of each of its classes (a P×K plan),
    so each anchor's positives come from top-k — static shapes, no host synchronisation.
    One deliberate difference: a NaN or infinite embedding makes the loss NaN (pml leaves it out
    of every triplet and returns a finite loss unless all are bad), so a diverging run stops.
    """

    def __init__(self, margin: float, mine_margin: float = math.inf, triplets: str = "all", per_class: int | None = None):
        if triplets not in ("all", "hard", "semihard", "easy"):
            raise ValueError(f"unknown type_of_triplets {triplets!r}")
        self.margin, self.mine_margin, self.triplets = margin, mine_margin, triplets
        self.per_class = per_class

    def __call__(self, emb: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """emb (B, D), labels (B,) -> (scalar float32 loss, stats: 0-d tensors on emb's device)."""
        grad = torch.is_grad_enabled() and emb.requires_grad
        # float32 even when called under autocast (the engine calls it outside; a user's loop
        # might not): autocast would run the distance matmul in bfloat16, whose 3 significant
        # digits flip margin decisions between near-identical embeddings.
        with torch.autocast(emb.device.type, enabled=False):
            loss, sums = _TripletFn.apply(emb.float(), labels, self.per_class, self.margin, self.mine_margin, self.triplets, grad)
        # One division for the four figures; 0/0 = NaN for the mean distances when nothing was
        # chosen (pml's empty mean), 0 active of 0 chosen for the fraction.
        n_chosen = sums[0]
        ratios = sums / torch.stack([torch.ones_like(n_chosen), n_chosen.clamp(min=1), n_chosen, n_chosen])
        return loss, dict(zip(("mined", "frac_active", "pos_distance", "neg_distance"), ratios.unbind()))
