"""Image augmentation on the device, a whole batch at once (no per-image Python, no CPU workers).

One random affine warp per image — zoom (a crop of ``crop_scale`` of the area), rotation,
translation, optional horizontal flip — through ``affine_grid`` + ``grid_sample``, then brightness
and contrast jitter. Used by self-supervised training, where two augmented views of one image are
each other's positive.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from tasks.params import AugmentParams


class Augmenter:
    """Seeded batch augmentation; its generator state is checkpointed like a model's weights,
    one per torchrun rank (each rank draws its own)."""

    per_rank = True  # tasks.resume keeps every rank's state

    def __init__(self, params: AugmentParams, seed: int, device: torch.device):
        self.p = params
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def _uniform(self, n: int, low: float, high: float, device: torch.device) -> torch.Tensor:
        return torch.rand(n, device=device, generator=self.generator) * (high - low) + low

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 or float images (B, C, H, W) in 0..255 -> float (B, C, H, W) in 0..255."""
        b, dev, p = images.shape[0], images.device, self.p
        x = images.float()
        side = self._uniform(b, *p.crop_scale, dev).sqrt()  # a crop of that area, scaled to full size
        angle = self._uniform(b, -p.rotate, p.rotate, dev) * (math.pi / 180)
        # affine_grid's coordinates span the side twice (-1..1): a shift of t sides is 2t there.
        shift = self._uniform(2 * b, -2 * p.translate, 2 * p.translate, dev).view(b, 2)
        flip = torch.where(self._uniform(b, 0, 1, dev) < 0.5, -1.0, 1.0) if p.hflip else torch.ones(b, device=dev)
        cos, sin = side * angle.cos(), side * angle.sin()
        theta = torch.stack([torch.stack([cos * flip, -sin, shift[:, 0]], 1), torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        # "border": pad with the edge colour (Omniglot's white paper), not black.
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        if p.brightness:
            x = x * self._uniform(b, 1 - p.brightness, 1 + p.brightness, dev).view(b, 1, 1, 1)
        if p.contrast:
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = (x - mean) * self._uniform(b, 1 - p.contrast, 1 + p.contrast, dev).view(b, 1, 1, 1) + mean
        return x.clamp(0, 255)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
