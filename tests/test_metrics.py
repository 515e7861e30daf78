"""Tests for tasks.metrics: hand-computed cases, pytorch-metric-learning as an oracle, a loop reference."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from tasks.metrics import (
    map_at_k,
    map_at_r,
    precision_at_1,
    r_precision,
    recall_at_k,
    relevance,
    summarize,
)

# ---------------------------------------------------------------------------------------------
# Hand-computed fixture. One row per query, ranks 1..4 left to right.
#   q0: R=2, hit at ranks 1 and 3 (rank 3 is outside the top R)
#   q1: R=3, hits at ranks 2, 3
#   q2: R=2, hits at ranks 1, 2 (perfect)
#   q3: R=0 (singleton class: no relevant item) -> NaN, excluded from averages and counted
#   q4: R=4, only one of the 4 relevant items found at all (rank 1): R > hits in top R
#   q5: R=4, one hit at rank 4
HITS = np.array(
    [
        [1, 0, 1, 0],
        [0, 1, 1, 0],
        [1, 1, 0, 0],
        [0, 0, 0, 0],
        [1, 0, 0, 0],
        [0, 0, 0, 1],
    ],
    dtype=bool,
)
R = np.array([2, 3, 2, 0, 4, 4])

# MAP@R = (1/R) * sum_{i<=R} P(i) rel(i)
MAP_AT_R = [
    (1 / 1) / 2,  # q0: P(1)=1; rank 2 miss; rank 3 is beyond R=2           -> 0.5
    (1 / 2 + 2 / 3) / 3,  # q1: P(2)=1/2, P(3)=2/3                          -> 7/18
    (1 / 1 + 2 / 2) / 2,  # q2: P(1)=1, P(2)=1                              -> 1
    np.nan,  # q3: R=0
    (1 / 1) / 4,  # q4: P(1)=1, the other 3 relevant items never retrieved  -> 0.25
    (1 / 4) / 4,  # q5: P(4)=1/4                                            -> 1/16
]
# R-Precision = (hits among top R) / R
R_PRECISION = [1 / 2, 2 / 3, 2 / 2, np.nan, 1 / 4, 1 / 4]
# AP@2 = 1/min(m,2) * sum_{i<=2} P(i) rel(i)
MAP_AT_2 = [
    (1 / 1) / 2,  # q0: m=2=k                 -> 0.5
    (1 / 2) / 2,  # q1: m=3>k, divide by k=2  -> 0.25
    (1 + 1) / 2,  # q2                        -> 1
    np.nan,  # q3: m=0
    (1 / 1) / 2,  # q4: m=4>k                 -> 0.5
    0.0,  # q5: no hit in top 2
]
# AP@4: every m <= 4 here, so the divisor is m
MAP_AT_4 = [
    (1 / 1 + 2 / 3) / 2,  # q0: m=2<k: P(1)=1, P(3)=2/3   -> 5/6
    (1 / 2 + 2 / 3) / 3,  # q1: m=3<k                     -> 7/18
    (1 + 1) / 2,  # q2                                    -> 1
    np.nan,
    (1 / 1) / 4,  # q4: m=4=k                             -> 0.25
    (1 / 4) / 4,  # q5: P(4)=1/4                          -> 1/16
]


def test_map_at_r_hand():
    np.testing.assert_allclose(map_at_r(HITS, R), MAP_AT_R)


def test_r_precision_hand():
    np.testing.assert_allclose(r_precision(HITS, R), R_PRECISION)


def test_map_at_k_hand():
    np.testing.assert_allclose(map_at_k(HITS, R, 2), MAP_AT_2)
    np.testing.assert_allclose(map_at_k(HITS, R, 4), MAP_AT_4)
    # k=6 > 4 columns: missing ranks 5, 6 count as misses; divisor min(m, 6) = m, so same as k=4.
    np.testing.assert_allclose(map_at_k(HITS, R, 6), MAP_AT_4)


def test_map_at_k_divisor_m_greater_than_k():
    # m=10 > k=3, all top 3 relevant: (1 + 1 + 1) / min(10, 3) = 1, a perfect score.
    np.testing.assert_allclose(map_at_k(np.ones((1, 3), bool), np.array([10]), 3), [1.0])
    # Same ranking scored against m=2 < k=3 is impossible (3 hits > 2 relevant) -> rejected.
    with pytest.raises(ValueError, match="n_relevant"):
        map_at_k(np.ones((1, 3), bool), np.array([2]), 3)


def test_precision_and_recall_hand():
    np.testing.assert_array_equal(precision_at_1(HITS), [1, 0, 1, 0, 1, 0])
    rec = recall_at_k(HITS, [1, 2, 10])
    assert list(rec) == [1, 2, 10]
    np.testing.assert_array_equal(rec[1], [1, 0, 1, 0, 1, 0])
    np.testing.assert_array_equal(rec[2], [1, 1, 1, 0, 1, 0])  # q5's only hit is at rank 4
    # K=10 > 4 columns: all columns are used.
    np.testing.assert_array_equal(rec[10], [1, 1, 1, 0, 1, 1])
    assert rec[10].dtype == np.float64


def test_summarize_hand():
    s = summarize(HITS, R, recall_ks=[1, 2, 10], map_k=2)
    assert set(s) == {
        "map_at_r", "r_precision", "map_at_2", "precision_at_1",
        "recall_at_1", "recall_at_2", "recall_at_10", "n_queries", "n_queries_without_relevant",
    }
    # Averages over the 5 queries with R > 0 (q3 excluded):
    assert s["map_at_r"] == pytest.approx((0.5 + 7 / 18 + 1 + 0.25 + 1 / 16) / 5)
    assert s["r_precision"] == pytest.approx((1 / 2 + 2 / 3 + 1 + 1 / 4 + 1 / 4) / 5)
    assert s["map_at_2"] == pytest.approx((0.5 + 0.25 + 1 + 0.5 + 0) / 5)  # 0.45
    assert s["precision_at_1"] == pytest.approx(3 / 5)  # q0, q2, q4
    assert s["recall_at_1"] == pytest.approx(3 / 5)
    assert s["recall_at_2"] == pytest.approx(4 / 5)  # q0, q1, q2, q4
    assert s["recall_at_10"] == pytest.approx(5 / 5)
    assert s["n_queries"] == 6
    assert s["n_queries_without_relevant"] == 1
    assert not any(isinstance(v, float) and np.isnan(v) for v in s.values())


def test_summarize_all_without_relevant_raises():
    with pytest.raises(ValueError, match="relevant"):
        summarize(np.zeros((3, 2), bool), np.zeros(3, int), recall_ks=[1], map_k=2)


def test_map_at_r_too_few_columns_raises():
    # max R = 4 but only 3 columns: the error names the k needed.
    with pytest.raises(ValueError, match="k >= 4"):
        map_at_r(HITS[:, :3], R)
    with pytest.raises(ValueError, match="k >= 4"):
        r_precision(HITS[:, :3], R)
    # Queries with R=0 do not need columns: an R=0 query with zero columns is fine.
    np.testing.assert_array_equal(map_at_r(np.zeros((2, 0), bool), np.array([0, 0])), [np.nan] * 2)


def test_input_validation():
    with pytest.raises(ValueError, match="was the query itself left"):
        map_at_r(np.array([[1, 1]], bool), np.array([1]))  # 2 hits, only 1 relevant item
    with pytest.raises(ValueError, match="2-D"):
        map_at_r(np.array([1, 0], bool), np.array([1]))
    with pytest.raises(ValueError, match="shape"):
        map_at_r(HITS, R[:3])
    with pytest.raises(ValueError, match=">= 0"):
        r_precision(HITS[:1], np.array([-1]))
    with pytest.raises(ValueError, match="integers"):
        r_precision(HITS[:1], np.array([2.0]))
    with pytest.raises(ValueError, match="bool"):
        precision_at_1(np.array([[0.3, 0.9]]))  # scores, not hits
    np.testing.assert_array_equal(precision_at_1(np.array([[1, 0], [0, 1]])), [1, 0])  # 0/1 ok
    with pytest.raises(ValueError, match="positive integer"):
        map_at_k(HITS, R, 0)
    with pytest.raises(ValueError, match="positive integer"):
        recall_at_k(HITS, [1, 0])
    with pytest.raises(ValueError, match="at least one"):
        precision_at_1(np.zeros((2, 0), bool))


def test_relevance():
    q = np.array([3, 5])
    nb = np.array([[3, 4, -1], [5, 5, 3]])  # -1 = padding, never a real label
    np.testing.assert_array_equal(relevance(q, nb), [[1, 0, 0], [1, 1, 0]])
    valid = np.array([[True, True, True], [True, False, True]])
    np.testing.assert_array_equal(relevance(q, nb, valid), [[1, 0, 0], [1, 0, 0]])
    # Strings, and objects with None as padding.
    qs = np.array(["cat", "dog"], dtype=object)
    nbs = np.array([["cat", None], ["cat", "dog"]], dtype=object)
    np.testing.assert_array_equal(relevance(qs, nbs), [[1, 0], [0, 1]])
    np.testing.assert_array_equal(
        relevance(np.array(["a", "b"]), np.array([["a", "b"], ["b", ""]])), [[1, 0], [1, 0]]
    )
    with pytest.raises(ValueError, match="different kinds"):
        relevance(np.array([1, 2]), np.array([["1", "2"], ["2", "1"]]))
    with pytest.raises(ValueError, match=r"\(Q, k\)"):
        relevance(q, nb[:1])
    with pytest.raises(ValueError, match="valid"):
        relevance(q, nb, valid[:, :2])


def test_module_does_not_import_torch():
    code = "import sys, tasks.metrics; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# ---------------------------------------------------------------------------------------------
# Loop reference for mAP@k (Kaggle Google Landmark Retrieval definition).


def _map_at_k_loop(hits: np.ndarray, n_relevant: np.ndarray, k: int) -> np.ndarray:
    out = []
    for row, m in zip(hits, n_relevant):
        if m == 0:
            out.append(np.nan)
            continue
        found, total = 0, 0.0
        for i in range(1, k + 1):
            if i <= len(row) and row[i - 1]:
                found += 1
                total += found / i
        out.append(total / min(m, k))
    return np.array(out)


def test_map_at_k_matches_loop_reference():
    rng = np.random.default_rng(0)
    hits = rng.random((200, 12)) < 0.3
    # n_relevant >= hits found, sometimes far more, sometimes 0 (where the row has no hit).
    n_relevant = hits.sum(axis=1) + rng.integers(0, 15, size=200) * (rng.random(200) < 0.7)
    for k in (1, 3, 5, 12, 20):
        np.testing.assert_allclose(
            map_at_k(hits, n_relevant, k), _map_at_k_loop(hits, n_relevant, k), rtol=0, atol=1e-12
        )


# ---------------------------------------------------------------------------------------------
# Oracle: pytorch-metric-learning's AccuracyCalculator.
#
# pml conventions (read from pytorch_metric_learning/utils/accuracy_calculator.py, 2.9.0):
# * get_accuracy(query, query_labels) with reference=None is leave-one-out: it sets
#   reference = query and ref_includes_query=True, searches k+1 neighbours and removes the
#   query's own index from each row (or the last column when self is not among them).
# * k="max_bin_count" -> k = (largest class count in the reference) - 1 under leave-one-out.
# * R per query = count of its label in the reference (- 1 under leave-one-out).
# * "Lone" queries (R == 0: singleton classes under leave-one-out, or labels absent from the
#   reference) are dropped from *all* k-NN metrics, precision_at_1 included, before averaging —
#   the same set summarize() averages over.


def _clustered(rng: np.random.Generator, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """L2-normalised 16-d float32 embeddings, loosely clustered by label (so scores are not ~0)."""
    centers = rng.standard_normal((n_classes, 16))
    x = centers[labels] + 1.2 * rng.standard_normal((len(labels), 16))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def _knn(query: np.ndarray, reference: np.ndarray, k: int) -> np.ndarray:
    """Exact inner-product top-k indices (Q, k), best first."""
    sims = query @ reference.T
    return np.argsort(-sims, axis=1, kind="stable")[:, :k]


def _pml(query, query_labels, reference=None, reference_labels=None, **kwargs):
    torch = pytest.importorskip("torch")
    pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning.distances import DotProductSimilarity
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import CustomKNN

    calc = AccuracyCalculator(
        include=("mean_average_precision_at_r", "r_precision", "precision_at_1"),
        k="max_bin_count",
        device=torch.device("cpu"),
        knn_func=CustomKNN(DotProductSimilarity()),  # embeddings are unit-norm: cosine
        **kwargs,
    )
    return calc.get_accuracy(query, query_labels, reference, reference_labels)


def test_oracle_pml_leave_one_out():
    rng = np.random.default_rng(42)
    sizes = [1, 1, 2, 3, 4, 6, 8, 10, 12, 14, 15, 16, 17, 18, 19, 20, 22, 24, 26, 62]
    assert sum(sizes) == 300 and len(sizes) == 20
    labels = rng.permutation(np.repeat(np.arange(20), sizes))
    emb = _clustered(rng, labels, 20)

    # Our side: search max class size + 1, then drop self.
    idx = _knn(emb, emb, max(sizes) + 1)
    is_self = idx == np.arange(len(emb))[:, None]
    assert is_self.any(axis=1).all()  # no ties pushing self out with random floats
    idx = idx[~is_self].reshape(len(emb), -1)
    hits = relevance(labels, labels[idx])
    n_relevant = np.bincount(labels)[labels] - 1
    ours = summarize(hits, n_relevant, recall_ks=[1], map_k=10)
    assert ours["n_queries_without_relevant"] == 2  # the two singleton classes

    theirs = _pml(emb, labels)
    assert ours["map_at_r"] == pytest.approx(theirs["mean_average_precision_at_r"], abs=1e-6)
    assert ours["r_precision"] == pytest.approx(theirs["r_precision"], abs=1e-6)
    assert ours["precision_at_1"] == pytest.approx(theirs["precision_at_1"], abs=1e-6)
    assert 0.05 < ours["map_at_r"] < 0.95  # a non-degenerate comparison

    # Per class too (pml lists classes of non-lone queries in sorted label order).
    per_class = _pml(emb, labels, return_per_class=True)
    keep = n_relevant > 0
    per_query = map_at_r(hits, n_relevant)
    ours_pc = [per_query[keep & (labels == c)].mean() for c in np.unique(labels[keep])]
    np.testing.assert_allclose(ours_pc, per_class["mean_average_precision_at_r"], atol=1e-6)


def test_oracle_pml_separate_query_and_reference():
    rng = np.random.default_rng(7)
    n_classes = 25
    # Reference holds classes 0..19 in varying sizes (class 0: one item); queries are fresh points
    # from classes 0..24, so queries of classes 20..24 have no relevant reference item.
    ref_sizes = np.concatenate([[1], rng.integers(2, 20, size=19)])
    ref_labels = rng.permutation(np.repeat(np.arange(20), ref_sizes))
    q_labels = rng.integers(0, n_classes, size=120)
    both = _clustered(rng, np.concatenate([ref_labels, q_labels]), n_classes)
    reference, query = both[: len(ref_labels)], both[len(ref_labels) :]

    counts = np.bincount(ref_labels, minlength=n_classes)
    n_relevant = counts[q_labels]
    idx = _knn(query, reference, int(n_relevant.max()))
    hits = relevance(q_labels, ref_labels[idx])
    ours = summarize(hits, n_relevant, recall_ks=[1, 5], map_k=5)
    assert ours["n_queries"] == 120
    assert ours["n_queries_without_relevant"] == int((q_labels >= 20).sum()) > 0

    theirs = _pml(query, q_labels, reference, ref_labels)
    assert ours["map_at_r"] == pytest.approx(theirs["mean_average_precision_at_r"], abs=1e-6)
    assert ours["r_precision"] == pytest.approx(theirs["r_precision"], abs=1e-6)
    assert ours["precision_at_1"] == pytest.approx(theirs["precision_at_1"], abs=1e-6)
