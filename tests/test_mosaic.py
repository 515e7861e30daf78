"""tasks.mosaic: every thumbnail framed in its cell of one image, whose size the budget caps."""

from __future__ import annotations

import numpy as np

from tasks import mosaic
from tasks.mosaic import FRAME, compose, resize, thumb_size


def test_each_thumbnail_sits_in_its_frame_at_the_reported_place():
    q, n, h = 3, 4, 8
    thumbs = np.arange(q * n, dtype=np.uint8).reshape(q, n, 1, 1, 1) * np.ones((1, 1, h, h, 1), np.uint8) * 10
    frames = np.zeros((q, n, 3), np.uint8)
    frames[..., 1] = 200 + np.arange(n)  # one green per column
    m = compose([thumbs], frames, caption_px=20)
    th, tw = thumb_size(h, h, q * n, 20)
    assert (th, tw) == (64, 64)  # 8 px enlarged 8 times: square pixels
    assert m.image.dtype == np.uint8 and m.image.shape[2] == 3
    for i in range(q):
        for j in range(n):
            top, left = int(m.frame_top[i]), int(m.centre_x[j] - tw / 2) - FRAME
            np.testing.assert_array_equal(m.image[top, left + FRAME + 5], frames[i, j])  # the frame's top edge
            inner = m.image[top + FRAME : top + FRAME + th, left + FRAME : left + FRAME + tw]
            assert (inner == thumbs[i, j, 0, 0, 0]).all()  # grey copied to R, G and B
            assert (m.image[top - 1, left : left + tw] == 255).all()  # white above: room for the caption


def test_rgb_kept_and_non_square_images_keep_their_shape():
    thumbs = np.zeros((1, 2, 10, 20, 3), np.uint8)
    thumbs[..., 0] = 255
    m = compose([thumbs], np.zeros((1, 2, 3), np.uint8), caption_px=0)
    assert thumb_size(10, 20, 2, 0) == (30, 60)
    assert (m.image == (255, 0, 0)).all(axis=-1).sum() == 2 * 30 * 60


def test_resize_nearest_enlarges_by_whole_times_and_reduces():
    px = np.arange(4, dtype=np.uint8).reshape(2, 2, 1)
    np.testing.assert_array_equal(resize(px, 4, 4)[..., 0], np.kron([[0, 1], [2, 3]], np.ones((2, 2))))
    assert resize(np.zeros((5, 300, 200, 3), np.uint8), 30, 20).shape == (5, 30, 20, 3)


def test_a_big_grid_of_big_images_is_shrunk_to_the_budget():
    assert thumb_size(224, 224, 1, 30) == (128, 128)  # large images reduced
    th, tw = thumb_size(224, 224, 100 * 51, 30, budget=mosaic.BUDGET)
    assert mosaic.MIN_SIDE <= th < 128
    m = compose([np.zeros((10, 11, 224, 224, 1), np.uint8)], np.zeros((10, 11, 3), np.uint8), caption_px=30, budget=2_000_000)
    assert m.image.size // 3 <= 2_000_000
    # The floor: thumbnails never below MIN_SIDE, whatever the budget.
    assert max(thumb_size(224, 224, 10_000, 30, budget=1)) == mosaic.MIN_SIDE


def test_blocks_of_other_sizes_and_channels_join_at_one_thumbnail_size():
    """The query command: queries decoded at the model's size (RGB), results at the items' (grey)."""
    queries = np.full((2, 1, 20, 20, 3), (255, 0, 0), np.uint8)
    results = np.full((2, 3, 16, 16, 1), 7, np.uint8)
    m = compose([queries, results], np.zeros((2, 4, 3), np.uint8), caption_px=10)
    th, tw = thumb_size(20, 20, 8, 10)
    assert (m.image == (255, 0, 0)).all(axis=-1).sum() == 2 * th * tw
    assert (m.image == 7).all(axis=-1).sum() == 2 * 3 * th * tw
