import numpy as np
import pytest
import torch

from tasks.engine import loss_of, make_scheduler, recall_at_1, train_epoch
from tasks.objectives import FusedTriplet


def test_warmup_then_cosine_schedule():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_scheduler(opt, "cosine", warmup_steps=4, total_steps=14)
    lrs = []
    for _ in range(14):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0) and lrs[9] == pytest.approx(0.5) and lrs[-1] < 0.05
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))  # decays monotonically after warm-up


def test_constant_schedule_after_warmup():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = make_scheduler(opt, "constant", warmup_steps=0, total_steps=5)
    for _ in range(5):
        assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
        opt.step()
        sched.step()


def test_the_epoch_reports_the_mean_rate_it_trained_with():
    """Not the rate after its last step (the next epoch's): with warm-up and a cosine decay the
    first epoch would show the peak and the last one 0."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = make_scheduler(opt, "cosine", warmup_steps=4, total_steps=8)
    pixels = torch.randint(0, 256, (8, 1, 2, 2), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    compute = loss_of(lambda x: model(x.float()), FusedTriplet(margin=0.2))
    rows = [train_epoch(model, compute, opt, pixels, torch.arange(8) // 2, [np.arange(8)] * 4, epoch=e, scheduler=sched)
            for e in range(2)]
    assert rows[0]["lr"] == pytest.approx((0.25 + 0.5 + 0.75 + 1.0) / 4)
    assert 0 < rows[1]["lr"] < 1.0 and opt.param_groups[0]["lr"] == pytest.approx(0.0)


def test_gradient_clipping_bounds_the_update():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    pixels = torch.randint(0, 256, (8, 1, 2, 2), dtype=torch.uint8)
    labels = torch.arange(8) // 2
    compute = loss_of(lambda x: model(x.float() * 100), FusedTriplet(margin=5.0))
    train_epoch(model, compute, opt, pixels, labels, [np.arange(8)], epoch=0, clip=1e-3)
    moved = torch.sqrt(sum(((p - b) ** 2).sum() for p, b in zip(model.parameters(), before)))
    assert 0 < moved.item() <= 1e-3 + 1e-7  # SGD lr=1: the step is the clipped gradient


def test_a_frozen_part_keeps_the_statistics_of_its_unweighted_batchnorm():
    """BatchNorm(affine=False) has no weights of its own to be frozen: the frozen part holding it
    decides, or the "frozen" trunk would still change with every batch."""
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.trunk = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2, affine=False), torch.nn.Flatten())
    model.head = torch.nn.Sequential(torch.nn.Linear(8, 3), torch.nn.BatchNorm1d(3, affine=False))
    model.trunk.requires_grad_(False)
    opt = torch.optim.SGD(model.head.parameters(), lr=0.1)
    pixels = torch.randint(0, 256, (8, 1, 2, 2), dtype=torch.uint8)
    compute = loss_of(lambda x: model.head(model.trunk(x.float())), FusedTriplet(margin=0.2))
    train_epoch(model, compute, opt, pixels, torch.arange(8) // 2, [np.arange(8)], epoch=0)
    assert torch.equal(model.trunk[1].running_mean, torch.zeros(2)) and model.trunk[1].num_batches_tracked == 0
    assert model.head[1].num_batches_tracked == 1  # the part that trains keeps tracking


class _Lookup(torch.nn.Module):
    """"Images" are row numbers (N, 1, 1, 1); the embedding of row i is ``table[i]``."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[x.reshape(-1).long()]


def test_validation_recall_at_1_shares_tied_neighbours_and_ignores_row_order():
    labels = torch.tensor([0] * 4 + [1] * 3 + [2] * 2)
    rows = torch.arange(9, dtype=torch.uint8).reshape(9, 1, 1, 1)
    collapsed = _Lookup(torch.ones(9, 3))
    # Every image ties with the 8 others: chance is (its class size - 1) / 8, blocks or not.
    chance = (4 * 3 + 3 * 2 + 2 * 1) / 8 / 9
    assert recall_at_1(collapsed, rows, labels, batch_size=2) == pytest.approx(chance)
    assert recall_at_1(collapsed, rows, labels.flip(0), batch_size=4) == pytest.approx(chance)
    # Distinct embeddings: the plain Recall@1 (2 classes on the unit circle, one image misplaced).
    angle = torch.tensor([0.0, 0.1, 0.2, 1.0, 1.1, 0.35])
    points = _Lookup(torch.stack([angle.cos(), angle.sin()], 1))
    two = torch.tensor([0, 0, 0, 1, 1, 1])
    plain = np.mean([1, 1, 1, 1, 1, 0])  # image 5 (at 0.35) sits nearest class 0's image at 0.2
    assert recall_at_1(points, rows[:6], two, batch_size=4) == pytest.approx(plain)



def test_a_step_that_mined_nothing_does_not_blank_the_epochs_statistics():
    """pml's statistics of an empty set of tuples are NaN: one such step among many must not make
    the epoch's mean distance NaN (the DVC plot and MLflow would lose the epoch); all such: NaN."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pixels = torch.randint(0, 256, (8, 1, 2, 2), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    per_step = iter([float("nan"), 0.25, 0.75, float("nan")])

    def compute(x, labels):
        out = model(x.float()).sum()
        d = out.new_tensor(next(per_step))
        return out, {"mined": out.new_tensor(0.0 if d.isnan() else 2.0), "pos_distance": d, "neg_distance": out.new_tensor(float("nan"))}

    row = train_epoch(model, compute, opt, pixels, torch.arange(8) // 2, [np.arange(8)] * 4, epoch=0)
    assert row["pos_distance"] == pytest.approx(0.5) and row["mined"] == pytest.approx(1.0)
    assert np.isnan(row["neg_distance"])
