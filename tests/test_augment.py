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
