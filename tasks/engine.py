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
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu


def mining_stats(emb: torch.Tensor, tuples: tuple, loss_fn) -> dict[str, torch.Tensor]:
    """What the miner found in one batch, as 0-d tensors: count, mean positive / negative distance
    and, for triplets, the fraction still violating the margin ("active") — the loss only learns
    from those.

    emb (B, D); tuples: a miner's (a, p, n) triplets or (a1, p, a2, n) pairs (indices into emb).
    """
    dist = loss_fn.distance
    mat = dist(emb)
    nan = emb.new_tensor(float("nan"))
    mean = lambda x: x.mean() if len(x) else nan  # noqa: E731
    if len(tuples) == 3:
        a, p, n = tuples
        d_ap, d_an = mat[a, p], mat[a, n]
        sign = -1.0 if dist.is_inverted else 1.0  # similarities: larger = closer
        margin = float(getattr(loss_fn, "margin", 0.0) or 0.0)
        active = (sign * (d_ap - d_an) + margin) > 0
        return {
            "mined": emb.new_tensor(float(len(a))),
            "frac_active": active.float().mean() if len(a) else emb.new_tensor(0.0),
            "pos_distance": mean(d_ap),
            "neg_distance": mean(d_an),
        }
    a1, p, a2, n = tuples
    return {
        "mined": emb.new_tensor(float(len(a1) + len(a2))),
        "pos_distance": mean(mat[a1, p]),
        "neg_distance": mean(mat[a2, n]),
    }


def train_epoch(
    model: torch.nn.Module,
    loss_fn: torch.nn.Module,
    miner: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    batches: Sequence[np.ndarray],
    epoch: int,
    on_step: Callable[[], None] = lambda: None,
) -> dict[str, float]:
    """One epoch; returns the epoch's mean statistics and its img/s.

    pixels uint8 (N, C, H, W) and labels int64 (N,) on the training device; each batch is an int64
    array of row indices (P·K,). Raises FloatingPointError naming the epoch and the first step
    whose loss was not finite.
    """
    model.train()
    device = pixels.device
    sums: dict[str, torch.Tensor] = {}
    first_bad = torch.tensor(-1, device=device)
    seen, start = 0, time.perf_counter()
    for step, idx in enumerate(batches):
        idx_t = torch.from_numpy(idx).to(device, non_blocking=True)
        emb = model(pixels[idx_t])
        y = labels[idx_t]
        tuples = miner(emb, y) if miner is not None else None  # None: the loss uses every tuple
        loss = loss_fn(emb, y, tuples)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step, first_bad)
            mined = tuples if tuples is not None else lmu.get_all_triplets_indices(y)
            for k, v in {"loss": loss.detach(), **mining_stats(emb.detach(), mined, loss_fn)}.items():
                sums[k] = sums[k] + v if k in sums else v.clone()
        seen += len(idx)
        on_step()
    bad = int(first_bad)  # the epoch's one synchronisation
    if bad >= 0:
        raise FloatingPointError(f"train: loss is not finite at epoch {epoch}, step {bad}")
    row = {k: float(v) / max(len(batches), 1) for k, v in sums.items()}
    row["img_per_s"] = seen / max(time.perf_counter() - start, 1e-9)
    return row
