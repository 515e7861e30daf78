"""tasks.retrieval: chunked search + metrics equal the one-shot metrics, pytorch-metric-learning's
AccuracyCalculator (leave-one-out, separate sets, classes absent from the gallery), hand cases."""

from __future__ import annotations

import numpy as np
import pytest

from tasks import retrieval
from tasks.metrics import summarize
from tasks.search import exact_chunks

from test_metrics import _clustered, _pml


def _score(q, q_labels, g, g_labels, self_pos, chunk=37, map_k=10, ks=(1, 5)):
    qc, gc = retrieval.label_codes(q_labels, g_labels)
    r = retrieval.n_relevant(qc, gc, self_pos)
    k = retrieval.needed_k(r, len(g), map_k, *ks)
    ret = retrieval.score(exact_chunks(q, g, k, self_pos=self_pos, query_chunk=chunk, gallery_block=29), qc, gc, r, map_k, keep_top=3)
    return ret, retrieval.summary(ret, list(ks), map_k)


def test_leave_one_out_equals_pml_and_one_shot_summarize():
    rng = np.random.default_rng(42)
    sizes = [1, 1, 2, 3, 4, 6, 8, 10, 12, 14, 15, 16, 17, 18, 19, 20, 22, 24, 26, 62]
    labels = rng.permutation(np.repeat(np.arange(20), sizes))
    emb = _clustered(rng, labels, 20)
    ret, ours = _score(emb, labels, emb, labels, np.arange(len(emb)))
    assert ours["n_queries"] == 300 and ours["n_queries_without_relevant"] == 2  # two singletons
    theirs = _pml(emb, labels)
    assert ours["map_at_r"] == pytest.approx(theirs["mean_average_precision_at_r"], abs=1e-6)
    assert ours["r_precision"] == pytest.approx(theirs["r_precision"], abs=1e-6)
    assert ours["precision_at_1"] == pytest.approx(theirs["precision_at_1"], abs=1e-6)
    # The same numbers as the whole-matrix summarize on a brute-force ranking.
    s = emb @ emb.T
    np.fill_diagonal(s, -np.inf)
    idx = np.argsort(-s, axis=1, kind="stable")[:, : ret.k]
    one_shot = summarize(labels[idx] == labels[:, None], np.bincount(labels)[labels] - 1, [1, 5], 10)
    assert ours.pop("n_queries_tied") == 0  # continuous embeddings: no score decided by a tie-break
    assert ours == pytest.approx(one_shot, abs=1e-12)
    assert ret.top_pos.shape == (300, 3) and ret.top_hits.shape == (300, 3)


def test_separate_sets_with_classes_absent_from_the_gallery_equal_pml():
    rng = np.random.default_rng(7)
    ref_sizes = np.concatenate([[1], rng.integers(2, 20, size=19)])
    ref_labels = rng.permutation(np.repeat(np.arange(20), ref_sizes))
    q_labels = rng.integers(0, 25, size=120)  # classes 20..24 are not in the gallery
    both = _clustered(rng, np.concatenate([ref_labels, q_labels]), 25)
    g, q = both[: len(ref_labels)], both[len(ref_labels):]
    _, ours = _score(q, q_labels, g, ref_labels, np.full(120, -1))
    assert ours["n_queries"] == 120
    assert ours["n_queries_without_relevant"] == int((q_labels >= 20).sum()) > 0
    assert not any(isinstance(v, float) and np.isnan(v) for v in ours.values())
    theirs = _pml(q, q_labels, g, ref_labels)
    assert ours["map_at_r"] == pytest.approx(theirs["mean_average_precision_at_r"], abs=1e-6)
    assert ours["r_precision"] == pytest.approx(theirs["r_precision"], abs=1e-6)
    assert ours["precision_at_1"] == pytest.approx(theirs["precision_at_1"], abs=1e-6)


def test_string_labels_and_a_hand_case():
    # Gallery on a line: a0 a1 b0 b1; query "a" at 0.0 (not in the gallery) and query "z" (absent).
    g = np.array([[1, 0], [0.9, 0.436], [0, 1], [-0.2, 0.98]], np.float32)
    q = np.array([[1, 0.1], [0.1, 1]], np.float32)
    g_labels = np.array(["a", "a", "b", "b"], dtype=object)
    q_labels = np.array(["a", "z"], dtype=object)
    qc, gc = retrieval.label_codes(q_labels, g_labels)
    r = retrieval.n_relevant(qc, gc, np.array([-1, -1]))
    np.testing.assert_array_equal(r, [2, 0])
    ret = retrieval.score(exact_chunks(q, g, 4), qc, gc, r, map_k=2)
    out = retrieval.summary(ret, [1], 2)
    # Query "a" ranks a0, a1 first: perfect; query "z" has no relevant item: counted, not averaged.
    assert out["map_at_r"] == 1.0 and out["precision_at_1"] == 1.0
    assert out["n_queries"] == 2 and out["n_queries_without_relevant"] == 1
    ks, rec = retrieval.recall_curve(ret, 3)
    np.testing.assert_array_equal(ks, [1, 2, 3])
    np.testing.assert_array_equal(rec, [1.0, 1.0, 1.0])


def test_needed_k_reaches_the_largest_class():
    assert retrieval.needed_k(np.array([3, 61, 0]), 1000, 10, 5) == 61
    assert retrieval.needed_k(np.array([3]), 1000, 100) == 100
    assert retrieval.needed_k(np.array([3]), 50, 100) == 50


def test_the_tie_warning_starts_above_one_percent_of_the_answered_queries():
    """Queries without a relevant item are no answered query: they neither count nor dilute the share."""
    def result(tied, n=1000, without=0):
        return {"n_queries": n, "n_queries_without_relevant": without, "n_queries_tied": tied}

    assert retrieval.tied_warning(result(10)) is None  # exactly 1 %
    assert retrieval.tied_warning(result(11)).startswith("for 11 of 1,000 queries a relevant and a non-relevant item score exactly alike")
    assert "for 10 of 900 queries" in retrieval.tied_warning(result(10, without=100))
    assert retrieval.tied_warning(result(0, n=0)) is None
