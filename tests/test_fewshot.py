"""tasks.fewshot: seeded N-way K-shot episodes."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.errors import DatasetError
from tasks.fewshot import check_items, episodes_accuracy


def _clusters(n_classes: int, per_class: int, spread: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_classes), per_class)
    centres = rng.standard_normal((n_classes, 32))
    x = centres[labels] + spread * rng.standard_normal((len(labels), 32))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


@pytest.mark.parametrize("metric", ["inner_product", "l2"])
def test_separable_classes_score_one(metric):
    x, y = _clusters(8, 10, 0.01)
    mean, half = episodes_accuracy(x, y, ways=5, shots=1, queries=3, episodes=50, seed=0, metric=metric)
    assert mean == 1.0 and half == 0.0


def test_random_embeddings_score_near_chance():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((400, 32)).astype(np.float32)
    y = np.repeat(np.arange(20), 20)
    mean, half = episodes_accuracy(x, y, ways=5, shots=5, queries=5, episodes=400, seed=0)
    assert abs(mean - 0.2) < 0.04 and 0 < half < 0.03


def test_more_shots_help_and_seeds_repeat():
    x, y = _clusters(12, 20, 1.2, seed=2)
    one = episodes_accuracy(x, y, 5, 1, 5, 300, seed=3)
    five = episodes_accuracy(x, y, 5, 5, 5, 300, seed=3)
    assert five[0] > one[0]
    assert episodes_accuracy(x, y, 5, 1, 5, 300, seed=3) == one  # same seed, same episodes
    assert episodes_accuracy(x, y, 5, 1, 5, 300, seed=4) != one


def test_string_labels_and_one_shot_l2_equals_cosine_on_unit_vectors():
    x, y = _clusters(6, 4, 0.8, seed=5)
    names = np.array([f"class{c}" for c in y], dtype=object)
    a = episodes_accuracy(x, names, 3, 1, 2, 100, seed=0, metric="l2")
    b = episodes_accuracy(x, y, 3, 1, 2, 100, seed=0, metric="inner_product")
    assert a == pytest.approx(b)


def test_too_few_classes_is_a_clear_error():
    x, y = _clusters(4, 3, 0.1)
    with pytest.raises(ValueError, match="needs 5 classes of at least 2 items; only 4"):
        episodes_accuracy(x, y, 5, 1, 1, 10, seed=0)
    with pytest.raises(ValueError, match="at least 6 items; only 0"):
        episodes_accuracy(x, y, 2, 5, 1, 10, seed=0)


def test_l2_is_euclidean_distance_to_the_prototype_not_cosine():
    """Class 0 sits near (1, 0); class 1 near (10, ±1). A class-1 query points closer in angle to
    class 0 (5.7°) than to its own support (11.4°), but lies far closer to its own support in
    space: l2 gets every query right, cosine every class-1 query wrong — whatever the draws."""
    x = np.array([[1, 0.01], [1, -0.01], [10, 1], [10, -1]], dtype=np.float32)
    y = np.array([0, 0, 1, 1])
    assert episodes_accuracy(x, y, 2, 1, 1, 20, seed=0, metric="l2") == (1.0, 0.0)
    assert episodes_accuracy(x, y, 2, 1, 1, 20, seed=0, metric="inner_product") == (0.5, 0.0)


def test_inner_product_normalises_the_prototype():
    """Unit embeddings, 2-shot: class 0 is spread (three unit vectors 45° off the e0 axis, 120°
    apart around it), so the mean of any two is short (norm 0.79); class 1 is tight (one unit
    vector, 65° from e0). A class-0 query's cosine to its own prototype (0.32) beats the one to
    class 1's (0.30), but its raw dot product with the short mean (0.25) does not: scoring
    against the unnormalised mean would get every class-0 query wrong. By the symmetry every
    draw gives the same result."""
    c = s = np.sqrt(0.5)
    spread = [np.array([c, s * np.cos(a), s * np.sin(a), 0.0]) for a in np.deg2rad([90, 210, 330])]
    tight = [np.array([np.cos(np.deg2rad(65)), 0.0, 0.0, np.sin(np.deg2rad(65))])] * 3
    x = np.array(spread + tight, dtype=np.float32)
    y = np.repeat([0, 1], 3)
    assert episodes_accuracy(x, y, 2, 2, 1, 20, seed=0, metric="inner_product") == (1.0, 0.0)


def test_half_width_is_1_96_sample_std_over_sqrt_episodes():
    """The module's 95% half-width, 1.96 · std / sqrt(episodes), with the sample std (ddof=1, as
    the Prototypical Networks code's torchnet meter computes it), checked exactly. Items are
    identical within a class, so only which 2 of 3 classes an episode draws matters: class 2
    duplicates class 0, so the pair {0, 2} ties (each query counts 1/2: 0.5)
    and the other pairs score 1.0. With two possible values the mean tells how many episodes
    scored each, hence the per-episode accuracies."""
    x = np.array([[1, 0], [1, 0], [0, 1], [0, 1], [1, 0], [1, 0]], dtype=np.float32)
    y = np.repeat([0, 1, 2], 2)
    n = 60
    mean, half = episodes_accuracy(x, y, 2, 1, 1, n, seed=0)
    ones = round((mean - 0.5) / 0.5 * n)
    assert 0 < ones < n  # both kinds of episode occur, so the std is not 0
    acc = np.array([1.0] * ones + [0.5] * (n - ones))
    assert mean == pytest.approx(acc.mean(), abs=1e-12)
    assert half == pytest.approx(1.96 * acc.std(ddof=1) / np.sqrt(n), rel=1e-9)


def test_a_query_tied_between_two_prototypes_counts_one_half_whichever_class_was_drawn_first():
    """L2, 1-shot: class a is {0, e0}, class b is {2e0, 2e0}. When a's support is 0 its query e0
    sits exactly between the prototypes 0 and 2e0: that query counts 1/2, so an episode scores 0.75
    (b's query is always right) or 1.0 — never 0.5 or 1.0 by the order the classes were drawn in."""
    x = np.array([[0, 0], [1, 0], [2, 0], [2, 0]], dtype=np.float32)
    y = np.array(["a", "a", "b", "b"])
    scores = {episodes_accuracy(x, y, 2, 1, 1, 1, seed=s, metric="l2")[0] for s in range(20)}
    assert scores == {0.75, 1.0}


def test_the_report_has_every_ways_and_shots_and_names_the_key_when_data_is_short():
    from tasks.errors import DatasetError
    from tasks.fewshot import report
    from tasks.params import FewShotParams

    x, labels = _clusters(6, 4, 0.05)
    fs = FewShotParams(ways=[2, 5], shots=[1, 2], queries=2, episodes=3)
    out = report(fs, x, labels, seed=0, metric="inner_product")
    assert sorted(out) == sorted(f"few_shot_{n}way_{k}shot{s}" for n in (2, 5) for k in (1, 2) for s in ("", "_ci95"))
    assert out["few_shot_5way_2shot"] == episodes_accuracy(x, labels, 5, 2, 2, 3, 0, "inner_product")[0]
    with pytest.raises(DatasetError, match=r"^evaluate\.few_shot: 7-way .* \(set evaluate\.few_shot\.ways: \[\] to skip\)$"):
        report(FewShotParams(ways=[7], shots=[1], queries=2, episodes=3), x, labels, seed=0, metric="inner_product")
    assert report(FewShotParams(ways=[], shots=[1], queries=1, episodes=1), x, labels, seed=0, metric="l2") == {}


def test_check_items_refuses_what_evaluate_would_from_the_items_alone(tmp_path):
    """The queries of classes the gallery has: synthetic_items' 2 test classes of 12 items each."""
    from conftest import synthetic_items
    from tasks.params import FewShotParams

    synthetic_items(tmp_path / "items.parquet")
    fs = FewShotParams(ways=[2], shots=[1, 7], queries=5, episodes=10)
    check_items(fs, tmp_path / "items.parquet")  # 2 classes of 12 >= 7 + 5
    with pytest.raises(DatasetError, match=r"^evaluate\.few_shot: the queries of .*: 2-way 8-shot with 5 queries per class "
                                           r"needs 2 classes of at least 13 items; only 0 of 2 classes have that many \(set"):
        check_items(fs.model_copy(update={"shots": [8]}), tmp_path / "items.parquet")
    with pytest.raises(DatasetError, match=r"3-way 1-shot .* only 2 of 2 classes"):
        check_items(fs.model_copy(update={"ways": [3]}), tmp_path / "items.parquet")


def test_check_items_counts_only_the_queries_of_a_class_the_gallery_has(tmp_path):
    """Separate query and gallery sets (In-shop, GLDv2): 6 queries of class a and of b, whose class
    the gallery has, and 9 of "none", a class the gallery lacks (never episodes, as in evaluate)."""
    from tasks import contracts as C
    from tasks.params import FewShotParams

    rows = [("a", True, False)] * 6 + [("b", True, False)] * 6 + [("none", True, False)] * 9 + [("a", False, True), ("b", False, True)]
    n = len(rows)
    table = C.items_table([f"i{i}" for i in range(n)], [r[0] for r in rows], [C.TEST] * n, [f"s{i}" for i in range(n)],
                          np.zeros((n, 4), np.uint8), [r[1] for r in rows], [r[2] for r in rows])
    C.write_table(table, tmp_path / "items.parquet", C.ITEMS, {"height": 2, "width": 2, "channels": 1, "params": {}})
    fs = FewShotParams(ways=[2], shots=[1], queries=5, episodes=10)
    check_items(fs, tmp_path / "items.parquet")  # a and b: 6 queries each >= 1 + 5
    with pytest.raises(DatasetError, match=r"3-way 1-shot .* only 2 of 2 classes"):  # "none" is not a third
        check_items(fs.model_copy(update={"ways": [3]}), tmp_path / "items.parquet")
    check_items(fs.model_copy(update={"ways": [], "shots": [99]}), tmp_path / "items.parquet")  # off: nothing asked
