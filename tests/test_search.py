"""tasks.search: exact chunked k-NN against a brute-force reference (ties by position), the
symmetric leave-one-out path, padding, and the faiss-index path."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from tasks import search
from tasks.search import exact_chunks, index_chunks


@pytest.fixture(params=["heaps", "torch"])
def cpu_selector(request, monkeypatch):
    """Both CPU selections: the fused heap kernels, and the torch group-max path CUDA uses."""
    monkeypatch.setattr(search, "HEAPS_ON_CPU", request.param == "heaps")


def _unit(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _reference(q, g, k, metric, self_pos=None):
    """Brute force in float64: rank by (score desc, position asc), the query itself removed."""
    q64, g64 = q.astype(np.float64), g.astype(np.float64)
    s = q64 @ g64.T
    if metric == "l2":
        s = -((q64 ** 2).sum(1)[:, None] + (g64 ** 2).sum(1)[None, :] - 2 * s)
    if self_pos is not None:
        rows = np.flatnonzero(self_pos >= 0)
        s[rows, self_pos[rows]] = -np.inf
    pos = np.stack([np.lexsort((np.arange(len(g)), -row))[:k] for row in s])
    sc = np.take_along_axis(s, pos, 1)
    pos[~np.isfinite(sc)] = -1
    return pos


def _run(chunks):
    chunks = list(chunks)
    assert [c.start for c in chunks] == sorted(c.start for c in chunks)
    return np.concatenate([c.pos for c in chunks]), np.concatenate([c.scores for c in chunks])


@pytest.mark.parametrize("metric", ["inner_product", "l2"])
@pytest.mark.parametrize("blocks", [(4096, 16384), (7, 5), (3, 64)])
def test_exact_matches_brute_force_separate_sets(metric, blocks, cpu_selector):
    q, g = _unit(23, 8, 0), _unit(57, 8, 1) * 1.5  # non-unit gallery: L2 and IP rank differently
    pos, scores = _run(exact_chunks(q, g, 6, metric, query_chunk=blocks[0], gallery_block=blocks[1]))
    np.testing.assert_array_equal(pos, _reference(q, g, 6, metric))
    expect = q @ g.T if metric == "inner_product" else -((q[:, None] - g[None]) ** 2).sum(-1)
    np.testing.assert_allclose(scores, np.take_along_axis(expect, pos, 1), atol=1e-5)


@pytest.mark.parametrize("metric", ["inner_product", "l2"])
@pytest.mark.parametrize("chunk", [4096, 5, 8])
def test_leave_one_out_symmetric_path_matches_brute_force(metric, chunk, cpu_selector):
    x = _unit(41, 8, 2)
    self_pos = np.arange(41)
    pos, _ = _run(exact_chunks(x, x, 7, metric, self_pos=self_pos, query_chunk=chunk, gallery_block=chunk))
    np.testing.assert_array_equal(pos, _reference(x, x, 7, metric, self_pos))
    assert not (pos == self_pos[:, None]).any()


def test_leave_one_out_with_a_query_subset(cpu_selector):
    g = _unit(30, 8, 3)
    self_pos = np.array([4, -1, 29, 0])  # three queries are gallery items, one is not
    q = np.stack([g[4], _unit(1, 8, 9)[0], g[29], g[0]])
    pos, _ = _run(exact_chunks(q, g, 5, self_pos=self_pos, query_chunk=3, gallery_block=7))
    np.testing.assert_array_equal(pos, _reference(q, g, 5, "inner_product", self_pos))


def test_ties_are_broken_by_gallery_position_whatever_the_blocks(cpu_selector):
    # 12 copies of one vector and 12 of another: every score is tied with many others.
    base = np.eye(4, dtype=np.float32)
    g = base[[0, 1] * 12]
    q = base[[0, 1, 0]]
    want = [[0, 2, 4, 6, 8], [1, 3, 5, 7, 9], [0, 2, 4, 6, 8]]
    for qc, gb in [(4096, 16384), (1, 3), (2, 5), (3, 1)]:
        pos, _ = _run(exact_chunks(q, g, 5, query_chunk=qc, gallery_block=gb))
        np.testing.assert_array_equal(pos, want)
    # Leave-one-out on the gallery itself: a twin with the same score is found, never self.
    pos, scores = _run(exact_chunks(g, g, 3, self_pos=np.arange(24), query_chunk=5, gallery_block=5))
    np.testing.assert_array_equal(pos[:3], [[2, 4, 6], [3, 5, 7], [0, 4, 6]])
    assert (scores == 1.0).all()


def test_gallery_smaller_than_k_is_padded(cpu_selector):
    g = _unit(3, 4, 4)
    pos, scores = _run(exact_chunks(g, g, 5, self_pos=np.arange(3)))
    assert pos.shape == (3, 5)
    assert (pos[:, 2:] == -1).all() and np.isnan(scores[:, 2:]).all()
    assert (pos[:, :2] >= 0).all() and not (pos[:, :2] == np.arange(3)[:, None]).any()


def test_faiss_index_path_agrees_with_exact_and_drops_self(cpu_selector):
    x = _unit(60, 8, 5)
    index = faiss.IndexFlatIP(8)
    index.add(x)
    self_pos = np.arange(60)
    pos_f, sc_f = _run(index_chunks(index, x, 6, self_pos, query_chunk=16))
    pos_e, sc_e = _run(exact_chunks(x, x, 6, self_pos=self_pos))
    np.testing.assert_array_equal(pos_f, pos_e)
    np.testing.assert_allclose(sc_f, sc_e, atol=1e-6)
    l2 = faiss.IndexFlatL2(8)
    l2.add(x)
    pos_l, sc_l = _run(index_chunks(l2, x, 6, self_pos, negate=True))
    np.testing.assert_array_equal(pos_l, _run(exact_chunks(x, x, 6, "l2", self_pos=self_pos))[0])
    assert (sc_l <= 0).all()


def test_faiss_index_path_pads_a_small_gallery():
    x = np.eye(3, dtype=np.float32)
    index = faiss.IndexFlatIP(3)
    index.add(x)
    pos, scores = _run(index_chunks(index, x[:1], 4, np.array([0])))
    assert pos.shape == (1, 4) and (pos[0, 2:] == -1).all() and np.isnan(scores[0, 2:]).all()
    assert 0 not in pos[0]


def test_bad_inputs_are_refused():
    x = _unit(5, 4, 6)
    with pytest.raises(ValueError, match="share D"):
        next(exact_chunks(x, _unit(5, 3, 6), 2))
    with pytest.raises(ValueError, match="metric"):
        next(exact_chunks(x, x, 2, "cosine"))
    with pytest.raises(ValueError, match="self_pos"):
        next(exact_chunks(x, x, 2, self_pos=np.arange(4)))


@pytest.mark.parametrize("metric,precision,heaps", [
    ("inner_product", "fp32", True), ("l2", "fp32", True), ("inner_product", "bf16", True),  # CPU heaps
    ("inner_product", "fp32", False), ("l2", "fp32", False),  # the torch selection (CUDA's)
])
def test_group_preselection_with_duplicates_matches_brute_force(metric, precision, heaps, monkeypatch):
    monkeypatch.setattr(search, "HEAPS_ON_CPU", heaps)
    # Blocks of 96/160 columns (multiples of GROUP, more than k + 1 groups) take the torch
    # selection's group-max path; the heaps and the bf16 certificate meet the same ties. Small
    # integer vectors make every score exact in fp32 (so "equal" means equal, which for arbitrary
    # floats BLAS does not promise: a product's last bit can depend on where it falls in a tile)
    # and give many tied group maxima and tied scores at the cut.
    rng = np.random.default_rng(8)
    x = rng.integers(-2, 3, size=(500, 8)).astype(np.float32)
    x = np.concatenate([x, x[:40], x[100:140]])
    x[rng.permutation(len(x))[:60]] = x[7]  # 60 more copies of one vector
    self_pos = np.arange(len(x))
    want = _reference(x, x, 5, metric, self_pos)
    for qc, gb in [(96, 160), (160, 96), (4096, 16384)]:
        pos, _ = _run(exact_chunks(x, x, 5, metric, self_pos=self_pos, query_chunk=qc, gallery_block=gb, precision=precision))
        np.testing.assert_array_equal(pos, want)
        q = x[:200] + 1  # separate query set
        pos, _ = _run(exact_chunks(q, x, 5, metric, query_chunk=qc, gallery_block=gb, precision=precision))
        np.testing.assert_array_equal(pos, _reference(q, x, 5, metric))


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="no CUDA device here")
@pytest.mark.parametrize("metric", ["inner_product", "l2"])
def test_cuda_gives_the_cpu_answer(metric):
    x = _unit(3000, 32, 11)
    for self_pos in (np.arange(3000), None):
        cpu = _run(exact_chunks(x, x, 10, metric, self_pos, "cpu", 512, 1024))
        gpu = _run(exact_chunks(x, x, 10, metric, self_pos, "cuda", 512, 1024))
        assert (cpu[0] == gpu[0]).mean() > 0.999  # fp32 on both; summation order may flip near-ties
        np.testing.assert_allclose(cpu[1], gpu[1], atol=1e-5)


def test_the_caller_runs_outside_inference_mode_and_with_its_own_tf32_setting():
    import numpy as np
    import torch

    from tasks import search

    x = np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32)
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True  # a caller that wants TF32 for its own work
    try:
        chunks = search.exact_chunks(x, x, 3, query_chunk=16)
        next(chunks)
        assert not torch.is_inference_mode_enabled()  # between chunks: the caller's own mode
        assert torch.backends.cuda.matmul.allow_tf32 is True
        assert len(list(chunks)) == 3  # and the generator carries on
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.parametrize("blocks", [(4096, 16384), (7, 5), (3, 64)])
def test_bf16_candidates_give_the_fp32_answer(blocks):
    q, g = _unit(23, 8, 0), _unit(57, 8, 1) * 1.5
    for qs, gs, self_pos in ((q, g, None), (g, g, np.arange(57)), (g[:20], g, np.arange(20))):
        pos, scores = _run(exact_chunks(qs, gs, 6, "inner_product", self_pos, "cpu", *blocks, precision="bf16"))
        np.testing.assert_array_equal(pos, _reference(qs, gs, 6, "inner_product", self_pos))
        fp32 = _run(exact_chunks(qs, gs, 6, "inner_product", self_pos, "cpu", *blocks, precision="fp32"))
        np.testing.assert_array_equal(pos, fp32[0])
        np.testing.assert_allclose(scores, fp32[1], rtol=0, atol=1e-6)  # fp32 scores, not bf16 ones


def _bf16_certificates(monkeypatch):
    """Search 300 random unit vectors in bf16 (symmetric path, then plain); check the answers
    against fp32 and return each row's certificate outcome (True: no fp32 re-search)."""
    import torch

    outcomes = []
    rescore = search._rescore

    def spy(*args):
        out = rescore(*args)
        outcomes.append(out[2].clone())
        return out

    monkeypatch.setattr(search, "_rescore", spy)
    x = _unit(300, 16, 4)
    for self_pos in (np.arange(300), None):
        pos, _ = _run(exact_chunks(x, x, 5, self_pos=self_pos, query_chunk=64, gallery_block=100, precision="bf16"))
        np.testing.assert_array_equal(pos, _reference(x, x, 5, "inner_product", self_pos))
    certified = torch.cat(outcomes)
    assert len(certified) == 600  # every row went through the certificate once (no re-search calls it)
    return certified


