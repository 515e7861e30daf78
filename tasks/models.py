"""Embedding networks: a backbone (small CNN or torchvision model) + linear head + L2 norm.

The architecture is rebuilt from a plain-dict ``config`` stored in the checkpoint beside the
weights, so a checkpoint loads with ``torch.load(weights_only=True)`` and export needs no params.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tasks.contracts import atomic_path
from tasks.errors import ParamsError


class SmallCNN(nn.Module):
    """The "Conv-4" of few-shot learning: 4 × (conv3×3 → BN → ReLU → max-pool 2), global average pool.

    (B, C, S, S) -> (B, width). Pools stop once the map is 1×1, so tiny inputs (8×8 digits) work.
    """

    def __init__(self, in_channels: int, width: int, image_size: int):
        super().__init__()
        layers: list[nn.Module] = []
        size, c = image_size, in_channels
        for _ in range(4):
            layers += [nn.Conv2d(c, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            if size >= 2:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            c = width
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_features = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def _torchvision_trunk(name: str, in_channels: int) -> tuple[nn.Module, int]:
    """A torchvision classifier with its last classification layer replaced by Identity."""
    import torchvision

    try:
        model = torchvision.models.get_model(name, weights=None)
    except ValueError:
        raise ParamsError(f"train.backbone: unknown model {name!r} (small_cnn or a torchvision name)") from None
    for attr in ("fc", "classifier", "heads", "head"):
        head = getattr(model, attr, None)
        if head is None:
            continue
        last = head[-1] if isinstance(head, nn.Sequential) else head
        if isinstance(last, nn.Linear):
            if isinstance(head, nn.Sequential):
                head[-1] = nn.Identity()
            else:
                setattr(model, attr, nn.Identity())
            return _GrayToRGB(model) if in_channels == 1 else model, last.in_features
    raise ParamsError(f"train.backbone: cannot find the classification head of {name!r}")


class _GrayToRGB(nn.Module):
    """torchvision trunks expect 3 channels; a grayscale image is repeated (no new weights)."""

    def __init__(self, trunk: nn.Module):
        super().__init__()
        self.trunk = trunk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x.expand(-1, 3, -1, -1))


class EmbeddingNet(nn.Module):
    """uint8 images (B, C, S, S) -> L2-normalised float embeddings (B, embedding_dim)."""

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        self.config = dict(config)
        c, name = config["in_channels"], config["backbone"]
        if name == "small_cnn":
            self.trunk: nn.Module = SmallCNN(c, config["width"], config["image_size"])
            feat = self.trunk.out_features
        else:
            self.trunk, feat = _torchvision_trunk(name, c)
        self.head = nn.Linear(feat, config["embedding_dim"])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # Normalisation lives in the model so every caller feeds the same uint8 pixels.
        x = images.float().div_(127.5).sub_(1.0)
        return F.normalize(self.head(self.trunk(x)), dim=1)


def save_checkpoint(model: EmbeddingNet, path: Path, extra: dict[str, Any] | None = None) -> str:
    """Write {config, state_dict, ...} atomically; return the file's SHA-256 (the model hash)."""
    state = {"config": model.config, "state_dict": model.state_dict(), **(extra or {})}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return file_sha256(path)


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> EmbeddingNet:
    if not path.exists():
        raise FileNotFoundError(f"{path}: no model checkpoint (has train run?)")
    state = torch.load(path, map_location=device, weights_only=True)
    model = EmbeddingNet(state["config"])
    model.load_state_dict(state["state_dict"])
    return model.to(device).eval()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pick_device(name: str) -> torch.device:
    """``auto`` -> the first CUDA device if there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ParamsError(f"device {name!r} asked for, but CUDA is not available here")
    return torch.device(name)


def pixels_to_tensor(flat, height: int, width: int, channels: int) -> torch.Tensor:
    """Arrow fixed-size-list<uint8> column (N × H·W·C, HWC order) -> uint8 tensor (N, C, H, W)."""
    import numpy as np

    values = flat.combine_chunks() if hasattr(flat, "combine_chunks") else flat
    arr = np.asarray(values.flatten().to_numpy(zero_copy_only=False)).reshape(-1, height, width, channels)
    return torch.from_numpy(arr.copy()).permute(0, 3, 1, 2).contiguous()
