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
    s_ip, ip = build(x, "Flat", "inner_product").search(x[:10], 5)
    s_l2, l2 = build(x, "Flat", "l2").search(x[:10], 5)
    np.testing.assert_array_equal(ip, l2)
    # The same ranking, but from squared distances: |a−b|² = 2 − 2·a·b on unit vectors.
    np.testing.assert_allclose(s_l2, 2 - 2 * s_ip, atol=1e-5)


def test_bad_factory_string_is_a_clear_error():
    with pytest.raises(ValueError, match="build_index.factory"):
        build(_unit(10, 4), "NoSuchIndex42", "inner_product")


def test_too_few_vectors_to_train_is_a_clear_error():
    with pytest.raises(ValueError, match="training"):
        build(_unit(10, 8), "IVF64,Flat", "inner_product")


def test_auto_factory_rule_by_collection_size():
    from tasks.build_index import auto_factory

    assert auto_factory(1_797, 64) == "Flat"
    assert auto_factory(200_000, 64) == "Flat"
    assert auto_factory(1_000_000, 128) == "IVF4096,Flat"  # 4·√1e6 = 4000 -> 2^12
    assert auto_factory(300_000, 128) == "IVF2048,Flat"  # 4·√3e5 ≈ 2191 -> 2^11
    assert auto_factory(10_000_000, 128) == "IVF16384,PQ32"


@pytest.mark.parametrize("dim, m", [(64, 16), (130, 26), (50, 10), (30, 6), (7, 1), (3, 1)])
def test_the_auto_rule_for_large_collections_gives_a_pq_faiss_can_build(dim, m):
    """PQ's sub-quantisers must divide dim: dim/4 for a multiple of 4, else its largest divisor below."""
    import faiss

    from tasks.build_index import auto_factory

    factory = auto_factory(6_000_000, dim)
    assert factory == f"IVF8192,PQ{m}"
    assert faiss.index_factory(dim, factory).d == dim


def test_an_id_mapped_index_is_a_clear_error():
    """The stage adds vectors by position (its id map file names them); IDMap indexes need ids."""
    with pytest.raises(ValueError, match="drop the IDMap prefix"):
        build(_unit(10, 4), "IDMap,Flat", "inner_product")


def test_train_sample_and_search_params_are_saved_with_the_index(tmp_path):
    import faiss

    from tasks.build_index import set_search_params

    x = _unit(2000, 16)
    ivf = build(x, "IVF16,Flat", "inner_product", train_sample=500, seed=1)
    assert ivf.ntotal == 2000
    set_search_params(ivf, nprobe=5, ef_search=7)
    faiss.write_index(ivf, str(tmp_path / "ivf.faiss"))
    assert faiss.extract_index_ivf(faiss.read_index(str(tmp_path / "ivf.faiss"))).nprobe == 5
    hnsw = build(x, "HNSW8", "inner_product")
    set_search_params(hnsw, nprobe=5, ef_search=7)
    faiss.write_index(hnsw, str(tmp_path / "hnsw.faiss"))
    assert faiss.downcast_index(faiss.read_index(str(tmp_path / "hnsw.faiss"))).hnsw.efSearch == 7
    set_search_params(build(x, "Flat", "l2"), nprobe=5, ef_search=7)  # neither: left alone
    # Too small a training sample for 16 lists is the same clear error as too few vectors.
    with pytest.raises(ValueError, match="training"):
        build(x, "IVF16,Flat", "inner_product", train_sample=8)
