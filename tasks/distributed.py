"""Data-parallel training across processes and machines, launched by ``torchrun``.

    train.processes: 4 in params.yaml                                       # 4 GPUs, one machine
    torchrun --nproc_per_node=4 -m tasks.train --params params.yaml          # the same, by hand
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-endpoint=host:29500 -m tasks.train ...

With ``train.processes`` > 1 the train stage launches torchrun itself (:func:`launch`), so
``dvc repro`` and the Prefect flow (and its deployments) train on several GPUs with no other change.

Every rank holds the whole train set and the whole batch plan. Rank ``r`` of ``W`` embeds slice
``r`` of each global P×K batch — whole classes when W divides P, since the plan lists a batch class
by class — then the embeddings are all-gathered, so mining and the loss see the *global* batch
(hard negatives from every rank, as pytorch-metric-learning's DistributedLossWrapper does), and the
network's gradients are summed across ranks. BatchNorm statistics are synchronised too. The result
is the update one process would make with the global batch, up to floating-point summation order.

Why not ``DistributedDataParallel``: every rank computes the loss of the whole gathered batch but
only its own slice carries gradient, so the right reduction is a *sum* (DDP averages), and losses
with weights of their own (ArcFace, ProxyAnchor) already get the full gradient on every rank and
must not be reduced at all. One coalesced all-reduce per step is simple and exact.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from tasks.cli import parent_death_signal
from tasks.errors import ParamsError
from tasks.models import gpu_errors, pick_device


@dataclass(frozen=True)
class World:
    """This process's place: ``rank`` of ``size`` processes (1 = not distributed)."""

    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """The rank that logs, checkpoints and writes outputs."""
        return self.rank == 0


SINGLE = World()


def init(device_name: str, section: str = "") -> tuple[World, torch.device]:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK in the environment);
    a plain ``python -m`` run is a world of one. NCCL on CUDA (one GPU per local rank), gloo on CPU.
    ``section``: the stage's, named by an error about its ``device``."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(device_name, section)
    if size <= 1:
        return SINGLE, device
    rank = int(os.environ["RANK"])
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(rank, size), device


def under_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def launch(module: str, params, paths, parent_run_id: str | None) -> dict:
    """Run ``module``'s stage in ``params.processes`` local processes under torchrun; return rank 0's
    result. The stage's params and paths travel as JSON (the flow's overrides included)."""
    errors = gpu_errors(module.rsplit(".", 1)[-1], params.device, params.processes)
    if errors:
        raise ParamsError("; ".join(errors))
    with tempfile.TemporaryDirectory(prefix="tripletflow-launch-") as tmp:
        job, result = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job.write_text(json.dumps({
            "params": params.model_dump(mode="json"), "paths": paths.model_dump(mode="json"),
            "parent_run_id": parent_run_id, "result": str(result),
        }))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={params.processes}",
               "-m", module, "--job", str(job)]
        code = subprocess.run(cmd).returncode
        if code != 0 or not result.exists():
            raise RuntimeError(f"{module}: the {params.processes} torchrun processes failed (exit {code}); their output is above")
        return json.loads(result.read_text())


def run_job(job_file: str, run: Callable[..., dict], params_type, paths_type) -> None:
    """The other side of :func:`launch`, in each torchrun process: rank 0 writes the result."""
    _die_with_parent()
    job = json.loads(Path(job_file).read_text())
    params = params_type.model_validate_json(json.dumps(job["params"]))
    paths = paths_type.model_validate_json(json.dumps(job["paths"]))
    result = run(params, paths) if job["parent_run_id"] is None else run(params, paths, job["parent_run_id"])
    if os.environ.get("RANK", "0") == "0":
        Path(job["result"]).write_text(json.dumps(result, default=str))


def _die_with_parent() -> None:
    """This rank dies with its torchrun agent (Linux: PR_SET_PDEATHSIG). An agent killed with
    SIGKILL cannot stop its workers, and orphaned ranks would go on training and write the stage's
    outputs under a restarted run's feet."""
    if die := parent_death_signal(signal.SIGKILL, os.getppid()):
        die()


def gather_rows(part: np.ndarray, beside: Path, world: World) -> np.ndarray:
    """Rank 0 gets every rank's rows (N_r, D) stacked in rank order; the others get ``part``.
    Through files beside ``beside`` rather than the process group: arrays of any size, any backend."""
    if world.size == 1:
        return part
    mine = beside.with_name(f".{beside.name}.rank{world.rank}.npy")
    np.save(mine, part)
    dist.barrier()
    if not world.main:
        return part
    files = [beside.with_name(f".{beside.name}.rank{r}.npy") for r in range(world.size)]
    rows = np.concatenate([np.load(f) for f in files])
    for f in files:
        f.unlink()
    return rows


