"""What is trained and how, from ``train`` params: network, objective, optimizer, augmenter.

Shared by the train stage and the benchmarks, so a benchmark measures exactly what the stage runs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from tasks import distributed
from tasks.cpu_memory import keep_freed_memory
from tasks.augment import Augmenter
from tasks.distributed import SINGLE, World
from tasks.engine import LossOf, loss_of, self_supervised_loss_of
from tasks.hardware import native_bf16_cpu
from tasks.models import EmbeddingNet
from tasks.objectives import MemoryObjective, build_objective, self_supervised_objective
from tasks.params import TrainParams
from tasks.resume import GlobalRng


class Built(NamedTuple):
    model: EmbeddingNet
    compute: LossOf  # (images, labels) -> (loss, stats)
    loss_fn: torch.nn.Module  # holds the loss's own weights (ArcFace, ProxyAnchor...)
    optimizer: torch.optim.Optimizer
    stateful: dict  # everything a resumed run must restore (scheduler added by run)


def build(
    params: TrainParams, items_meta: dict, device: torch.device, per_class: int | None = None,
    pretrained: str | None = None, world: World = SINGLE,
) -> Built:
    """The model and how it learns, on ``device``; loss, miner and optimizer chosen by name.
    ``per_class``: every batch holds exactly that many images of each of its classes (a P×K plan),
    which lets the fused objective use static shapes. ``pretrained``: ``params.pretrained`` with a
    relative path resolved. ``world``: this process's rank among torchrun's (BatchNorm synchronised,
    embeddings gathered, rank 0's initial weights everywhere)."""
    if device.type == "cpu":
        # Else every activation over 32 MiB is unmapped on free and faults back in the next step.
        keep_freed_memory()
    model = EmbeddingNet(
        {
            "backbone": params.backbone,
            "width": params.width,
            "embedding_dim": params.embedding_dim,
            "in_channels": items_meta["channels"],
            "image_size": items_meta["height"],
            "pooling": params.pooling,
        },
        pretrained or params.pretrained,
    ).to(device)
    model = distributed.sync_batchnorm(model, world, device)
    if params.channels_last:
        model = model.to(memory_format=torch.channels_last)
    bf16 = use_bf16(params, device)
    stateful: dict = {"model": model, "rng": GlobalRng(device)}
    augmenter = None
    if params.mode == "self_supervised" or params.augment.supervised:
        # Each rank draws its own augmentations (the same draws would correlate their slices).
        augmenter = stateful["augment"] = Augmenter(params.augment, params.seed + world.rank, device)
    if params.mode == "self_supervised":
        ssl_loss, loss_fn = self_supervised_objective(params.loss, params.fused_mining, device)
        compute = self_supervised_loss_of(model, ssl_loss, augmenter, bf16, world, params.compile, loss_fn.distance)
    else:
        objective, loss_fn = build_objective(
            params.loss, params.miner, params.fused_mining, device,
            num_classes=items_meta["n_train_classes"], embedding_size=params.embedding_dim,
            memory_size=params.cross_batch_memory, per_class=per_class,
        )
        compute = loss_of(model, objective, bf16, params.compile, world, augmenter)
        if isinstance(objective, MemoryObjective):
            stateful["memory"] = objective
    distributed.broadcast([model, loss_fn], world)
    # Losses with weights (ArcFace, ProxyAnchor...) train together with the network.
    trainable = list(model.parameters()) + list(loss_fn.parameters())
    optimizer = getattr(torch.optim, params.optimizer.name)(trainable, **params.optimizer.kwargs)
    return Built(model, compute, loss_fn, optimizer, stateful | {"loss": loss_fn, "optimizer": optimizer})


def use_bf16(params: TrainParams, device: torch.device) -> bool:
    """bf16 autocast for the network: asked for, or ``auto`` on CUDA and on a CPU with bf16 in
    hardware (there the small CNN's step runs ~1.7× faster than in fp32; emulated elsewhere)."""
    if params.precision != "auto":
        return params.precision == "bf16"
    return device.type == "cuda" or (device.type == "cpu" and native_bf16_cpu())
