"""Tests for tasks.classes: the class-disjoint split, the usability check, rotated copies, the summary."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from conftest import ROOT
from tasks import contracts as C
from tasks import sources
from tasks.classes import check_usable, rotated_copies, split_by_class, summary
from tasks.errors import DatasetError
from tasks.params import load_params


def _ingest(**changes):
    return load_params(ROOT / "params.yaml").ingest.model_copy(update=changes)


def test_a_sources_own_split_is_kept():
    labels = ["a", "a", "b", "c"]
    assert split_by_class(labels, [C.TEST, C.TEST, C.TRAIN, C.TRAIN], _ingest()) == [C.TEST, C.TEST, C.TRAIN, C.TRAIN]


def test_a_sources_split_sharing_classes_is_refused_unless_allowed():
    labels, splits = ["a", "a", "b", "b", "c"], [C.TRAIN, C.TEST, C.TRAIN, C.TEST, C.TEST]
    with pytest.raises(DatasetError, match=r"puts 2 classes in both train and test \(e.g. 'a', 'b'\).*shared_classes: allow"):
        split_by_class(labels, splits, _ingest())
    assert split_by_class(labels, splits, _ingest(shared_classes="allow")) == splits
    counts = Counter(zip(splits, labels))
    assert summary(counts, [], 0)["classes_in_both_splits"] == 2


@pytest.mark.parametrize("fraction", [0.01, 0.3, 0.99])
def test_split_is_class_disjoint_seeded_and_leaves_a_class_on_each_side(fraction):
    labels = [f"c{i % 10}" for i in range(60)]
    splits = split_by_class(labels, [None] * 60, _ingest(test_fraction=fraction, seed=3))
    side = {}
    for label, split in zip(labels, splits):
        assert side.setdefault(label, split) == split  # every image of a class on one side
    n_test = sum(s == C.TEST for s in side.values())
    assert n_test == min(max(1, round(10 * fraction)), 9)
    assert split_by_class(labels, [None] * 60, _ingest(test_fraction=fraction, seed=3)) == splits
    others = {tuple(split_by_class(labels, [None] * 60, _ingest(test_fraction=0.3, seed=s))) for s in range(5)}
    assert len(others) > 1  # the seed decides which classes


def test_a_new_class_in_the_next_drop_moves_at_most_one_old_class_across():
    """Versioned drops: the split of the classes a drop shares with the one before stays put."""
    p = _ingest(test_fraction=0.3, seed=0)
    moved = []
    def split(n: int) -> dict[str, str]:
        labels = [f"c{i:02d}" for i in range(n)]
        return dict(zip(labels, split_by_class(labels, [None] * n, p)))

    for n in range(10, 60):
        before, after = split(n), split(n + 1)
        moved.append(sum(before[c] != after[c] for c in before))
    assert max(moved) <= 1 and sum(moved) > 0  # and some drops do move one (the test share is kept)


@pytest.mark.parametrize("counts,error", [
    ({(C.TRAIN, "a"): 2, (C.TRAIN, "b"): 2, (C.TEST, "c"): 2, (C.TEST, "d"): 1}, None),
    ({(C.TRAIN, "a"): 2, (C.TRAIN, "b"): 2, (C.TEST, "c"): 1, (C.TEST, "d"): 1}, "test split has 2 classes, 0 with"),
    ({(C.TRAIN, "a"): 2, (C.TRAIN, "b"): 2, (C.TEST, "c"): 5}, "test split has 1 class,"),
    ({(C.TEST, "c"): 2, (C.TEST, "d"): 1}, "^train split has no image: nothing to train on$"),
    ({(C.TRAIN, "unlabelled"): 5, (C.TEST, "c"): 1, (C.TEST, "d"): 1}, "test split has 2 classes, 0 with"),  # not a warning
])
def test_scoring_needs_a_query_with_a_positive_and_a_negative_and_training_an_image(counts, error):
    if error is None:
        assert check_usable(Counter(counts)) is None
    else:
        with pytest.raises(DatasetError, match=error):
            check_usable(Counter(counts))


@pytest.mark.parametrize("train", [
    {(C.TRAIN, "a"): 2, (C.TRAIN, "b"): 1},  # one class with a positive pair
    {(C.TRAIN, "unlabelled"): 50},  # unlabelled images under one label
    {(C.TRAIN, f"img{i}"): 1 for i in range(50)},  # ... or one label each
])
def test_a_train_split_supervised_learning_cannot_use_is_a_warning_for_self_supervised_mode(train):
    warning = check_usable(Counter(train | {(C.TEST, "c"): 2, (C.TEST, "d"): 1}))
    assert warning.startswith("train split has ") and "only train.mode self_supervised can train on it" in warning


def test_rotated_copies_turn_each_image_counter_clockwise_as_new_classes():
    p = _ingest(image_size=3, channels=1, train_rotations=[90, 270])
    images = np.arange(2 * 9, dtype=np.uint8).reshape(2, 3, 3)
    recs = [sources.Record(source=f"s{i}.png", label=f"L{i}", split=C.TRAIN, data=None) for i in range(2)]
    table = rotated_copies(["id0", "id1"], recs, images.reshape(2, 9), p)
    assert table[C.ITEM_ID].to_pylist() == ["id0@rot90", "id1@rot90", "id0@rot270", "id1@rot270"]
    assert table[C.LABEL].to_pylist() == ["L0@rot90", "L1@rot90", "L0@rot270", "L1@rot270"]
    assert set(table[C.SPLIT].to_pylist()) == {C.TRAIN}
    assert not any(table[C.IS_QUERY].to_pylist()) and not any(table[C.IS_GALLERY].to_pylist())
    pixels = np.frombuffer(b"".join(table[C.PIXELS].to_pylist()), dtype=np.uint8).reshape(4, 3, 3)
    # [[0,1,2],[3,4,5],[6,7,8]] turned 90° counter-clockwise: the right column becomes the top row.
    assert pixels[0].tolist() == [[2, 5, 8], [1, 4, 7], [0, 3, 6]]
    np.testing.assert_array_equal(pixels[3], np.rot90(images[1], 3))


def test_summary_counts_classes_images_singletons_and_rotations():
    counts = Counter({(C.TRAIN, "a"): 4, (C.TRAIN, "a@rot90"): 4, (C.TEST, "c"): 2, (C.TEST, "d"): 1})
    rejected = [sources.Rejected("x.png", "corrupt: bad"), sources.Rejected("y.png", "duplicate of z", "duplicate")]
    got = summary(counts, rejected, rotations=1)
    assert got == {
        "ingested": 11, "skipped": 2, "skipped_by_reason": {"corrupt": 1, "duplicate": 1},
        "classes": {C.TRAIN: 2, C.TEST: 2}, "images": {C.TRAIN: 8, C.TEST: 3},
        "single_image_classes": 1, "rotated_copies": 4, "classes_in_both_splits": 0,
    }
