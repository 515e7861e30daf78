"""What a training step minimises: ``objective(emb, labels) -> (loss, stats)``.

:class:`PmlObjective` is pytorch-metric-learning's miner + loss, as configured by name.
:class:`~tasks.fused_triplet.FusedTriplet` computes *the same* loss as ``TripletMarginMiner`` (all /
hard / semihard / easy, or no miner: batch-all) + ``TripletMarginLoss`` with their default distance
and reducer, in one pass over (positive pair × batch) distances; the fused NT-Xent classes below do
the same for NTXentLoss. Equality with pml (loss and gradients) is tested on random batches.

stats are 0-d tensors (kept on the device; the engine synchronises once per epoch): mined tuples,
fraction of active (non-zero loss) triplets, mean positive and negative distance.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses, miners
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from tasks.errors import ParamsError
from tasks.fused_triplet import FusedTriplet
from tasks.params import Component, constructor_args

Stats = dict[str, torch.Tensor]


def _mean(x: torch.Tensor) -> torch.Tensor:
    return x.mean() if x.numel() else x.new_tensor(float("nan"))


class PmlObjective:
    """pytorch-metric-learning's miner (or none) + loss; statistics from the mined tuples."""

    def __init__(self, loss_fn: torch.nn.Module, miner: torch.nn.Module | None):
        self.loss_fn, self.miner = loss_fn, miner

    def __call__(self, emb: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, Stats]:
        tuples = self.miner(emb, labels) if self.miner is not None else None  # None: every tuple
        loss = self.loss_fn(emb, labels, tuples)
        # A proxy loss compares each embedding with its class weights, not with other embeddings:
        # it mines nothing. The batch's pair similarities still show whether the classes separate.
        proxy = tuples is None and isinstance(self.loss_fn, PROXY_LOSSES)
        with torch.no_grad():
            if tuples is not None:
                mined = tuples
            elif proxy or isinstance(self.loss_fn, losses.GenericPairLoss):
                mined = lmu.get_all_pairs_indices(labels)  # what a pair loss uses: every pair
            else:
                mined = lmu.get_all_triplets_indices(labels)
            stats = mining_stats(emb.detach(), mined, self.loss_fn)
            if proxy:
                del stats["mined"]
        return loss, stats


# Losses that compare each embedding with learned class weights (ArcFace, CosFace, SphereFace and
# SubCenterArcFace derive from LargeMarginSoftmaxLoss), not with the batch's other embeddings.
# Not "takes num_classes": MarginLoss does (one beta per class) and is a triplet loss.
PROXY_LOSSES = (losses.LargeMarginSoftmaxLoss, losses.NormalizedSoftmaxLoss, losses.ProxyAnchorLoss,
                losses.ProxyNCALoss, losses.SoftTripleLoss, losses.P2SGradLoss)


# Losses that turn a miner's pairs into triplets (pml's convert_to_triplets) before computing.
TRIPLET_LOSSES = (losses.TripletMarginLoss, losses.MarginLoss, losses.HistogramLoss, losses.DynamicSoftMarginLoss)


def _capped(nll: torch.Tensor) -> torch.Tensor:
    """-log(p) -> -log(p + tiny), as pml's NTXentLoss computes it (c_f.small_val, the dtype's
    smallest normal number): each positive pair's loss stops at ≈ 87.3 in float32 and its
    gradient fades there. That matters only for τ < 2/87.3 (cosines span 2), where the exact
    cross-entropy would go on growing; kept so that fused equals pml there too."""
    return -torch.logaddexp(-nll, nll.new_tensor(math.log(torch.finfo(nll.dtype).tiny)))


def mining_stats(emb: torch.Tensor, tuples: tuple, loss_fn, ref: torch.Tensor | None = None) -> Stats:
    """What a miner found in one batch: count, mean positive / negative distance and, for
    triplets, the fraction still violating the margin ("active") — the loss learns from those.

    emb (B, D); tuples: a miner's (a, p, n) triplets or (a1, p, a2, n) pairs — anchors index
    emb, positives and negatives index ``ref`` (M, D) (a cross-batch memory), else emb too.
    """
    dist = loss_fn.distance
    mat = dist(emb, ref) if ref is not None else dist(emb)
    if len(tuples) == 4 and isinstance(loss_fn, TRIPLET_LOSSES):
        # A pair miner (BatchEasyHardMiner) feeding a triplet loss: the loss joins the pairs at
        # their common anchors into triplets, so count and judge those (no random draw here).
        tuples = lmu.convert_to_triplets(tuples, None)
    if len(tuples) == 3:
        a, p, n = tuples
        d_ap, d_an = mat[a, p], mat[a, n]
        sign = -1.0 if dist.is_inverted else 1.0  # similarities: larger = closer
        margin = float(getattr(loss_fn, "margin", 0.0) or 0.0)
        active = (sign * (d_ap - d_an) + margin) > 0
        return {
            "mined": emb.new_tensor(float(len(a))),
            "frac_active": active.float().mean() if len(a) else emb.new_tensor(0.0),
            "pos_distance": _mean(d_ap),
            "neg_distance": _mean(d_an),
        }
    a1, p, a2, n = tuples
    return {
        "mined": emb.new_tensor(float(len(a1) + len(a2))),
        "pos_distance": _mean(mat[a1, p]),
        "neg_distance": _mean(mat[a2, n]),
    }


