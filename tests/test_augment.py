import pytest
import torch

from tasks.augment import Augmenter
from tasks.params import AugmentParams

NONE = AugmentParams(supervised=False, crop_scale=[1.0, 1.0], rotate=0.0, translate=0.0, hflip=False, brightness=0.0, contrast=0.0)


def _images(n=6, size=12):
    return torch.randint(0, 256, (n, 1, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_identity_settings_leave_images_unchanged():
    x = _images()
    torch.testing.assert_close(Augmenter(NONE, 0, torch.device("cpu"))(x), x.float(), atol=1e-3, rtol=0)


def test_flip_only_mirrors_some_images_exactly():
    x = _images(n=32)
    out = Augmenter(NONE.model_copy(update={"hflip": True}), 0, torch.device("cpu"))(x)
    flipped = [torch.allclose(o, i.float().flip(-1), atol=1e-3) for o, i in zip(out, x)]
    same = [torch.allclose(o, i.float(), atol=1e-3) for o, i in zip(out, x)]
    assert all(f or s for f, s in zip(flipped, same)) and 0 < sum(flipped) < 32


def test_augmentation_is_seeded_and_resumable():
    params = AugmentParams(supervised=False, crop_scale=[0.5, 1.0], rotate=20.0, translate=0.1, hflip=True, brightness=0.3, contrast=0.3)
    x = _images()
    a = Augmenter(params, 7, torch.device("cpu"))
    b = Augmenter(params, 7, torch.device("cpu"))
    torch.testing.assert_close(a(x), b(x))
    state = a.state_dict()
    first = a(x)
    b.load_state_dict(state)
    torch.testing.assert_close(b(x), first)  # restored generator: the same next draw
    out = a(x)
    assert out.dtype == torch.float32 and out.shape == x.shape and 0 <= out.min() and out.max() <= 255
    assert not torch.allclose(out, x.float())


@pytest.mark.parametrize("bad", [{"crop_scale": [0.5]}, {"crop_scale": [0.0, 1.0]}, {"rotate": -1.0}, {"brightness": 1.0}])
def test_invalid_settings_are_rejected(bad):
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        AugmentParams(**(NONE.model_dump() | bad))


def test_translate_is_a_fraction_of_the_side_as_torchvision_reads_it():
    """translate: t shifts by up to t · side pixels each way (torchvision's RandomAffine), not half
    that (affine_grid's coordinates span the side twice)."""
    side, t = 40, 0.25
    x = torch.zeros(400, 1, side, side, dtype=torch.uint8)
    x[:, :, :, 20] = 255  # one bright column
    out = Augmenter(NONE.model_copy(update={"translate": t}), 0, torch.device("cpu"))(x)
    column = out[:, 0].sum(dim=1).argmax(dim=1).float()  # where the column went, per image
    shift = (column - 20).abs()
    assert shift.max() <= t * side + 1
    assert shift.max() >= 0.9 * t * side  # 400 uniform draws reach the ends


def _moved(params: AugmentParams, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    return Augmenter(params, seed, torch.device("cpu"))(x)


def test_brightness_and_contrast_scale_within_their_ranges():
    x = _images(n=200).float().clamp(40, 200)  # nothing clipped by a ±20 % change
    bright = _moved(NONE.model_copy(update={"brightness": 0.2}), x)
    factor = (bright / x).flatten(1)
    assert torch.allclose(factor, factor[:, :1], atol=1e-4)  # one factor per image
    assert factor.min() >= 0.8 - 1e-4 and factor.max() <= 1.2 + 1e-4 and factor.max() - factor.min() > 0.3
    contrast = _moved(NONE.model_copy(update={"contrast": 0.2}), x)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(contrast.mean(dim=(1, 2, 3), keepdim=True), mean)  # the mean stays
    spread = ((contrast - mean) / (x - mean)).flatten(1)
    spread = spread[:, (x - mean).flatten(1).abs().min(0).values > 1]  # pixels away from the mean
    assert spread.min() >= 0.8 - 1e-3 and spread.max() <= 1.2 + 1e-3 and spread.max() - spread.min() > 0.3


def test_crop_scale_is_an_area_and_rotate_is_in_degrees_and_borders_keep_the_edge_colour():
    x = torch.full((1, 1, 40, 40), 255, dtype=torch.uint8)
    x[:, :, 15:25, 15:25] = 0  # a dark 10 × 10 square on white paper
    zoomed = _moved(NONE.model_copy(update={"crop_scale": [0.25, 0.25]}), x)
    assert (zoomed < 128).sum().item() == pytest.approx(400, rel=0.1)  # a quarter of the area: twice the side
    # A shift pads with the edge colour (white paper), not black.
    shifted = _moved(NONE.model_copy(update={"translate": 0.2}), x.expand(64, -1, -1, -1))  # the square stays inside
    edges = torch.cat([shifted[..., 0, :], shifted[..., -1, :], shifted[..., :, 0], shifted[..., :, -1]], -1)
    assert edges.min() > 250
    # A thin horizontal bar turned by at most 10 degrees (radians would turn it any way).
    bar = torch.full((300, 1, 41, 41), 255, dtype=torch.uint8)
    bar[:, :, 20, 4:37] = 0
    out = 255 - _moved(NONE.model_copy(update={"rotate": 10.0}), bar)[:, 0]
    ys, xs = torch.meshgrid(torch.arange(41.0), torch.arange(41.0), indexing="ij")
    w = out / out.sum(dim=(1, 2), keepdim=True)
    mx, my = (w * xs).sum((1, 2), keepdim=True), (w * ys).sum((1, 2), keepdim=True)
    cxx, cyy, cxy = (w * (xs - mx) ** 2).sum((1, 2)), (w * (ys - my) ** 2).sum((1, 2)), (w * (xs - mx) * (ys - my)).sum((1, 2))
    angle = torch.rad2deg(0.5 * torch.atan2(2 * cxy, cxx - cyy)).abs()  # the bar's axis
    assert angle.max() <= 10.5 and angle.max() >= 8
