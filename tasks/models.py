"""Embedding networks: a backbone (small CNN or torchvision model) + linear head + L2 norm.

The architecture is rebuilt from a plain-dict ``config`` stored in the checkpoint beside the
weights, so a checkpoint loads with ``torch.load(weights_only=True)`` and export needs no params.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tasks.backbones import build_trunk
from tasks.contracts import atomic_path, file_digest, pixels_numpy
from tasks.errors import ParamsError


class EmbeddingNet(nn.Module):
    """uint8 images (B, C, S, S) -> L2-normalised float embeddings (B, embedding_dim)."""

    def __init__(self, config: dict[str, Any], pretrained: str | None = None):
        """``config``: backbone, width, embedding_dim, in_channels, image_size and optionally
        pooling (avg | gem; checkpoints from before it existed are avg). ``pretrained`` (training
        only): torchvision weights, see :func:`tasks.backbones.build_trunk`."""
        super().__init__()
        self.config = {"pooling": "avg"} | dict(config)
        self.trunk, feat = build_trunk(self.config, pretrained)
        self.head = nn.Linear(feat, self.config["embedding_dim"])
        # The classes it learned from (the checkpoint's; None before checkpoints kept them): export
        # warns when they come back as test classes.
        self.trained_classes: list[str] | None = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # Normalisation lives in the model so every caller feeds the same uint8 pixels.
        x = images.float() / 127.5 - 1.0  # uint8 or augmented float, both 0..255
        return F.normalize(self.head(self.trunk(x)), dim=1)


def save_checkpoint(model: EmbeddingNet, path: Path, extra: dict[str, Any] | None = None) -> str:
    """Write {config, state_dict, ...} atomically; return the file's SHA-256 (the model hash)."""
    state = {"config": model.config, "state_dict": model.state_dict(), **(extra or {})}
    if model.trained_classes is not None:  # kept through a load and save (a fine-tune, a test's edit)
        state["trained_classes"] = list(model.trained_classes)
    # torch.save names the zip's root folder after the file it writes to — here a random temporary
    # name, which made equal weights hash differently. Through a buffer the root is always "archive",
    # so equal weights give the same file (and the same model hash, and a DVC no-op).
    buf = io.BytesIO()
    torch.save(state, buf)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())
    return file_digest(path)


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> EmbeddingNet:
    if not path.exists():
        raise FileNotFoundError(f"{path}: no model checkpoint (has train run?)")
    state = torch.load(path, map_location=device, weights_only=True)
    model = EmbeddingNet(state["config"])
    model.load_state_dict(state["state_dict"])
    model.trained_classes = state.get("trained_classes")
    return model.to(device).eval()


def pick_device(name: str, section: str = "") -> torch.device:
    """``auto`` -> the first CUDA device if there is one, else the CPU. A CUDA device this machine
    lacks is a :class:`ParamsError` naming ``<section>.device`` (not a CUDA error at first use)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if errors := gpu_errors(section, name):
        raise ParamsError(errors[0])
    return torch.device(name)


def _gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def device_lack(device: str) -> str | None:
    """Why this machine cannot give ``device`` — a CUDA device it lacks — or None. Keyless, so
    each caller names its own: a params key (:func:`gpu_errors`), ``--device`` (:mod:`tasks.cli`)."""
    if not device.startswith("cuda"):
        return None
    gpus = _gpu_count()
    if not gpus:
        return f"{device!r} asked for, but CUDA is not available here"
    if device.startswith("cuda:") and int(device[5:]) >= gpus:
        return f"{device!r} asked for, but this machine has {gpus} GPU(s)"
    return None


def gpu_errors(section: str, device: str, processes: int = 1) -> list[str]:
    """``key: why`` for a ``device`` and process count this machine's GPUs cannot give (the flow's
    preflight, before any stage; :func:`tasks.distributed.launch`, before torchrun; every stage's
    :func:`pick_device`). CUDA is asked about only when ``device`` names it, or is ``auto`` for
    several processes; on a CPU, processes share its cores."""
    if not device.startswith("cuda") and (device != "auto" or processes == 1):
        return []
    if why := device_lack(device):
        return [f"{section}.device: {why}" if section else f"device: {why}"]
    gpus = _gpu_count()
    if processes > gpus and (device.startswith("cuda") or gpus):
        return [f"{section}.processes: {processes} processes but {gpus} GPUs here"]
    return []


def pixels_to_tensor(flat, height: int, width: int, channels: int) -> torch.Tensor:
    """ITEMS pixel column (N values of H·W·C bytes, HWC order) -> uint8 tensor (N, C, H, W)."""
    arr = pixels_numpy(flat).reshape(-1, height, width, channels)
    return torch.from_numpy(arr.copy()).permute(0, 3, 1, 2).contiguous()