def _only(spec: Component, allowed: dict[str, object]) -> bool:
    """spec's kwargs are a subset of ``allowed`` names, each at its default if the value matters."""
    return all(k in allowed and (allowed[k] is None or v == allowed[k]) for k, v in spec.kwargs.items())


class FusedSupervisedNTXent:
    """NTXentLoss(temperature) on labelled embeddings with no miner, as pml computes it — every
    same-label pair (a, p) a positive, every other-label pair (a, n) a negative:

        loss(a, p) = -log( e^{s_ap/τ} / (e^{s_ap/τ} + Σ_n e^{s_an/τ}) ) = softplus(lse_n(s_an/τ) - s_ap/τ)

    (s = cosine similarity), averaged over the positive pairs — in one (B, B) pass. pml gathers
    the pairs and builds a (positive pairs × negative pairs) mask (~0.2 s a step at B = 128 on a
    CPU, a third of the step). Value and gradient equal pml's (tested). Statistics: the pairs'
    count and mean positive / negative similarity (pml's pair statistics)."""

    def __init__(self, temperature: float):
        self.temperature = temperature

    def __call__(self, emb: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, Stats]:
        """emb (B, D), labels (B,) -> (scalar loss, stats)."""
        z = F.normalize(emb, dim=1)
        sim = z @ z.T
        same = labels[:, None] == labels[None, :]
        pos = same & ~torch.eye(len(labels), dtype=torch.bool, device=emb.device)
        logits = sim / self.temperature
        # An anchor with no negative (a one-class batch) gets -inf, but through a finite row: the
        # logsumexp of an all -inf row has a NaN gradient.
        has_neg = (~same).any(dim=1)
        lse = torch.logsumexp(logits.masked_fill(same & has_neg[:, None], float("-inf")), dim=1)
        neg_lse = torch.where(has_neg, lse, float("-inf"))
        per_pair = _capped(F.softplus(neg_lse[:, None] - logits))  # (B, B), used where pos
        n_pos, n_neg = pos.sum(), (~same).sum()
        loss = torch.where(pos, per_pair, 0.0).sum() / n_pos.clamp(min=1)
        with torch.no_grad():
            d = sim.detach()
            stats = {  # pml's pair statistics; 0/0 = NaN with no pair, as pml's empty mean
                "mined": (n_pos + n_neg).to(d.dtype),
                "pos_distance": torch.where(pos, d, 0.0).sum() / n_pos,
                "neg_distance": torch.where(~same, d, 0.0).sum() / n_neg,
            }
        return loss, stats


def fused_equivalent(
    loss: Component, miner: Component | None, per_class: int | None = None
) -> FusedTriplet | FusedSupervisedNTXent | None:
    """The fused objective when it computes exactly what (loss, miner) would, else None."""
    if loss.name == "NTXentLoss" and miner is None and _only(loss, {"temperature": None}):
        return FusedSupervisedNTXent(float(loss.kwargs.get("temperature", 0.07)))
    loss_ok = loss.name == "TripletMarginLoss" and _only(
        loss, {"margin": None, "swap": False, "smooth_loss": False, "triplets_per_anchor": "all"}
    )
    if not loss_ok:
        return None
    margin = float(loss.kwargs.get("margin", 0.05))  # pml's defaults
    if miner is None:
        return FusedTriplet(margin, per_class=per_class)
    if miner.name == "TripletMarginMiner" and _only(miner, {"margin": None, "type_of_triplets": None}):
        mine_margin = float(miner.kwargs.get("margin", 0.2))
        return FusedTriplet(margin, mine_margin, miner.kwargs.get("type_of_triplets", "all"), per_class)
    return None