def gather_objects(obj: Any, world: World) -> list[Any] | None:
    """Rank 0 gets every rank's ``obj`` in rank order (small picklable states); the others None.
    A collective: every rank calls it."""
    if world.size == 1:
        return [obj]
    out = [None] * world.size if world.main else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_object(obj: Any, world: World) -> Any:
    """Rank 0's ``obj`` on every rank (a collective: every rank calls it; the others pass None).
    Rank 0 decides what all must agree on: a file only its machine may see, a stopping decision."""
    if world.size == 1:
        return obj
    box = [obj if world.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextmanager
def leaving(world: World) -> Iterator[None]:
    """Run the block, then :func:`shutdown` — at once if it raised."""
    try:
        yield
    except BaseException:
        shutdown(world, ok=False)
        raise
    shutdown(world)


def shutdown(world: World, ok: bool = True) -> None:
    """Wait for every rank (rank 0 may still be writing outputs), then leave the group. After an
    error (``ok`` False) leave at once: the other ranks may be waiting in a collective this one
    never reaches, and a barrier would then hang them all until the backend's timeout (30 min) —
    leaving makes torchrun see the failure and stop the group."""
    if world.size > 1 and dist.is_initialized():
        if ok:
            dist.barrier()
        dist.destroy_process_group()


def local_rows(batch: np.ndarray, world: World) -> np.ndarray:
    """This rank's contiguous slice (B/W,) of a global batch of row indices (B,)."""
    if len(batch) % world.size:
        raise ParamsError(
            f"make_batches: a batch of {len(batch)} images does not split over {world.size} processes; "
            "make classes_per_batch (best) or images_per_class a multiple of the process count"
        )
    return batch.reshape(world.size, -1)[world.rank]


def gather(local: torch.Tensor, world: World) -> torch.Tensor:
    """(B/W, D) on each rank -> (B, D) in rank order, gradient flowing through this rank's part only."""
    if world.size == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(world.size)]
    dist.all_gather(parts, local.detach().contiguous())
    parts[world.rank] = local
    return torch.cat(parts)


def sum_gradients(params: list[nn.Parameter], world: World) -> None:
    """Sum the network's gradients over ranks (one coalesced all-reduce): each rank holds the
    gradient through its own slice, so the sum is the global batch's gradient."""
    if world.size == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def broadcast(modules: list[nn.Module], world: World) -> None:
    """Rank 0's parameters and buffers to every rank: identical starting points whatever the init."""
    if world.size == 1:
        return
    for module in modules:
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, 0)


def sync_batchnorm(model: nn.Module, world: World, device: torch.device) -> nn.Module:
    """BatchNorm over the global batch: torch's SyncBatchNorm on CUDA; on CPU, where torch's
    refuses to run, :class:`AllReduceBatchNorm`. State-dict keys are unchanged, so checkpoints
    load into the plain network."""
    if world.size == 1:
        return model
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, AllReduceBatchNorm):
            setattr(model, name, AllReduceBatchNorm.replacing(child))
        else:
            sync_batchnorm(child, world, device)
    return model


class AllReduceBatchNorm(nn.BatchNorm2d):
    """Training-mode BatchNorm whose mean and variance are those of the global batch: per-channel
    sums, sums of squares and counts are all-reduced with autograd (the backward pass all-reduces
    their gradients in turn). Any input rank (B, C, ...); eval mode is plain BatchNorm."""

    @classmethod
    def replacing(cls, bn: nn.modules.batchnorm._BatchNorm) -> "AllReduceBatchNorm":
        if bn.momentum is None or not bn.track_running_stats:
            raise ParamsError("distributed training needs BatchNorm with a momentum and running statistics")
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        new.load_state_dict(bn.state_dict())
        return new.to(bn.running_mean.device)

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        # torch's differentiable all-reduce (backward = all-reduce of the gradients); the older
        # torch.distributed.nn.functional one is deprecated in its favour.
        from torch.distributed._functional_collectives import all_reduce

        out_dtype = x.dtype
        x = x.float()  # statistics in float32, as BatchNorm keeps them (bf16 autocast would lose E[x²] − mean²)
        dims = [0] + list(range(2, x.dim()))
        count = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device)
        total = all_reduce(torch.cat([x.sum(dims), (x * x).sum(dims), count]), "sum", dist.group.WORLD)
        c = x.shape[1]
        n = total[-1]
        mean = total[:c] / n
        var = (total[c : 2 * c] / n - mean * mean).clamp_min(0)  # biased, as BatchNorm normalises with
        with torch.no_grad():
            self.num_batches_tracked += 1
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(var.detach() * n / (n - 1), self.momentum)  # unbiased, as BatchNorm keeps
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        y = y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y
        return y.to(out_dtype)
