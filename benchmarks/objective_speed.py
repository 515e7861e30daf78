"""Mining + loss on their own: what one training step's objective costs, forward + backward.

For each batch size B = P × 4 (64-d embeddings, the default semi-hard recipe): pytorch-metric-
learning's TripletMarginMiner + TripletMarginLoss, our fused objective (tasks.fused_triplet, as the
train stage runs it on a P×K plan: on CUDA its Triton pass, and then also the same in torch ops)
and, with ``--compile``, the fused objective through torch.compile. Per objective and B, one JSON line:
- ``ops``: aten ops dispatched (forward + backward, views included; not for compiled code) — on a
  GPU nearly each a kernel launch, which is what a 28 px step is bound by; the same on any device;
- ``ms``: wall time of forward + backward (synchronised), best of several rounds;
- on CUDA, ``kernels`` and ``device_ms`` from torch.profiler: launches and time on the GPU.
Ratios to pml come from the same run.

    python benchmarks/objective_speed.py [--device auto] [--batches 128 512] [--compile]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from pytorch_metric_learning import losses, miners
from torch.utils._python_dispatch import TorchDispatchMode

from tasks import fused_triplet
from tasks.fused_triplet import FusedTriplet
from tasks.models import pick_device
from tasks.objectives import PmlObjective

K, DIM, MARGIN = 4, 64, 0.2


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(objective, emb: torch.Tensor, labels: torch.Tensor) -> None:
    x = emb.detach().requires_grad_(True)
    loss, _ = objective(x, labels)
    loss.backward()


def _ms(objective, emb, labels, budget_s: float) -> float:
    """Best of rounds of 5 steps each (after 3 warm-up steps), within ~budget_s."""
    for _ in range(3):
        _step(objective, emb, labels)
    best, spent = float("inf"), 0.0
    while spent < budget_s:
        _sync(emb.device)
        start = time.perf_counter()
        for _ in range(5):
            _step(objective, emb, labels)
        _sync(emb.device)
        took = time.perf_counter() - start
        best, spent = min(best, took / 5), spent + took
    return best * 1e3


def _cuda_profile(objective, emb, labels) -> dict:
    """Kernels launched and their summed device time for one forward + backward."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        _step(objective, emb, labels)
        _sync(emb.device)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return {"kernels": len(kernels), "device_ms": round(sum(e.device_time for e in kernels) / 1e3, 4)}


def _torch_ops(objective):
    """objective with the fused triplet's Triton pass switched off (its forward picks the pass)."""

    def call(emb, labels):
        with fused_triplet.kernel_setting("never"):
            return objective(emb, labels)

    return call


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batches", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--budget", type=float, default=2.0, help="seconds of timing per objective and batch")
    parser.add_argument("--compile", action="store_true", help="also the fused objective through torch.compile")
    args = parser.parse_args()
    device = pick_device(args.device)
    fused = FusedTriplet(MARGIN, MARGIN, "semihard", per_class=K)
    objectives = {
        "pml": PmlObjective(losses.TripletMarginLoss(margin=MARGIN), miners.TripletMarginMiner(margin=MARGIN, type_of_triplets="semihard")),
        "fused": fused,
    }
    if device.type == "cuda":  # "fused" runs the Triton pass there; this is the same in torch ops
        objectives["fused_torch_ops"] = _torch_ops(fused)
    if args.compile:
        objectives["fused_compiled"] = torch.compile(fused, fullgraph=True)
    for batch in args.batches:
        g = torch.Generator().manual_seed(batch)
        emb = torch.randn(batch, DIM, generator=g).to(device)
        labels = (torch.randperm(batch, generator=g) // K).to(device)  # P×K in any order
        pml_ms = None
        for name, objective in objectives.items():
            _step(objective, emb, labels)  # compiles, if compiled
            counter = _CountOps()
            if name != "fused_compiled":  # compiled code dispatches no aten ops to count
                with counter:
                    _step(objective, emb, labels)
            ms = _ms(objective, emb, labels, args.budget)
            pml_ms = pml_ms or ms
            row = {"figure": "objective_fwd_bwd", "objective": name, "device": str(device), "batch": batch,
                   "ops": counter.ops or None, "ms": round(ms, 4), "pml_vs_this": round(pml_ms / ms, 2)}
            if device.type == "cuda":
                row |= _cuda_profile(objective, emb, labels)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