def test_rows_the_bf16_candidates_cannot_certify_are_searched_again(monkeypatch):
    # No spare candidates: the bf16 k-th score and the fp32 k-th are within the error bound of
    # each other, so most rows fail the certificate and take the fp32 path — and still agree.
    monkeypatch.setattr(search, "BF16_SPARE", 0)
    assert not _bf16_certificates(monkeypatch).all()


def test_bf16_candidates_certify_rows_on_well_separated_data(monkeypatch):
    # With the default BF16_SPARE spare candidates, random unit vectors leave a wide gap between the
    # k-th fp32 score and the worst bf16 candidate: the certificate should pass for (nearly) every
    # row, so the fp32 re-search is the exception. A certificate that never passes would still give
    # right answers (every row searched again in fp32) but lose the whole bf16 speed-up.
    assert float(_bf16_certificates(monkeypatch).float().mean()) > 0.9  # here every row: 600 of 600


def test_bf16_is_refused_where_it_does_not_apply():
    x = _unit(10, 4, 0)
    with pytest.raises(ValueError, match="bf16"):
        next(exact_chunks(x, x, 2, "l2", precision="bf16"))
    with pytest.raises(ValueError, match="precision"):
        next(exact_chunks(x, x, 2, precision="fp16"))


@pytest.mark.parametrize("metric", ["inner_product", "l2"])
def test_leave_one_out_symmetric_path_scores_are_the_metric_scores(metric, cpu_selector):
    # The symmetric path ranks L2 by q·g - |g|²/2 and must convert the kept scores to -|q - g|²
    # (higher = closer) like the other paths; positions alone do not show a missing conversion.
    # Non-unit vectors so |q|² differs per row and the ranking score is far from -|q - g|².
    x = _unit(41, 8, 2) * np.linspace(0.5, 2.0, 41, dtype=np.float32)[:, None]
    self_pos = np.arange(41)
    for chunk in (4096, 5):
        pos, scores = _run(exact_chunks(x, x, 7, metric, self_pos=self_pos, query_chunk=chunk, gallery_block=chunk))
        np.testing.assert_array_equal(pos, _reference(x, x, 7, metric, self_pos))
        expect = x @ x.T if metric == "inner_product" else -((x[:, None] - x[None]) ** 2).sum(-1)
        np.testing.assert_allclose(scores, np.take_along_axis(expect, pos, 1), rtol=0, atol=1e-5)
        # And the same scores as the non-symmetric path (a copy with one query not in the gallery).
        sp = self_pos.copy()
        sp[0] = -1
        _, other = _run(exact_chunks(x, x, 7, metric, self_pos=sp, query_chunk=chunk, gallery_block=chunk))
        np.testing.assert_allclose(scores[1:], other[1:], rtol=0, atol=1e-5)