class FusedNTXent:
    """SelfSupervisedLoss(NTXentLoss(temperature)) (symmetric, cosine similarity), as SimCLR writes
    it: one cross-entropy over the (2B × 2B) similarity matrix of both views, self excluded, each
    view's target the other view of its image. pml builds a (positive pairs × all pairs) mask
    instead — 2 M entries at B = 128, ~0.2 s a step on a CPU. Equality is tested."""

    def __init__(self, temperature: float):
        self.temperature = temperature

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a, b (B, D): the two views' embeddings -> scalar loss."""
        z = F.normalize(torch.cat([a, b]), dim=1)
        logits = (z @ z.T) / self.temperature
        n = len(a)
        logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
        target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
        return _capped(F.cross_entropy(logits, target, reduction="none")).mean()


def self_supervised_objective(loss: Component, fused: bool, device: torch.device):
    """-> (loss(a, b) on two views' embeddings, loss module whose parameters train too)."""
    loss_fn = getattr(losses, loss.name)(**loss.built_kwargs()).to(device)
    if fused and loss.name == "NTXentLoss" and _only(loss, {"temperature": None}):
        return FusedNTXent(float(loss.kwargs.get("temperature", 0.07))), loss_fn
    return losses.SelfSupervisedLoss(loss_fn), loss_fn


class RecordingMemory(losses.CrossBatchMemory):
    """pml's CrossBatchMemory, keeping what it mined last — the tuples (anchors in the batch,
    positives and negatives in the memory) and the memory they index — for the statistics."""

    last: tuple[tuple, torch.Tensor] | None = None

    def create_indices_tuple(self, embeddings, labels, E_mem, L_mem, *rest):
        tuples = super().create_indices_tuple(embeddings, labels, E_mem, L_mem, *rest)
        self.last = (tuples, E_mem)
        return tuples


class MemoryObjective:
    """pml's CrossBatchMemory: the miner and loss see this batch against the last
    ``memory_size`` embeddings (a queue), so hard negatives are not limited to one batch.
    Statistics: the queue's fill and what was mined against it (:func:`mining_stats`)."""

    def __init__(self, xbm: RecordingMemory):
        self.xbm = xbm

    def __call__(self, emb: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, Stats]:
        loss = self.xbm(emb, labels)
        filled = self.xbm.memory_size if self.xbm.has_been_filled else self.xbm.queue_idx
        with torch.no_grad():
            tuples, memory = self.xbm.last
            stats = mining_stats(emb.detach(), tuples, self.xbm.loss, memory)
        return loss, stats | {"memory_filled": emb.new_tensor(float(filled))}

    def state_dict(self) -> dict:
        """The queue (a resumed run mines against the same memory); plain attributes in pml,
        not buffers. The same on every rank: each enqueues the gathered global batch."""
        x = self.xbm
        return {"embeddings": x.embedding_memory, "labels": x.label_memory,
                "queue_idx": int(x.queue_idx), "has_been_filled": bool(x.has_been_filled)}

    def load_state_dict(self, state: dict) -> None:
        x = self.xbm
        device = x.embedding_memory.device
        x.embedding_memory, x.label_memory = state["embeddings"].to(device), state["labels"].to(device)
        x.queue_idx, x.has_been_filled = state["queue_idx"], state["has_been_filled"]


def build_objective(
    loss: Component,
    miner: Component | None,
    fused: bool,
    device: torch.device,
    num_classes: int = 0,
    embedding_size: int = 0,
    memory_size: int = 0,
    per_class: int | None = None,
):
    """-> (objective, loss module whose parameters train too).

    ``num_classes`` / ``embedding_size`` fill the proxy losses' arguments of those names (ArcFace,
    ProxyAnchor...) when params leave them out; ``memory_size`` > 0 wraps miner and loss in a
    cross-batch memory.
    """
    kwargs = loss.built_kwargs()
    cls = getattr(losses, loss.name)
    takes = constructor_args(cls)
    for name, value in (("num_classes", num_classes), ("embedding_size", embedding_size)):
        if name in takes and name not in kwargs:
            kwargs[name] = value
    given = kwargs.get("num_classes")  # MarginLoss: None = one beta for all classes
    if "num_classes" in takes and given is not None and num_classes and given < num_classes:
        # Else the first batch fails inside pml ("Class values must be smaller than num_classes").
        raise ParamsError(f"train.loss.num_classes: {given} is fewer than the {num_classes} train "
                          "classes: leave it out (it is filled from the data)")
    loss_fn = cls(**kwargs).to(device)
    fast = fused_equivalent(loss, miner, per_class) if fused and not memory_size else None
    if fast is not None:
        return fast, loss_fn
    pml_miner = getattr(miners, miner.name)(**miner.built_kwargs()) if miner else None
    if memory_size:
        xbm = RecordingMemory(loss_fn, embedding_size, memory_size=memory_size, miner=pml_miner)
        return MemoryObjective(xbm.to(device)), loss_fn
    return PmlObjective(loss_fn, pml_miner), loss_fn
