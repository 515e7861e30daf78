"""Per-epoch training state, so a killed training run resumes where it stopped.

After every epoch the train stage writes ``paths.train_state`` atomically: model, loss,
optimizer and LR-scheduler state, early stopping, the cross-batch memory's queue, the random
generators (torch's global ones — dropout, pml's random miners — and the augmenter's, one per
rank), the epochs done, the curve so far and the MLflow run. A restart with the same params and
the same input files (checked by a fingerprint) continues from the next epoch; the batch plan
fixes every later batch, so on the CPU the resumed run ends with exactly the weights of an
uninterrupted one. Anything else starts afresh. The file is removed once the model is written:
it is a crash-recovery file, not an output.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from tasks.contracts import atomic_path, file_digest
from tasks.distributed import SINGLE, World, gather_objects
from tasks.params import Paths, TrainParams

INPUTS = ("items", "batches")


def input_digests(paths: Paths) -> dict[str, str]:
    """MD5 of each input file — DVC's hash, so the same digests also serve as provenance tags
    (train reads each file once for both, not once per use)."""
    return {name: file_digest(paths[name], "md5") for name in INPUTS}


def fingerprint(params: TrainParams, digests: dict[str, str]) -> str:
    """What must be unchanged for a saved state to be continued: our params and input files
    (``digests`` from :func:`input_digests`)."""
    h = hashlib.sha256(json.dumps(params.model_dump(), sort_keys=True, default=str).encode())
    for name in INPUTS:
        h.update(digests[name].encode())
    return h.hexdigest()


class GlobalRng:
    """torch's global generators as a stateful object: the CPU one and this process's CUDA
    device's. Dropout in a torchvision head and pml's random miners draw from them."""

    per_rank = True

    def __init__(self, device: torch.device):
        self.device = device

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        torch.set_rng_state(state["cpu"])
        if "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], self.device)


def save(
    path: Path, fp: str, epoch: int, stateful: dict[str, Any], curve: list[dict], run_ids: dict[str, str],
    world: World = SINGLE,
) -> None:
    """The state after ``epoch`` (0-based) finished: ``stateful`` maps names to objects with
    ``state_dict()`` (model, loss, optimizer, LR scheduler...). An object with ``per_rank = True``
    differs between torchrun's ranks (each rank's augmenter draws its own images): every rank's
    state is kept, in rank order. A collective — every rank calls it; rank 0 writes. Plain
    tensors and containers only, so it loads with ``weights_only=True``."""
    # In stateful's order, the same on every rank (a set's order differs between processes).
    per_rank = [name for name, obj in stateful.items() if getattr(obj, "per_rank", False)]
    states = {name: gather_objects(stateful[name].state_dict(), world) for name in per_rank}
    if not world.main:
        return
    states |= {name: obj.state_dict() for name, obj in stateful.items() if name not in per_rank}
    state = {
        "fingerprint": fp,
        "epochs_done": epoch + 1,
        "states": states,
        "curve": curve,
        "run_ids": run_ids,
        "world_size": world.size,
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load(path: Path, fp: str, names: Iterable[str], world_size: int = 1) -> dict[str, Any] | None:
    """The saved state if it continues this run — same fingerprint, a state for each of
    ``names`` (the stateful objects), as many processes (``world_size``: each kept its own
    generators; a torchrun started by hand can change the count under the same params) — else
    None (and a line saying why)."""
    if not path.exists():
        return None
    try:
        # On the CPU: generator states must stay there; the objects' load_state_dict put the rest
        # on their device (a module's and an optimizer's do).
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a state we cannot read is no reason to fail: start afresh
        print(f"train: ignoring unreadable {path}: {err}")
        return None
    if state.get("fingerprint") != fp:
        print(f"train: {path} is from other params or data; starting afresh")
        return None
    if set(state.get("states", {})) != set(names):
        print(f"train: {path} was saved by another version of tripletflow; starting afresh")
        return None
    saved_by = state.get("world_size", 1)  # states from before it was recorded: one process could resume them
    if saved_by != world_size:
        print(f"train: {path} was saved by {saved_by} process(es), this run has {world_size}; starting afresh")
        return None
    done = state["epochs_done"]  # epochs count from 0, as in the curve and the progress bar
    print(f"train: resuming after epoch {done - 1} ({done} epochs done) from {path}")
    return state


def restore(state: dict[str, Any], stateful: dict[str, Any], world: World = SINGLE) -> None:
    """Each object back to its saved state (a ``per_rank`` one to this rank's)."""
    for name, obj in stateful.items():
        saved = state["states"][name]
        obj.load_state_dict(saved[world.rank] if getattr(obj, "per_rank", False) else saved)
