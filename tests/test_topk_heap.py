"""tasks.topk_heap: the fused top-k kernels against numpy sorting (ties by position), the float ->
key order for fp32 and bf16 bits, and the bf16 error bound against torch's own bf16 products."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tasks import topk_heap


def _keys_of(x: torch.Tensor) -> np.ndarray:
    raw = x.contiguous().view(torch.int16 if x.dtype == torch.bfloat16 else torch.int32).numpy()
    return np.array([topk_heap._key(b, topk_heap.MASKS[raw.dtype]) for b in raw.ravel()]).reshape(raw.shape)


def _best(scores: np.ndarray, h: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the h best (score desc, position asc), by numpy."""
    order = np.stack([np.lexsort((np.arange(len(row)), -row))[:h] for row in scores])
    return np.take_along_axis(scores, order, 1), order


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_keys_order_like_the_floats(dtype):
    values = torch.tensor([-np.inf, -3e38, -2.5, -1.0, -1e-30, -0.0, 0.0, 1e-30, 0.5, 1.0, 7.0, 3e38, np.inf], dtype=dtype)
    keys = _keys_of(values)
    assert (np.diff(keys) >= 0).all() and (np.diff(keys)[values[1:].float().numpy() > values[:-1].float().numpy()] > 0).all()
    assert keys[5] == keys[6]  # -0 == +0, as floats
    assert (keys > topk_heap.EMPTY_KEY).all()
    back = topk_heap.key_to_float(keys.astype(np.int32), 16 if dtype == torch.bfloat16 else 32)
    np.testing.assert_array_equal(back, np.where(values.float().numpy() == 0, 0.0, values.float().numpy()))


@pytest.mark.parametrize("h", [1, 5, 40])
def test_rows_and_columns_keep_the_best_pairs_across_tiles(h):
    rng = np.random.default_rng(0)
    # Coarse values: many ties inside and across tiles, plus -inf (excluded) entries.
    scores = rng.integers(-4, 5, size=(37, 300)).astype(np.float32) / 2
    scores[rng.random(scores.shape) < 0.05] = -np.inf
    want_v, want_p = _best(scores, h)
    for width in (300, 64, 17):
        keys, pos = topk_heap.new_heaps(37, h)
        heaps_t = topk_heap.new_heaps(37, h)  # the same, fed through transposed tiles
        for c0 in range(0, 300, width):
            tile = torch.from_numpy(np.ascontiguousarray(scores[:, c0 : c0 + width]))
            topk_heap.push_rows(tile.view(torch.int32).numpy(), 0x7FFFFFFF, c0, keys, pos)
            t = tile.T.contiguous().view(torch.int32).numpy()
            topk_heap.push_cols(t, 0x7FFFFFFF, c0, *heaps_t, np.ascontiguousarray(heaps_t[0][:, 0]))
        for k_, p_ in ((keys, pos), heaps_t):
            topk_heap.drain(k_, p_)
            np.testing.assert_array_equal(p_, want_p)
            np.testing.assert_array_equal(topk_heap.key_to_float(k_, 32), want_v)


def test_heaps_of_a_small_gallery_keep_empty_slots_last():
    heaps = topk_heap.Heaps(3, 6)
    heaps.add_tile(torch.tensor([[1.0, 2.0], [0.5, -np.inf], [3.0, 3.0]]), col0=10)
    values, pos = heaps.result()
    assert pos[:, :2].tolist() == [[11, 10], [10, 11], [10, 11]]
    assert (pos[:, 2:] == topk_heap.EMPTY_POS).all() and torch.isinf(values[:, 2:]).all()


@pytest.mark.parametrize("d", [8, 128, 1000, 4096])
def test_bf16_products_stay_within_the_bound(d):
    # Mixed magnitudes and signs; d = 4096 of near-equal positive terms would break the bound by
    # far if the products were summed in bf16 (the sum stalls at 256 where bf16's step is 2).
    rng = np.random.default_rng(d)
    q = rng.standard_normal((64, d)) * np.exp(rng.uniform(-3, 3, (64, 1)))
    g = rng.standard_normal((300, d)) * np.exp(rng.uniform(-3, 3, (300, 1)))
    g[:20] = np.abs(g[:20]) + 1
    q[:20] = np.abs(q[:20]) + 1
    qt, gt = torch.from_numpy(q).float(), torch.from_numpy(g).float()
    approx = (qt.bfloat16() @ gt.bfloat16().T).double().numpy()
    exact = qt.double().numpy() @ gt.double().numpy().T
    norms = np.linalg.norm(qt.double().numpy(), axis=1)[:, None] * np.linalg.norm(gt.double().numpy(), axis=1)[None, :]
    limit = norms * topk_heap.bf16_error(d)
    assert (np.abs(approx - exact) <= limit).all()
