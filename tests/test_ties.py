"""Tests for tasks.ties: tie-aware metrics against the plain metrics averaged over every order of
the tied items (enumerated), hand cases, and independence from the gallery's row order."""

import itertools
import math

import numpy as np
import pytest

from tasks import metrics, retrieval, ties
from tasks.search import Chunk, exact_chunks, exact_research, index_chunks, index_research


def _orders(scores: np.ndarray) -> list[np.ndarray]:
    """Every column order of one ranking that permutes items only within runs of equal scores."""
    runs, start = [], 0
    for j in range(1, len(scores) + 1):
        if j == len(scores) or scores[j] != scores[start]:
            runs.append(list(itertools.permutations(range(start, j))))
            start = j
    return [np.array([c for run in combo for c in run]) for combo in itertools.product(*runs)]


def _plain(hits: np.ndarray, r: int, map_k: int, ks: list[int]) -> dict[str, float]:
    h, rr = hits[None, :], np.array([r])
    out = {"map_at_r": metrics.map_at_r(h, rr)[0], "r_precision": metrics.r_precision(h, rr)[0],
           "map_at_k": metrics.map_at_k(h, rr, map_k)[0]}
    return out | {f"recall_at_{kk}": v[0] for kk, v in metrics.recall_at_k(h, ks).items()}


@pytest.mark.parametrize("seed", range(40))
def test_every_value_is_the_mean_over_all_orders_of_the_tied_items(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 8))
    scores = -np.sort(rng.integers(0, int(rng.integers(1, 4)) + 1, size=k)).astype(np.float32)  # few values: ties
    hits = rng.random(k) < 0.5
    r = int(rng.integers(max(hits.sum(), 1), k + 1))  # R <= k: MAP@R needs the top R
    map_k, ks = int(rng.integers(1, k + 2)), [1, 2, k]
    orders = _orders(scores)
    want = {key: np.mean([_plain(hits[o], r, map_k, ks)[key] for o in orders]) for key in _plain(hits, r, map_k, ks)}

    got = metrics.per_query(hits[None, :], np.array([r]), map_k, scores[None, :])
    first = (got["first_hit"], got["first_tied"], got["first_tied_hits"])
    for key in ("map_at_r", "r_precision"):
        assert got[key][0] == pytest.approx(want[key], abs=1e-12), key
    assert got[f"map_at_{map_k}"][0] == pytest.approx(want["map_at_k"], abs=1e-12)
    for kk in ks:
        assert ties.recall(*first, kk)[0] == pytest.approx(want[f"recall_at_{kk}"], abs=1e-12), kk


def test_without_ties_the_expectations_are_the_plain_metrics():
    """The tie-aware sums, run on rankings without ties (per_query keeps such rows on the plain path)."""
    rng = np.random.default_rng(1)
    hits = rng.random((50, 9)) < 0.4
    r = np.minimum(np.maximum(hits.sum(axis=1), 1) + rng.integers(0, 3, 50), 9)
    g = ties.groups(-np.sort(rng.random((50, 9)), axis=1), hits)
    p_rel, ap_terms = ties.expected_terms(g)
    in_top_r = np.arange(9)[None, :] < r[:, None]
    # The same sums in another order: equal to the last bit or two.
    np.testing.assert_allclose((ap_terms * in_top_r).sum(axis=1) / r, metrics.map_at_r(hits, r), rtol=1e-14)
    np.testing.assert_allclose((p_rel * in_top_r).sum(axis=1) / r, metrics.r_precision(hits, r), rtol=1e-14)
    first, size, h = ties.first_group(g)
    assert (size == 1).all() and (h == 1).all()
    for kk, want in metrics.recall_at_k(hits, [1, 3, 9]).items():
        np.testing.assert_array_equal(ties.recall(first, size, h, kk), want)


def test_scores_must_match_the_hits():
    with pytest.raises(ValueError, match=r"scores must have the shape of hits \(2, 3\)"):
        metrics.per_query(np.ones((2, 3), bool), np.array([3, 3]), 3, np.zeros((2, 2)))


