"""The fused triplet objective equals pytorch-metric-learning's miner + loss, value and gradient."""

import math

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses, miners

from tasks.objectives import FusedTriplet, PmlObjective, build_objective, fused_equivalent
from tasks.params import Component


# The fused kernels must equal pml's on the device they train on: CUDA too, where one is present.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here"))]


def _batch(seed: int, p: int = 8, k: int = 4, dim: int = 16, pk: bool = True, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(p * k, dim, generator=g, dtype=torch.float64)
    labels = torch.arange(p).repeat_interleave(k) if pk else torch.randint(0, p, (p * k,), generator=g)
    return emb.to(device), labels.to(device)


def _loss_and_grad(objective, emb, labels):
    x = emb.clone().requires_grad_(True)
    loss, stats = objective(x, labels)
    loss.backward()
    return loss.detach(), x.grad, stats


CASES = [
    # (miner kwargs or None, loss margin)
    (None, 0.2),  # batch-all
    ({"margin": 0.2, "type_of_triplets": "semihard"}, 0.2),
    ({"margin": 0.2, "type_of_triplets": "hard"}, 0.2),
    ({"margin": 0.3, "type_of_triplets": "all"}, 0.1),
    ({"margin": 0.2, "type_of_triplets": "easy"}, 0.5),
    ({"margin": 1.0, "type_of_triplets": "semihard"}, 0.05),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("miner_kwargs,margin", CASES)
@pytest.mark.parametrize("seed,pk", [(0, True), (1, True), (2, False), (3, False)])
def test_fused_equals_pml_in_value_gradient_and_statistics(miner_kwargs, margin, seed, pk, device):
    emb, labels = _batch(seed, pk=pk, device=device)
    pml = PmlObjective(
        losses.TripletMarginLoss(margin=margin),
        miners.TripletMarginMiner(**miner_kwargs) if miner_kwargs else None,
    )
    fused = fused_equivalent(
        Component(name="TripletMarginLoss", margin=margin),
        Component(name="TripletMarginMiner", **miner_kwargs) if miner_kwargs else None,
    )
    assert isinstance(fused, FusedTriplet)
    l_ref, g_ref, s_ref = _loss_and_grad(pml, emb, labels)
    l_new, g_new, s_new = _loss_and_grad(fused, emb, labels)
    torch.testing.assert_close(l_new, l_ref.to(l_new.dtype), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(g_new.double(), g_ref, rtol=1e-5, atol=1e-7)
    _assert_same_stats(s_new, s_ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("miner_kwargs,margin", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_static_shape_variant_for_pk_batches_equals_pml(miner_kwargs, margin, seed, device):
    """With K images of each class per batch, positives come from top-k (no host sync)."""
    emb, labels = _batch(seed, p=8, k=4, device=device)
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed)).to(device)]  # any order
    pml = PmlObjective(
        losses.TripletMarginLoss(margin=margin),
        miners.TripletMarginMiner(**miner_kwargs) if miner_kwargs else None,
    )
    loss_spec = Component(name="TripletMarginLoss", margin=margin)
    miner_spec = Component(name="TripletMarginMiner", **miner_kwargs) if miner_kwargs else None
    static = fused_equivalent(loss_spec, miner_spec, per_class=4)
    assert static.per_class == 4
    l_ref, g_ref, s_ref = _loss_and_grad(pml, emb, labels)
    l_new, g_new, s_new = _loss_and_grad(static, emb, labels)
    torch.testing.assert_close(l_new, l_ref.to(l_new.dtype), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(g_new.double(), g_ref, rtol=1e-5, atol=1e-7)
    _assert_same_stats(s_new, s_ref)


def _assert_same_stats(new: dict, ref: dict) -> None:
    assert float(new["mined"]) == float(ref["mined"])
    for key in ("frac_active", "pos_distance", "neg_distance"):
        a, b = float(new[key]), float(ref[key])
        assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-5), key


@pytest.mark.parametrize("triplets", ["all", "hard", "semihard", "easy"])
@pytest.mark.parametrize("per_class", [4, None])
def test_written_out_backward_passes_gradcheck(triplets, per_class):
    """The fused objective's backward is derived by hand: finite differences in float64 must
    agree with it (on random data no triplet sits on a selection boundary within eps)."""
    from tasks.fused_triplet import _TripletFn

    emb, labels = _batch(5, p=4, k=4, dim=6)
    margin, mine_margin = (0.5, 0.4) if triplets == "easy" else (0.3, 0.6)
    emb.requires_grad_(True)
    loss = lambda e: _TripletFn.apply(e, labels, per_class, margin, mine_margin, triplets, True)[0]  # noqa: E731
    assert float(loss(emb.detach())) > 0  # something is active: the check is not of a zero
    assert torch.autograd.gradcheck(loss, (emb,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("per_class", [4, None])
def test_coincident_embeddings_match_pml(per_class):
    """The distance floor: two images of a class with the same embedding (distance 0, clamped;
    batch-all with a wide margin, so their pair is in active triplets) give pml's loss and a finite
    gradient equal to pml's."""
    emb, labels = _batch(6, p=4, k=4, dim=8)
    emb[1] = emb[0]
    fused = fused_equivalent(Component(name="TripletMarginLoss", margin=2.0), None, per_class)
    pml = PmlObjective(losses.TripletMarginLoss(margin=2.0), None)
    l_ref, g_ref, s_ref = _loss_and_grad(pml, emb, labels)
    l_new, g_new, s_new = _loss_and_grad(fused, emb, labels)
    assert torch.isfinite(g_new).all()
    torch.testing.assert_close(l_new, l_ref.to(l_new.dtype), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(g_new.double(), g_ref, rtol=1e-5, atol=1e-7)
    _assert_same_stats(s_new, s_ref)


def _autograd_reference(emb, labels, margin, mine_margin, triplets):
    """The fused objective's formula left to autograd (as it was before its backward was written
    out): float64 all through, every pair of an anchor with a same-class other a positive."""
    x = F.normalize(emb, dim=1)
    dist = (2 - 2 * x @ x.T).clamp_min(1e-12).sqrt()
    same = labels[:, None] == labels[None, :]
    a, p = (same & ~torch.eye(len(labels), dtype=torch.bool)).nonzero(as_tuple=True)
    gap = dist[a] - dist[a, p][:, None]
    chosen = {"easy": gap > mine_margin, "semihard": (gap > 0) & (gap <= mine_margin),
              "hard": gap <= min(mine_margin, 0.0), "all": gap <= mine_margin}[triplets] & ~same[a]
    violation = torch.where(chosen, F.relu(margin - gap), 0.0)
    return violation.sum() / (violation > 0).sum().clamp(min=1)


@pytest.mark.parametrize("triplets", ["all", "hard", "semihard", "easy"])
@pytest.mark.parametrize("per_class", [4, None])
def test_both_floors_backpropagate_as_autograd_does(triplets, per_class):
    """Where the floors are hit — a duplicate embedding (distance floor) and a row of norm 1e-13
    (F.normalize's floor) — the written-out backward equals autograd's on the same formula."""
    from tasks.fused_triplet import _TripletFn

    emb, labels = _batch(8, p=4, k=4, dim=6)
    emb[1] = emb[0]
    emb[6] *= 1e-13
    margin, mine_margin = (2.0, 0.4) if triplets == "easy" else (2.0, math.inf if triplets == "all" else 0.6)
    x = emb.clone().requires_grad_(True)
    _TripletFn.apply(x, labels, per_class, margin, mine_margin, triplets, True)[0].backward()
    y = emb.clone().requires_grad_(True)
    _autograd_reference(y, labels, margin, mine_margin, triplets).backward()
    assert x.grad[[0, 1, 6]].abs().sum() > 0  # the rows at the floors do get a gradient
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-9, atol=1e-12)


def test_no_triplet_selected_gives_a_zero_loss_that_still_backpropagates():
    emb, labels = _batch(0)
    fused = FusedTriplet(margin=0.2, mine_margin=-10.0, triplets="all")  # nothing can qualify
    loss, grad, stats = _loss_and_grad(fused, emb, labels)
    assert float(loss) == 0.0 and float(stats["mined"]) == 0.0
    assert torch.count_nonzero(grad) == 0


NOT_EQUIVALENT = [
    (Component(name="TripletMarginLoss", margin=0.2, swap=True), None),
    (Component(name="TripletMarginLoss", margin=0.2, smooth_loss=True), None),
    (Component(name="MultiSimilarityLoss"), None),
    (Component(name="TripletMarginLoss", margin=0.2), Component(name="BatchHardMiner")),
    (Component(name="TripletMarginLoss", margin=0.2), Component(name="TripletMarginMiner", distance="cos")),
]


@pytest.mark.parametrize("loss,miner", NOT_EQUIVALENT)
def test_anything_not_exactly_equivalent_is_not_fused(loss, miner):
    assert fused_equivalent(loss, miner) is None


@pytest.mark.parametrize("loss,miner", NOT_EQUIVALENT[:4])
def test_build_objective_falls_back_to_pml(loss, miner):
    objective, _ = build_objective(loss, miner, fused=True, device=torch.device("cpu"))
    assert isinstance(objective, PmlObjective)


def test_fused_can_be_switched_off():
    spec = Component(name="TripletMarginLoss", margin=0.2)
    assert isinstance(build_objective(spec, None, fused=True, device=torch.device("cpu"))[0], FusedTriplet)
    assert isinstance(build_objective(spec, None, fused=False, device=torch.device("cpu"))[0], PmlObjective)


@pytest.mark.parametrize("temperature,seed", [(0.07, 0), (0.1, 1), (0.5, 2)])
def test_fused_nt_xent_equals_pml_self_supervised_loss(temperature, seed):
    from tasks.objectives import FusedNTXent

    g = torch.Generator().manual_seed(seed)
    a = torch.randn(16, 8, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(16, 8, generator=g, dtype=torch.float64, requires_grad=True)
    ref = losses.SelfSupervisedLoss(losses.NTXentLoss(temperature=temperature))(a, b)
    ref_grads = torch.autograd.grad(ref, (a, b))
    new = FusedNTXent(temperature)(a, b)
    new_grads = torch.autograd.grad(new, (a, b))
    torch.testing.assert_close(new, ref, rtol=1e-9, atol=1e-12)
    for x, y in zip(new_grads, ref_grads):
        torch.testing.assert_close(x, y, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("temperature", [0.005, 0.01])
def test_fused_nt_xent_keeps_pmls_floor_at_low_temperature(temperature):
    """Below τ ≈ 0.023 pml's -log(p + tiny) caps a pair's loss at ≈ 87.3 (float32) and fades its
    gradient; the exact cross-entropy would not. Both fused objectives keep pml's numbers."""
    from tasks.objectives import FusedNTXent, FusedSupervisedNTXent

    g = torch.Generator().manual_seed(5)
    a, b = (torch.randn(8, 8, generator=g, requires_grad=True) for _ in range(2))
    ref = losses.SelfSupervisedLoss(losses.NTXentLoss(temperature=temperature))(a, b)
    ref_grads = torch.autograd.grad(ref, (a, b))
    new = FusedNTXent(temperature)(a, b)
    torch.testing.assert_close(new, ref, rtol=1e-5, atol=1e-5)
    for x, y in zip(torch.autograd.grad(new, (a, b)), ref_grads):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)

    emb, labels = _batch(3, p=6, k=4, pk=True, device="cpu")
    emb = emb.float()
    ref_loss, ref_grad, _ = _loss_and_grad(PmlObjective(losses.NTXentLoss(temperature=temperature), None), emb, labels)
    loss, grad, _ = _loss_and_grad(FusedSupervisedNTXent(temperature), emb, labels)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-5)  # 1/τ = 200 scales fp32 rounding up


def test_self_supervised_objective_fuses_only_plain_nt_xent():
    from tasks.objectives import FusedNTXent, self_supervised_objective

    cpu = torch.device("cpu")
    assert isinstance(self_supervised_objective(Component(name="NTXentLoss", temperature=0.1), True, cpu)[0], FusedNTXent)
    assert isinstance(self_supervised_objective(Component(name="NTXentLoss"), False, cpu)[0], losses.SelfSupervisedLoss)
    other = self_supervised_objective(Component(name="TripletMarginLoss", margin=0.2), True, cpu)[0]
    assert isinstance(other, losses.SelfSupervisedLoss)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature", [0.1, 0.5])
@pytest.mark.parametrize("kind", ["pk", "random", "one_class"])
def test_fused_supervised_ntxent_equals_pml(kind, temperature, device):
    """NTXentLoss with labels and no miner: every same-label pair a positive. Value and gradient
    equal pml's, on P×K batches, random labels (singletons: anchors with no positive) and a
    one-class batch (anchors with no negative: loss 0, finite gradient)."""
    from tasks.objectives import FusedSupervisedNTXent

    emb, labels = _batch(3, p=6, k=4, pk=kind == "pk", device=device)
    if kind == "one_class":
        labels = torch.zeros_like(labels)
    spec = Component(name="NTXentLoss", temperature=temperature)
    fused = fused_equivalent(spec, None)
    assert isinstance(fused, FusedSupervisedNTXent)
    ref_loss, ref_grad, ref_stats = _loss_and_grad(PmlObjective(losses.NTXentLoss(temperature=temperature), None), emb, labels)
    loss, grad, stats = _loss_and_grad(fused, emb, labels)
    assert torch.isfinite(grad).all()
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-9, abs=1e-12)
    assert torch.allclose(grad, ref_grad, rtol=1e-7, atol=1e-10)
    same = labels[:, None] == labels[None, :]
    assert stats["mined"].item() == same.sum().item() - len(labels) + (~same).sum().item()
    # The curve means the same on both paths: pair counts and mean similarities (NaN: no pair).
    assert stats.keys() == ref_stats.keys() == {"mined", "pos_distance", "neg_distance"}
    for key in stats:
        a, b = float(stats[key]), float(ref_stats[key])
        assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-6), key


def test_ntxent_with_other_arguments_or_a_miner_stays_pmls():
    assert fused_equivalent(Component(name="NTXentLoss", temperature=0.1), Component(name="MultiSimilarityMiner")) is None
    assert fused_equivalent(Component(name="NTXentLoss", temperature=0.1, reducer=None), None) is None


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("per_class", [4, None])
def test_a_non_finite_embedding_makes_the_loss_non_finite(per_class, bad):
    """Mining selects nothing around a NaN, so without care the loss would read 0 and a diverged
    run would train on. All embeddings NaN: pml's loss is NaN too. One bad embedding: pml skips
    it (finite loss); ours is NaN on purpose — the train stage stops, naming the step."""
    emb, labels = _batch(7, p=4, k=4, dim=8)
    spec, miner = Component(name="TripletMarginLoss", margin=0.2), Component(name="TripletMarginMiner", margin=0.2, type_of_triplets="semihard")
    fused = fused_equivalent(spec, miner, per_class)
    pml = PmlObjective(losses.TripletMarginLoss(margin=0.2), miners.TripletMarginMiner(margin=0.2, type_of_triplets="semihard"))
    one_bad = emb.clone()
    one_bad[3, 0] = bad
    assert torch.isfinite(pml(one_bad, labels)[0]) and not torch.isfinite(fused(one_bad, labels)[0])
    all_bad = torch.full_like(emb, bad)
    assert not torch.isfinite(pml(all_bad, labels)[0]) and not torch.isfinite(fused(all_bad, labels)[0])


@pytest.mark.parametrize("per_class", [None, 4])
def test_fused_triplet_stays_float32_under_autocast(per_class):
    """Called inside a user's bf16 autocast block, the distances are still float32 ones."""
    emb, labels = _batch(5, dim=64)
    fused = FusedTriplet(0.1, 0.2, "semihard", per_class=per_class)
    l_ref, g_ref, s_ref = _loss_and_grad(fused, emb.float(), labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        l_new, g_new, s_new = _loss_and_grad(fused, emb.float(), labels)
    assert l_new.dtype == torch.float32
    torch.testing.assert_close(l_new, l_ref)
    torch.testing.assert_close(g_new, g_ref)
    _assert_same_stats(s_new, s_ref)


def test_a_proxy_loss_with_fewer_classes_than_the_data_is_a_params_error():
    """pml would fail on the first batch ("Class values must be smaller than num_classes")."""
    from tasks.errors import ParamsError

    loss = Component(name="ProxyAnchorLoss", num_classes=3)
    with pytest.raises(ParamsError, match="train.loss.num_classes: 3 is fewer than the 7 train classes"):
        build_objective(loss, None, True, torch.device("cpu"), num_classes=7, embedding_size=16)
    build_objective(Component(name="ProxyAnchorLoss", num_classes=9), None, True, torch.device("cpu"), num_classes=7, embedding_size=16)


def test_a_proxy_loss_without_a_miner_reports_pair_similarities_and_no_mining():
    """ArcFace compares embeddings with class weights: no tuples are mined, and a triplet
    margin test with its angular margin meant nothing. The batch's same-class and other-class
    pair similarities still show the classes separating."""
    emb = F.normalize(torch.randn(12, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    labels = torch.arange(4).repeat_interleave(3)
    objective, _ = build_objective(Component(name="ArcFaceLoss"), None, True, torch.device("cpu"), num_classes=4, embedding_size=8)
    _, stats = objective(emb, labels)
    assert set(stats) == {"pos_distance", "neg_distance"}
    sim = emb @ emb.T
    same = labels[:, None] == labels[None, :]
    pos = sim[same & ~torch.eye(12, dtype=torch.bool)].mean()
    assert float(stats["pos_distance"]) == pytest.approx(float(pos), abs=1e-6)
    assert float(stats["neg_distance"]) == pytest.approx(float(sim[~same].mean()), abs=1e-6)


def test_proxy_losses_are_told_apart_by_class_not_by_a_num_classes_argument():
    """CosFace takes num_classes only through **kwargs (its base's); MarginLoss takes one and is a
    triplet loss (num_classes: null — one shared beta — is pml's default and must stay usable)."""
    from tasks.errors import ParamsError

    cpu, labels = torch.device("cpu"), torch.arange(4).repeat_interleave(3)
    emb = F.normalize(torch.randn(12, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    cosface, _ = build_objective(Component(name="CosFaceLoss"), None, True, cpu, num_classes=4, embedding_size=8)
    assert set(cosface(emb, labels)[1]) == {"pos_distance", "neg_distance"}  # filled in, and no mining figures
    with pytest.raises(ParamsError, match="train.loss.num_classes: 3 is fewer than the 4 train classes"):
        build_objective(Component(name="CosFaceLoss", num_classes=3), None, True, cpu, num_classes=4, embedding_size=8)
    margin, _ = build_objective(Component(name="MarginLoss", num_classes=None), None, True, cpu, num_classes=4, embedding_size=8)
    assert {"mined", "frac_active"} <= set(margin(emb, labels)[1])


def test_cross_batch_memory_reports_what_it_mined_against_the_memory():
    """The issue's mining statistics for XBM too: the batch's anchors against the queue (the
    batch itself just enqueued, its self-pairs removed, as pml does)."""
    emb = F.normalize(torch.randn(12, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    labels = torch.arange(4).repeat_interleave(3)
    objective, _ = build_objective(Component(name="ContrastiveLoss"), None, True, torch.device("cpu"),
                                   embedding_size=8, memory_size=64)
    _, stats = objective(emb, labels)
    d = torch.cdist(emb, emb)
    same, off = labels[:, None] == labels[None, :], ~torch.eye(12, dtype=torch.bool)
    assert float(stats["memory_filled"]) == 12
    assert float(stats["mined"]) == 12 * 11  # every pair with the memory but an image with itself
    assert float(stats["pos_distance"]) == pytest.approx(float(d[same & off].mean()), abs=1e-5)
    assert float(stats["neg_distance"]) == pytest.approx(float(d[~same].mean()), abs=1e-5)
    _, stats = objective(emb.flip(0), labels.flip(0))  # the memory now holds both batches
    assert float(stats["memory_filled"]) == 24 and float(stats["mined"]) == 12 * 23

    mined, _ = build_objective(Component(name="ContrastiveLoss"), Component(name="MultiSimilarityMiner", epsilon=0.1),
                               True, torch.device("cpu"), embedding_size=8, memory_size=64)
    _, stats = mined(emb, labels)
    assert {"mined", "pos_distance", "neg_distance", "memory_filled"} <= set(stats) and 0 < float(stats["mined"]) < 12 * 11


def test_a_pair_miner_feeding_a_triplet_loss_is_counted_in_the_loss_triplets():
    """BatchEasyHardMiner returns pairs; TripletMarginLoss joins them at common anchors. The curve
    counts those triplets and how many are active, as for a triplet miner."""
    from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

    emb, labels = _batch(4, p=8, k=4)
    emb = emb.float()
    miner, loss_fn = miners.BatchEasyHardMiner(), losses.TripletMarginLoss(margin=0.2)
    _, stats = PmlObjective(loss_fn, miner)(emb, labels)
    pairs = miner(emb, labels)
    a, p, n = lmu.convert_to_triplets(pairs, labels)
    assert len(a) != len(pairs[0]) + len(pairs[2])  # pairs and triplets differ here
    d = loss_fn.distance(emb)
    assert stats["mined"].item() == len(a)
    assert stats["frac_active"].item() == pytest.approx((d[a, p] - d[a, n] + 0.2 > 0).float().mean().item())
    assert stats["pos_distance"].item() == pytest.approx(d[a, p].mean().item())