@pytest.mark.parametrize("metric", ["inner_product", "l2"])
def test_same_shaped_queries_with_other_values_are_not_taken_for_the_gallery(metric, cpu_selector):
    # self_pos == arange(Q) and Q == G but the queries are other vectors (say, augmented views of
    # the gallery items, each excluding its own item): the one-set symmetric shortcut would search
    # the gallery against itself. The answer must be the queries' own neighbours.
    g = _unit(41, 8, 2)
    self_pos = np.arange(41)
    for q in (_unit(41, 8, 12), g + 0.3 * _unit(41, 8, 13)):
        for chunk in (4096, 5):
            pos, scores = _run(exact_chunks(q, g, 7, metric, self_pos=self_pos, query_chunk=chunk, gallery_block=chunk))
            np.testing.assert_array_equal(pos, _reference(q, g, 7, metric, self_pos))
            expect = q @ g.T if metric == "inner_product" else -((q[:, None] - g[None]) ** 2).sum(-1)
            np.testing.assert_allclose(scores, np.take_along_axis(expect, pos, 1), rtol=0, atol=1e-5)
    # An equal copy (not the same object) may take the shortcut: the answer is the same either way.
    pos, _ = _run(exact_chunks(g.copy(), g, 7, metric, self_pos=self_pos, query_chunk=5, gallery_block=5))
    np.testing.assert_array_equal(pos, _reference(g, g, 7, metric, self_pos))
