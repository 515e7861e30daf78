"""The training engine: epochs over a batch plan on device-resident pixels, no I/O, no tracking.

``tasks.train`` wraps it with reading, checkpointing and MLflow; benchmarks call it directly.
A step is an index gather on the device — no decode, no host→device copy of images — and the
per-step statistics stay on the device until the end of the epoch (one synchronisation per epoch
instead of several per step).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch

from tasks.distributed import SINGLE, World, gather, local_rows, sum_gradients

# objective(embeddings (B, D) float32, labels (B,)) -> (scalar loss, {name: 0-d tensor}); see
# tasks.objectives.
Objective = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]
# The same signature one level up: uint8 images (B, C, H, W) instead of embeddings.
LossOf = Objective


def loss_of(
    model: torch.nn.Module, objective: Objective, bf16: bool = False, compile: bool | str = False, world: World = SINGLE,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> LossOf:
    """``(uint8 images (B/W, C, H, W), labels (B,)) -> (loss, stats)``: the network, under bfloat16
    autocast if ``bf16``, then the objective in float32 (distances between near-identical
    embeddings need the precision). ``compile``: through torch.compile, network and objective
    together (a sync-free objective then becomes one graph); ``"reduce-overhead"``: in that mode,
    which replays the compiled forward and backward as CUDA graphs. With ``world`` of W > 1 processes the
    images are this rank's slice of the batch and the labels the whole batch's: embeddings are
    gathered, so the objective mines the global batch (see tasks.distributed). ``augment``: uint8
    (B, C, H, W) -> float (B, C, H, W) in 0..255 applied to the images first (tasks.augment)."""

    def compute(x: torch.Tensor, y: torch.Tensor):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            emb = model(x)
        return objective(gather(emb.float(), world), y)

    network = _compiled(compute, compile)
    if augment is None:
        return network

    def augmented(x: torch.Tensor, y: torch.Tensor):
        # Outside torch.compile: the draws come from the augmenter's own seeded generator.
        return network(augment(x), y)

    return augmented


def _compiled(fn: Callable, compile: bool | str) -> Callable:
    """``fn`` through torch.compile as ``train.compile`` asks: false = eager, true = inductor's
    default mode, a string = that mode (``reduce-overhead``)."""
    if not compile:
        return fn
    return torch.compile(fn, mode=compile if isinstance(compile, str) else None)


def self_supervised_loss_of(
    model: torch.nn.Module, loss: torch.nn.Module, augment, bf16: bool = False, world: World = SINGLE,
    compile: bool | str = False, distance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = torch.cdist,
) -> LossOf:
    """Like :func:`loss_of` without labels: two augmented views of each image, embedded together,
    are each other's positive. ``loss(a, b)`` takes the two views' embeddings (pml's
    SelfSupervisedLoss or tasks.objectives.FusedNTXent), gathered across ranks (every other image
    of the global batch is a negative). ``compile`` as in :func:`loss_of`, the augmentation outside.
    ``distance(a, b)`` -> (B, B), the loss's own (pml's ``loss.distance``: cosine similarity for
    NT-Xent, as supervised training logs it), gives the statistics."""

    def embed(views: torch.Tensor):  # (2B/W, C, H, W) float -> (loss, stats)
        with torch.autocast(views.device.type, dtype=torch.bfloat16, enabled=bf16):
            emb = model(views).float()
        a, b = (gather(v, world) for v in emb.chunk(2))
        with torch.no_grad():
            d = distance(a, b)  # (B, B): the diagonal holds the positive pairs, the rest the negatives
            n = d.shape[0]
            stats = {"pos_distance": d.diagonal().mean(), "neg_distance": (d.sum() - d.diagonal().sum()) / max(n * (n - 1), 1)}
        return loss(a, b), stats

    network = _compiled(embed, compile)

    def compute(x: torch.Tensor, _labels: torch.Tensor):
        # Outside torch.compile, as in loss_of: the draws come from the augmenter's seeded generator.
        return network(torch.cat([augment(x), augment(x)]))

    return compute


def train_epoch(
    model: torch.nn.Module,
    compute: LossOf,
    optimizer: torch.optim.Optimizer,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    batches: Sequence[np.ndarray],
    epoch: int,
    on_step: Callable[[], None] = lambda: None,
    clip: float = 0.0,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    world: World = SINGLE,
) -> dict[str, float]:
    """One epoch; returns the epoch's mean statistics and its img/s.

    pixels uint8 (N, C, H, W) and labels int64 (N,) on the training device; each batch is an int64
    array of row indices (P·K,); ``compute`` comes from :func:`loss_of`. ``clip`` > 0 clips the
    gradient norm; ``scheduler`` steps once per batch. With ``world`` of W > 1 processes this rank
    embeds its slice of each batch and the network's gradients are summed over ranks (before
    clipping, so the norm is the global batch's). Raises FloatingPointError naming the epoch
    and the first step whose loss was not finite.
    """
    trained = [p for group in optimizer.param_groups for p in group["params"]]
    network = list(model.parameters())
    model.train()
    # A frozen part (freeze_backbone_epochs) keeps its BatchNorm statistics too: in train mode
    # they would follow every batch's mean and variance, and the "frozen" backbone change. Frozen:
    # the norm's own weights are, or (affine=False: it has none) the whole part holding it is.
    for part in model.children():
        weights = list(part.parameters())
        part_frozen = bool(weights) and not any(p.requires_grad for p in weights)
        for m in part.modules():
            own = list(m.parameters(recurse=False))
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and (
                part_frozen or (own and not any(p.requires_grad for p in own))
            ):
                m.eval()
    device = pixels.device
    # Each step's loss and statistics stacked into one float64 vector on the device: one kernel a
    # step instead of an add per figure; read once, at the end of the epoch.
    names: list[str] = []
    steps: list[torch.Tensor] = []
    seen, start, lr_sum = 0, time.perf_counter(), 0.0
    for step, idx in enumerate(batches):
        lr_sum += optimizer.param_groups[0]["lr"]  # the rate this step uses (the scheduler moves it after)
        idx_t = torch.from_numpy(idx).to(device, non_blocking=True)
        mine = idx_t if world.size == 1 else torch.from_numpy(local_rows(idx, world)).to(device, non_blocking=True)
        loss, stats = compute(pixels[mine], labels[idx_t])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        sum_gradients(network, world)
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(trained, clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        names = names or ["loss", *stats]
        row_t = torch.empty(len(names), dtype=torch.float64, device=device)  # exact for int64 counts too
        steps.append(torch.stack([loss.detach(), *(stats[k] for k in names[1:])], out=row_t))
        seen += len(idx)
        on_step()
    row: dict[str, float] = {}
    if steps:
        table = torch.stack(steps).cpu()  # (steps, 1 + statistics): the epoch's one synchronisation
        bad = (~torch.isfinite(table[:, 0])).nonzero()
        if len(bad):
            raise FloatingPointError(f"train: loss is not finite at epoch {epoch}, step {int(bad[0, 0])}")
        # A statistic of the mined tuples is NaN in a step that mined none (pml's empty mean): the
        # epoch's is the mean over the steps that had some, NaN only when none had.
        row = dict(zip(names, table.nanmean(0).tolist()))
    row["img_per_s"] = seen / max(time.perf_counter() - start, 1e-9)
    # The mean rate the epoch trained with: read after the last step it is the next epoch's.
    row["lr"] = lr_sum / len(batches) if len(batches) else optimizer.param_groups[0]["lr"]
    return row


@contextmanager
def deterministic(on: bool) -> Iterator[None]:
    """Deterministic kernels while training (``train.deterministic``): cuDNN autotuning off, torch's
    deterministic algorithms on — an op without a deterministic implementation raises, naming the
    op, rather than silently varying. Restores the previous settings afterwards, since a Prefect
    flow runs later stages in the same process. On CPU our training is deterministic either way."""
    if not on:
        yield
        return
    # cuBLAS needs a fixed workspace for reproducible matmuls (read when its handle is created).
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before[1], before[2]


def make_scheduler(optimizer: torch.optim.Optimizer, kind: str, warmup_steps: int, total_steps: int):
    """Per-step LR factor: linear warm-up over ``warmup_steps``, then constant or cosine to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind == "constant":
            return 1.0
        done = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(done, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@torch.no_grad()
def recall_at_1(model: torch.nn.Module, pixels: torch.Tensor, labels: torch.Tensor, batch_size: int = 1024) -> float:
    """Leave-one-out Recall@1 of uint8 images (N, C, H, W) with labels (N,): the share whose nearest
    other image has their label — tied nearest images share the credit, as evaluate counts them
    (:mod:`tasks.ties`): else a collapsed model, all its images tied, would score by row order.
    Blocks of ``batch_size`` rows bound memory to batch × N."""
    model.eval()
    emb = torch.cat([model(pixels[i : i + batch_size]).float() for i in range(0, len(pixels), batch_size)])
    right = torch.empty(len(emb), dtype=torch.float64, device=emb.device)
    for i in range(0, len(emb), batch_size):
        sim = emb[i : i + batch_size] @ emb.T
        rows = torch.arange(len(sim), device=emb.device)
        sim[rows, rows + i] = float("-inf")  # never oneself
        nearest = sim == sim.amax(1, keepdim=True)  # (b, N): the tied maxima
        same = labels[None, :] == labels[i : i + batch_size, None]
        right[i : i + batch_size] = (nearest & same).sum(1) / nearest.sum(1).clamp(min=1)
    return right.mean().item()


class EarlyStopping:
    """Stop after ``patience`` epochs without a better score; remember the best epoch's weights.
    Has state_dict / load_state_dict so a resumed run continues the same count."""

    def __init__(self, patience: int):
        self.patience, self.best, self.best_epoch, self.weights = patience, float("-inf"), -1, None

    def update(self, epoch: int, score: float, model: torch.nn.Module) -> bool:
        """Record ``epoch``'s score; True when training should stop."""
        if score > self.best:
            self.best, self.best_epoch = score, epoch
            self.weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return self.exhausted(epoch)

    def exhausted(self, epoch: int) -> bool:
        """No better score for ``patience`` epochs up to ``epoch``."""
        return self.best_epoch >= 0 and epoch - self.best_epoch >= self.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch, "weights": self.weights}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_epoch, self.weights = state["best"], state["best_epoch"], state["weights"]