def test_tie_groups_by_hand():
    scores = np.array([[0.9, 0.5, 0.5, 0.5, 0.1], [np.nan, np.nan, 0.3, 0.3, 0.3]])
    hits = np.array([[1, 0, 1, 1, 0], [0, 0, 1, 0, 1]], dtype=bool)
    g = ties.groups(scores, hits)
    np.testing.assert_array_equal(g["start"], [[0, 1, 1, 1, 4], [0, 1, 2, 2, 2]])
    np.testing.assert_array_equal(g["size"], [[1, 3, 3, 3, 1], [1, 1, 3, 3, 3]])  # NaN never ties
    np.testing.assert_array_equal(g["hits"], [[1, 2, 2, 2, 0], [0, 0, 2, 2, 2]])
    np.testing.assert_array_equal(g["before"], [[0, 1, 1, 1, 3], [0, 0, 0, 0, 0]])
    first, size, h = ties.first_group(g)
    np.testing.assert_array_equal(first, [0, 2])
    # Row 1: the group of three at ranks 3-5 holds two hits; the top 3 miss it with chance 1/3.
    assert ties.recall(first, size, h, 3)[1] == pytest.approx(2 / 3)
    assert ties.recall(first, size, h, 4)[1] == 1.0 and ties.recall(first, size, h, 2)[1] == 0.0
    none = ties.first_group(ties.groups(scores[:1], np.zeros((1, 5), bool)))
    assert none[0][0] == -1 and ties.recall(*none, 5)[0] == 0.0


@pytest.mark.parametrize("k", [29, 9])
def test_a_collapsed_model_scores_chance_whatever_the_row_order(k):
    """3 classes of 10 identical embeddings: every other item ties. Tie-breaking by row order gave
    mAP@R 0.33 here (class 0's queries see their class first); chance is what a model that tells
    nothing apart deserves, and the row order must not change it. k = 9 (max R, what evaluate
    searches) cuts the tie group: the spare column shows it runs on, and a wider search closes it."""
    labels = np.repeat(np.arange(3), 10)
    vectors = np.zeros((30, 4), np.float32)
    vectors[:, 0] = 1
    self_pos = np.arange(30)

    def summary(order: np.ndarray, wider: bool = True) -> dict:
        qc, gc = retrieval.label_codes(labels[order], labels[order])
        r = retrieval.n_relevant(qc, gc, self_pos)
        chunks = exact_chunks(vectors, vectors, min(k + 1, 29), self_pos=self_pos, query_chunk=7)
        research = exact_research(vectors, vectors, "inner_product", self_pos, "cpu", 16384) if wider else None
        ret = retrieval.score(chunks, qc, gc, r, k, research=research)
        return retrieval.summary(ret, [1, 5], k) | {"curve": retrieval.recall_curve(ret, 5)[1]}

    by_label = summary(np.arange(30))
    shuffled = summary(np.random.default_rng(0).permutation(30))
    # Each query: 29 tied others, 9 relevant. P@1 = 9/29; Recall@5 = 1 - C(20,5)/C(29,5).
    assert by_label["precision_at_1"] == pytest.approx(9 / 29)
    assert by_label["recall_at_5"] == pytest.approx(1 - math.comb(20, 5) / math.comb(29, 5))
    # MAP@R with every order equally likely: (1/R) sum_i (9/29)(1 + (i-1)·8/28)/i over i = 1..9.
    chance = sum(9 / 29 * (1 + (i - 1) * 8 / 28) / i for i in range(1, 10)) / 9
    assert by_label["map_at_r"] == pytest.approx(chance) and chance < 0.2
    assert by_label["n_queries_tied"] == 30
    np.testing.assert_allclose(by_label["curve"][[0, 4]], [9 / 29, by_label["recall_at_5"]])
    for key in ("map_at_r", "r_precision", f"map_at_{k}", "precision_at_1", "recall_at_5", "curve"):
        np.testing.assert_allclose(shuffled[key], by_label[key], rtol=1e-12, err_msg=key)
    if k < 29:  # the group cut at the k-th, as searched: class 0's queries saw only their class
        assert summary(np.arange(30), wider=False)["map_at_r"] > chance + 0.1  # 0.28


