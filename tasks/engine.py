"""The training engine: epochs over a batch plan on device-resident pixels, no I/O, no tracking.

``tasks.train`` wraps it with reading, checkpointing and MLflow; benchmarks call it directly.
A step is an index gather on the device — no decode, no host→device copy of images — and the
per-step statistics stay on the device until the end of the epoch (one synchronisation per epoch
instead of several per step).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

# objective(embeddings (B, D) float32, labels (B,)) -> (scalar loss, {name: 0-d tensor}); see
# tasks.objectives.
Objective = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]


LossOf = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def loss_of(model: torch.nn.Module, objective: Objective, bf16: bool = False, compile: bool = False) -> LossOf:
    """``(uint8 images (B, C, H, W), labels (B,)) -> (loss, stats)``: the network, under bfloat16
    autocast if ``bf16``, then the objective in float32 (distances between near-identical
    embeddings need the precision). ``compile``: through torch.compile, network and objective
    together (a sync-free objective then becomes one graph)."""

    def compute(x: torch.Tensor, y: torch.Tensor):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            emb = model(x)
        return objective(emb.float(), y)

    return torch.compile(compute) if compile else compute


def train_epoch(
    model: torch.nn.Module,
    compute: LossOf,
    optimizer: torch.optim.Optimizer,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    batches: Sequence[np.ndarray],
    epoch: int,
    on_step: Callable[[], None] = lambda: None,
) -> dict[str, float]:
    """One epoch; returns the epoch's mean statistics and its img/s.

    pixels uint8 (N, C, H, W) and labels int64 (N,) on the training device; each batch is an int64
    array of row indices (P·K,); ``compute`` comes from :func:`loss_of`. Raises FloatingPointError
    naming the epoch and the first step whose loss was not finite.
    """
    model.train()
    device = pixels.device
    sums: dict[str, torch.Tensor] = {}
    first_bad = torch.tensor(-1, device=device)
    seen, start = 0, time.perf_counter()
    for step, idx in enumerate(batches):
        idx_t = torch.from_numpy(idx).to(device, non_blocking=True)
        loss, stats = compute(pixels[idx_t], labels[idx_t])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step, first_bad)
            for k, v in {"loss": loss.detach(), **stats}.items():
                sums[k] = sums[k] + v if k in sums else v.clone()
        seen += len(idx)
        on_step()
    bad = int(first_bad)  # the epoch's one synchronisation
    if bad >= 0:
        raise FloatingPointError(f"train: loss is not finite at epoch {epoch}, step {bad}")
    row = {k: float(v) / max(len(batches), 1) for k, v in sums.items()}
    row["img_per_s"] = seen / max(time.perf_counter() - start, 1e-9)
    return row
