import numpy as np
import pytest

from tasks.build_index import build


def _unit(n, d, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("factory", ["Flat", "IVF8,Flat", "HNSW16", "IVF4,PQ4"])
def test_factory_strings_build_searchable_indexes(factory):
    x = _unit(500, 16)
    index = build(x, factory, "inner_product")
    assert index.ntotal == 500
    _, pos = index.search(x[:20], 1)
    if factory == "Flat":
        assert (pos[:, 0] == np.arange(20)).all()  # exact: each vector finds itself
    else:
        assert (pos[:, 0] == np.arange(20)).mean() >= 0.5


def test_l2_metric_ranks_like_inner_product_on_unit_vectors():
    x = _unit(200, 8, seed=1)
    _, ip = build(x, "Flat", "inner_product").search(x[:10], 5)
    _, l2 = build(x, "Flat", "l2").search(x[:10], 5)
    np.testing.assert_array_equal(ip, l2)


def test_bad_factory_string_is_a_clear_error():
    with pytest.raises(ValueError, match="build_index.factory"):
        build(_unit(10, 4), "NoSuchIndex42", "inner_product")


def test_too_few_vectors_to_train_is_a_clear_error():
    with pytest.raises(ValueError, match="training"):
        build(_unit(10, 8), "IVF64,Flat", "inner_product")