def test_through_faiss_the_cut_tie_group_is_searched_whole():
    """Duplicates of 6 points, 10 copies each on average (and 20 points without), through faiss: k = max R cuts tie
    groups; with the wider search the metrics equal those of the whole ranking."""
    import faiss

    rng = np.random.default_rng(3)
    base = rng.standard_normal((6, 8)).astype(np.float32)
    labels = rng.integers(0, 3, 80)
    # 60 copies of 6 points, and 20 points of their own (their first hits are not tied)
    vectors = np.concatenate([base[rng.integers(0, 6, 60)], rng.standard_normal((20, 8)).astype(np.float32)])
    index = faiss.IndexFlatL2(8)
    index.add(vectors)
    self_pos = np.arange(80)
    qc, gc = retrieval.label_codes(labels, labels)
    r = retrieval.n_relevant(qc, gc, self_pos)
    k = retrieval.needed_k(r, 80)
    research = index_research(index, vectors, self_pos, negate=True)
    got = retrieval.score(index_chunks(index, vectors, k + 1, self_pos, 16, negate=True), qc, gc, r, k, research=research)
    whole = retrieval.score(index_chunks(index, vectors, 79, self_pos, 16, negate=True), qc, gc, r, k)
    cut = retrieval.score(index_chunks(index, vectors, k + 1, self_pos, 16, negate=True), qc, gc, r, k)
    assert k < 40 and got.values["tied"].sum() > 30
    for key in ("map_at_r", "r_precision", f"map_at_{k}", "first_hit", "first_tied", "first_tied_hits"):
        np.testing.assert_allclose(got.values[key], whole.values[key], rtol=1e-12, err_msg=key)
    assert not np.allclose(cut.values["map_at_r"], whole.values["map_at_r"])  # the case needs the wider search
    # The Recall@K curve (a histogram for untied first hits, expectations for tied ones) agrees with
    # the summary's Recall@K at every K, over a mix of both kinds of query.
    ks, curve = retrieval.recall_curve(got, k)
    size = got.values["first_tied"][got.values["n_relevant"] > 0]
    assert (size == 1).any() and (size > 1).any()
    summary = retrieval.summary(got, list(ks), k)
    np.testing.assert_allclose(curve, [summary[f"recall_at_{kk}"] for kk in ks], rtol=1e-12)


def test_only_the_last_tie_group_comes_from_the_wider_search():
    """An approximate index may find other neighbours when asked for more (HNSW searches
    max(efSearch, k)): the metrics stay those of the search as deployed, the wider one only
    completes the group that the k-th column cut."""
    codes = np.array([0, 0, 0, 1, 1, 1, 0])  # gallery labels; the query is of class 0 (R = 4, k = 4)
    narrow = Chunk(0, np.array([[3, 0, 4, 5, 1]]), np.array([[0.9, 0.5, 0.5, 0.5, 0.5]], np.float32))
    # Asked for more, the "index" ranks 6 first (a relevant item the deployed search missed) and
    # finds the rest of the 0.5 group: item 2.
    wide = Chunk(0, np.array([[6, 3, 0, 4, 5, 1, 2, -1]]), np.array([[0.95, 0.9, 0.5, 0.5, 0.5, 0.5, 0.5, np.nan]], np.float32))
    calls = []

    def research(rows, width):
        calls.append((rows.tolist(), width))
        return Chunk(0, wide.pos[:, :width], wide.scores[:, :width])

    got = retrieval.score([narrow], np.array([0]), codes, np.array([4]), 4, research=research)
    assert calls == [([0], 7)]  # 5 columns, 8× wider, capped at the gallery's 7
    # Deployed: 3 (a miss) first; then the 0.5 group is {0, 1, 2, 4, 5}: 3 hits among 5 at ranks 2-4.
    g = ties.groups(np.array([[0.9, 0.5, 0.5, 0.5, 0.5, 0.5]]), np.array([[0, 1, 1, 1, 0, 0]], bool))
    _, ap_terms = ties.expected_terms(g)
    assert got.values["map_at_r"][0] == pytest.approx(ap_terms[0, :4].sum() / 4)
    assert got.values["first_hit"][0] == 1 and got.values["first_tied"][0] == 5 and got.values["first_tied_hits"][0] == 3


