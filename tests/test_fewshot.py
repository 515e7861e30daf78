"""tasks.fewshot: seeded N-way K-shot episodes."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.fewshot import episodes_accuracy


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
