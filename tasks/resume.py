"""Per-epoch training state, so a killed training run resumes where it stopped.

After every epoch the train stage writes ``paths.train_state`` atomically: model, loss,
optimizer and LR-scheduler state, the epochs done, the curve so far and the MLflow run. A restart with the same
params and the same input files (checked by a fingerprint) continues from the next epoch; the
batch plan fixes every later batch and the only other randomness (self-supervised augmentation)
has its generator state saved too, so on the CPU the resumed
run ends with exactly the weights of an uninterrupted one. Anything else starts afresh. The file is
removed once the model is written: it is a crash-recovery file, not an output.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from tasks.contracts import atomic_path, file_digest
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


def save(path: Path, fp: str, epoch: int, stateful: dict[str, Any], curve: list[dict], run_ids: dict[str, str]) -> None:
    """The state after ``epoch`` (0-based) finished: ``stateful`` maps names to objects with
    ``state_dict()`` (model, loss, optimizer, LR scheduler). Plain tensors and containers only,
    so it loads with ``weights_only=True``."""
    state = {
        "fingerprint": fp,
        "epochs_done": epoch + 1,
        "states": {name: obj.state_dict() for name, obj in stateful.items()},
        "curve": curve,
        "run_ids": run_ids,
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load(path: Path, fp: str, device: torch.device) -> dict[str, Any] | None:
    """The saved state if it continues this run, else None (and a line saying why)."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # a state we cannot read is no reason to fail: start afresh
        print(f"train: ignoring unreadable {path}: {err}")
        return None
    if state.get("fingerprint") != fp:
        print(f"train: {path} is from other params or data; starting afresh")
        return None
    print(f"train: resuming after epoch {state['epochs_done']} from {path}")
    return state


def restore(state: dict[str, Any], stateful: dict[str, Any]) -> None:
    for name, obj in stateful.items():
        obj.load_state_dict(state["states"][name])