def test_ties_across_relevance_are_found_only_where_they_decide():
    scores = np.array([[0.9, 0.5, 0.5, 0.1], [0.9, 0.9, 0.5, 0.1], [0.9, 0.5, 0.5, 0.5], [np.nan, np.nan, 0.3, 0.2]])
    hits = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0]], dtype=bool)
    # row 0: 0.5 ties a hit with a miss; row 1: ties only among hits; row 2: the 0.5 group mixes
    # (hit, hit, miss); row 3: missing slots (NaN) never tie.
    np.testing.assert_array_equal(ties.tied_across_relevance(scores, hits), [True, False, True, False])


def test_a_tied_argmax_shares_the_credit():
    score = np.array([[0.9, 0.9, 0.1], [0.9, 0.9, 0.1], [0.2, 0.5, 0.5], [1.0, 1.0, 1.0], [0.3, 0.7, 0.1]])
    truth = np.array([0, 2, 2, 1, 1])
    # Tied with one other: 1/2; not among the maxima: 0; a three-way tie: 1/3; no tie: argmax.
    np.testing.assert_allclose(ties.argmax_hit(score, truth), [0.5, 0.0, 0.5, 1 / 3, 1.0])



def test_near_duplicates_in_leave_one_out_never_count_an_item_twice():
    """Leave-one-out exact search computes each tile once for both its blocks; the wider search
    tiles another way, so the same dot product can round differently there. An item the first pass
    ranked just before the tie group, scored exactly the group's value by the wider one, was counted
    twice (2 relevant neighbours with R = 1: a ValueError). Classes of 2, copies scaled by ±1-2 ulp."""
    rng = np.random.default_rng(0)
    for _ in range(40):
        base = rng.standard_normal((4, 16)).astype(np.float32)
        g = np.repeat(base, rng.integers(20, 80, 4), axis=0)
        g = (g * (1 + rng.integers(-2, 3, (len(g), 1)) * np.float32(2**-23))).astype(np.float32)
        labels = np.arange(len(g)) // 2
        perm = rng.permutation(len(g))
        g, labels, self_pos = g[perm], labels[perm], np.arange(len(g))
        qc, gc = retrieval.label_codes(labels, labels)
        r = retrieval.n_relevant(qc, gc, self_pos)
        k = retrieval.needed_k(r, len(g), 3, 5)
        for metric in ("inner_product", "l2"):
            chunks = exact_chunks(g, g, k + 1, metric, self_pos, "cpu", 64, 16)
            ret = retrieval.score(chunks, qc, gc, r, 3, research=exact_research(g, g, metric, self_pos, "cpu", 16))
            assert 0 <= retrieval.summary(ret, [1], 3)["map_at_r"] <= 1


