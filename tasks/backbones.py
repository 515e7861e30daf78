"""Backbones ("trunks"): images (B, C, H, W) float -> features (B, F).

``small_cnn`` for small images, or any torchvision classification model by name with its last
linear layer removed. Pooling is average or GeM; torchvision weights come only from a local file
or torch's own cache — never a download (these machines, and many users', have no internet).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from tasks.errors import ParamsError


class GeM(nn.Module):
    """Generalised-mean pooling (Radenović et al. 2018): (B, C, H, W) -> (B, C, 1, 1).

    mean(x^p)^(1/p) over the map with a learnt p (3 to start): p=1 is average, p→∞ max pooling.
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(min=self.eps).pow(self.p).mean(dim=(-2, -1), keepdim=True).pow(1.0 / self.p)


def _pool(kind: str) -> nn.Module:
    return GeM() if kind == "gem" else nn.AdaptiveAvgPool2d(1)


class SmallCNN(nn.Module):
    """The "Conv-4" of few-shot learning: 4 × (conv3×3 → BN → ReLU → max-pool 2), then pooling.

    (B, C, S, S) -> (B, width). Pools stop once the map is 1×1, so tiny inputs (8×8 digits) work.
    The ReLU runs after the max-pool: ReLU is monotone, so relu(maxpool(x)) = maxpool(relu(x))
    exactly (and so are the gradients: the same maximum is picked wherever it is positive), on a
    quarter of the values — a CPU step at 28 px runs ~6 % faster, bit for bit the same losses.
    """

    def __init__(self, in_channels: int, width: int, image_size: int, pooling: str = "avg"):
        super().__init__()
        layers: list[nn.Module] = []
        size, c = image_size, in_channels
        for _ in range(4):
            layers += [nn.Conv2d(c, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)]
            if size >= 2:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            layers.append(nn.ReLU(inplace=True))
            c = width
        self.features = nn.Sequential(*layers, _pool(pooling), nn.Flatten())
        self.out_features = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class _GrayToRGB(nn.Module):
    """torchvision trunks expect 3 channels; a grayscale image is repeated (no new weights)."""

    def __init__(self, trunk: nn.Module):
        super().__init__()
        self.trunk = trunk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x.expand(-1, 3, -1, -1))


def pretrained_file(name: str, pretrained: str) -> Path:
    """Where the weights are: a path, or ``default`` = torchvision's default weights in torch's
    cache ($TORCH_HOME/hub/checkpoints), which we never download."""
    if pretrained != "default":
        path = Path(pretrained)
        if not path.is_file():
            raise ParamsError(f"train.pretrained: no weights file at {path}")
        return path
    import torchvision

    weights = torchvision.models.get_model_weights(name).DEFAULT
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if not path.is_file():
        raise ParamsError(
            f"train.pretrained: default weights of {name} are not in torch's cache ({path}); "
            f"nothing is downloaded at run time: fetch {weights.url} there, or give a file path"
        )
    return path


def _torchvision(name: str, in_channels: int, pooling: str, pretrained: str | None) -> tuple[nn.Module, int]:
    import torchvision

    try:
        model = torchvision.models.get_model(name, weights=None)
    except ValueError:
        raise ParamsError(f"train.backbone: unknown model {name!r} (small_cnn or a torchvision name)") from None
    if pretrained:
        state = torch.load(pretrained_file(name, pretrained), map_location="cpu", weights_only=True)
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            raise ParamsError(f"train.pretrained: weights do not fit {name}: {err}") from None
    if pooling == "gem":
        if not isinstance(getattr(model, "avgpool", None), nn.AdaptiveAvgPool2d):
            raise ParamsError(f"train.pooling: gem needs a backbone with an average-pooling layer; {name} has none")
        model.avgpool = GeM()
    for attr in ("fc", "classifier", "heads", "head"):
        head = getattr(model, attr, None)
        last = head[-1] if isinstance(head, nn.Sequential) else head
        if isinstance(last, nn.Linear):
            if isinstance(head, nn.Sequential):
                head[-1] = nn.Identity()
            else:
                setattr(model, attr, nn.Identity())
            return _GrayToRGB(model) if in_channels == 1 else model, last.in_features
    raise ParamsError(f"train.backbone: cannot find the classification head of {name!r}")


def build_trunk(config: dict[str, Any], pretrained: str | None = None) -> tuple[nn.Module, int]:
    """-> (trunk, feature dim) from an EmbeddingNet config."""
    c, name, pooling = config["in_channels"], config["backbone"], config["pooling"]
    if name == "small_cnn":
        if pretrained:
            raise ParamsError("train.pretrained: small_cnn has no pretrained weights")
        trunk = SmallCNN(c, config["width"], config["image_size"], pooling)
        return trunk, trunk.out_features
    return _torchvision(name, c, pooling, pretrained)
