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
from tasks.presets import PRESETS
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
    model, compute, _, optimizer, _ = build(params, meta, torch.device("cpu"), per_class=6)
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


def test_readme_documents_every_preset():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for name, preset in PRESETS.items():
        assert f"`{name}`" in readme, name
        assert preset["loss"]["name"] in readme, name