def test_a_group_too_large_to_list_is_scored_from_a_random_draw_of_it(monkeypatch):
    """Past MAX_WIDTH a tie group is cut. The exact wider search shuffles the gallery (seeded), so
    the items that make the cut are a random draw, whose tie-aware metrics are unbiased: a collapsed
    model scores chance with rows sorted by label, not its first classes' items."""
    monkeypatch.setattr(retrieval, "MAX_WIDTH", 256)
    n, classes = 2000, 20
    vectors = np.tile(np.eye(4, dtype=np.float32)[:1], (n, 1))
    self_pos = np.arange(n)
    labels = np.repeat(np.arange(classes), n // classes)  # sorted: the tie-break's first 256 are classes 0-2
    qc, gc = retrieval.label_codes(labels, labels)
    r = retrieval.n_relevant(qc, gc, self_pos)
    k = retrieval.needed_k(r, n, 10)
    research = exact_research(vectors, vectors, "inner_product", self_pos, "cpu", 16384)
    ret = retrieval.score(exact_chunks(vectors, vectors, k + 1, self_pos=self_pos), qc, gc, r, 10, research=research)
    got = retrieval.summary(ret, [1], 10)
    h, m = n // classes - 1, n - 1  # each query: 99 relevant among 1999 tied
    chance = sum(h / m * (1 + (i - 1) * (h - 1) / (m - 1)) / i for i in range(1, h + 1)) / h
    assert got["precision_at_1"] == pytest.approx(h / m, rel=0.05)
    assert got["map_at_r"] == pytest.approx(chance, rel=0.05)
    # The draw is seeded: the same figures every run.
    again = retrieval.score(exact_chunks(vectors, vectors, k + 1, self_pos=self_pos), qc, gc, r, 10,
                            research=exact_research(vectors, vectors, "inner_product", self_pos, "cpu", 16384))
    assert retrieval.summary(again, [1], 10) == got


def test_a_wider_search_that_finds_less_of_the_group_leaves_the_first_pass_as_it_was():
    """An approximate index asked for more may rank other items above the group, and list little
    of it: the row must never end up shorter than the first pass showed (MAP@R needs R columns)."""
    codes = (np.arange(20) >= 5).astype(np.int64)  # gallery labels; the query (class 0) has R = 5
    first = Chunk(0, np.arange(6)[None], np.full((1, 6), 0.5, np.float32))  # six tied at 0.5

    def research(rows, width):  # better items first; the group's score only in the last column
        return Chunk(0, np.r_[np.arange(10, 9 + width), 19][None], np.r_[np.full(width - 1, 0.9), 0.5].astype(np.float32)[None])

    got = retrieval.score([first], np.zeros(1, np.int64), codes, np.array([5]), 5, research=research)
    plain = metrics.per_query(np.arange(6)[None] < 5, np.array([5]), 5, first.scores)
    for key in ("map_at_r", "first_tied", "first_tied_hits"):
        np.testing.assert_array_equal(got.values[key], plain[key])


def test_a_first_search_as_wide_as_max_width_is_still_searched_wider(monkeypatch):
    """k + 1 >= MAX_WIDTH (R or a K that large): one wider search still runs, or the cut would
    keep the lowest gallery positions — class 0's items, rows sorted by label."""
    monkeypatch.setattr(retrieval, "MAX_WIDTH", 8)
    g, labels, self_pos = np.ones((40, 4), np.float32), np.repeat(np.arange(4), 10), np.arange(40)
    qc, gc = retrieval.label_codes(labels, labels)
    r = retrieval.n_relevant(qc, gc, self_pos)
    whole = retrieval.score(exact_chunks(g, g, 39, self_pos=self_pos), qc, gc, r, 5)
    got = retrieval.score(exact_chunks(g, g, 10, self_pos=self_pos), qc, gc, r, 5,
                          research=exact_research(g, g, "inner_product", self_pos, "cpu", 16))
    assert retrieval.summary(got, [1], 5)["map_at_r"] == pytest.approx(retrieval.summary(whole, [1], 5)["map_at_r"], rel=1e-12)


def test_the_exact_wider_search_shuffles_only_from_the_cutting_width():
    """Below ``shuffle_from`` the wider search is exact_chunks itself (no shuffled copy of the
    gallery for a few duplicates); from it on, tied items come in a seeded random order."""
    g = np.ones((30, 4), np.float32)
    self_pos, rows = np.arange(30), np.array([3, 17])
    plain = next(exact_chunks(g[rows], g, 12, self_pos=self_pos[rows]))
    research = exact_research(g, g, "inner_product", self_pos, "cpu", 16, shuffle_from=16)
    narrow, wide = research(rows, 12), research(rows, 20)
    np.testing.assert_array_equal(narrow.pos, plain.pos)  # gallery order: 0, 1, 2, ...
    assert not np.array_equal(wide.pos[:, :12], plain.pos)  # shuffled
    for i, row in enumerate(rows):  # still the query's neighbours, never itself, each once
        assert row not in wide.pos[i] and len(set(wide.pos[i])) == 20 and wide.pos[i].min() >= 0
