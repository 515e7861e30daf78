"""Every documented loss/miner preset learns: a few epochs on separable synthetic data lower the
loss and raise Recall@1 on held-out images of the same classes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import default_params
from tasks.engine import train_epoch
from tasks.sampling import plan_epoch
from tasks.params import parse_params
from tasks.presets import MINING, PRESETS
from tasks.recipe import build

N_CLASSES, PER_CLASS, SIZE = 8, 24, 16


def _data(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class prototypes (fixed) plus heavy per-image noise: (N, 1, S, S) uint8, labels (N,)."""
    protos = np.random.default_rng(0).integers(0, 256, size=(N_CLASSES, SIZE * SIZE))
    rng = np.random.default_rng(seed)
    x = np.clip(np.repeat(protos, PER_CLASS, 0) + rng.normal(0, 110, (N_CLASSES * PER_CLASS, SIZE * SIZE)), 0, 255)
    labels = np.repeat(np.arange(N_CLASSES), PER_CLASS)
    return torch.from_numpy(x.astype(np.uint8).reshape(-1, 1, SIZE, SIZE)), torch.from_numpy(labels)


@torch.no_grad()
def _recall_at_1(model, x, y) -> float:
    model.eval()
    emb = model(x)
    sim = emb @ emb.T
    sim.fill_diagonal_(-2)
    return (y[sim.argmax(1)] == y).float().mean().item()


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_lowers_the_loss_and_raises_recall(name, tmp_path: Path):
    raw = default_params()
    raw["train"] |= {"width": 16, "embedding_dim": 16, "device": "cpu", "cross_batch_memory": 0} | PRESETS[name]
    raw["train"]["optimizer"] = {"name": "AdamW", "lr": 0.001}  # this test's schedule, not the default's
    params = parse_params(raw, tmp_path).train
    torch.manual_seed(0)
    x, y = _data(seed=1)
    x_eval, y_eval = _data(seed=2)
    meta = {"channels": 1, "height": SIZE, "n_train_classes": N_CLASSES}
    model, compute, loss_fn, optimizer, _ = build(params, meta, torch.device("cpu"), per_class=6)
    # A preset whose file says its loss has weights (proxies) must train them with the network:
    # left out of the optimizer they would stay at their random init and the test above still pass.
    loss_weights = dict(loss_fn.named_parameters())
    assert bool(loss_weights) == ("the loss has weights" in (MINING / f"{name}.yaml").read_text()), name
    optimized = {id(t) for group in optimizer.param_groups for t in group["params"]}
    assert all(id(t) in optimized for t in loss_weights.values()), f"{name}: loss weights not in the optimizer"
    initial = {k: t.detach().clone() for k, t in loss_weights.items()}
    before = _recall_at_1(model, x_eval, y_eval)
    rng = np.random.default_rng(0)
    classes = [np.flatnonzero(y.numpy() == c) for c in range(N_CLASSES)]
    losses = []
    for epoch in range(6):
        batches = plan_epoch(classes, p=4, k=6, rng=rng)
        losses.append(train_epoch(model, compute, optimizer, x, y, batches, epoch)["loss"])
    after = _recall_at_1(model, x_eval, y_eval)
    assert losses[-1] < losses[0], f"{name}: loss {losses}"
    assert after > before, f"{name}: Recall@1 {before:.3f} -> {after:.3f}"
    for k, t in loss_weights.items():
        assert not torch.equal(t.detach(), initial[k]), f"{name}: loss weight {k} did not train"


def test_readme_documents_every_preset():
    """README's preset table: one row per preset, its loss and miner cells exactly the preset's
    (parsed as the YAML they are), so an edited preset file cannot leave a stale row behind."""
    import re

    import yaml

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    rows = {}
    for line in readme.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        name = re.match(r"`([a-z0-9-]+)`", cells[0]) if len(cells) == 3 else None
        if name and name.group(1) in PRESETS:
            assert name.group(1) not in rows, f"two README rows for {name.group(1)}"
            rows[name.group(1)] = cells
    assert sorted(rows) == sorted(PRESETS)
    for name, preset in PRESETS.items():
        _, loss_cell, miner_cell = rows[name]
        # The loss cell: the loss, then any other train key the preset sets (`cross_batch_memory: N`).
        loss, *others = [yaml.safe_load(code) for code in re.findall(r"`([^`]*)`", loss_cell)]
        assert loss == preset["loss"], name
        extra = {k: v for other in others for k, v in other.items()}
        assert extra.get("cross_batch_memory", 0) == preset.get("cross_batch_memory", 0), name
        assert yaml.safe_load(re.fullmatch(r"`([^`]*)`", miner_cell).group(1)) == preset["miner"], name
