"""Tests for tasks.make_batches: the seeded P×K plan, small classes, triplets (plan_epoch itself: test_sampling)."""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from tasks import contracts as C
from tasks import make_batches
from tasks.params import load_params


def write_items(path: Path, train: dict[str, int], test: dict[str, int] | None = None) -> dict[str, str]:
    """A synthetic ITEMS table (1-pixel images); returns {item_id: label} of the train items."""
    rows = [
        (f"{label}#{i}", label, split)
        for split, sizes in ((C.TRAIN, train), (C.TEST, test or {}))
        for label, n in sizes.items()
        for i in range(n)
    ]
    # shuffle the row order: the stage must not depend on it
    rows = [rows[i] for i in np.random.default_rng(123).permutation(len(rows))]
    table = C.items_table(
        [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows],
        [f"synthetic/{r[0]}" for r in rows], np.zeros((len(rows), 1), np.uint8),
    )
    C.write_table(table, path, C.ITEMS, {"height": 1, "width": 1, "channels": 1})
    return {r[0]: r[1] for r in rows if r[2] == C.TRAIN}


def setup(make_project, train, test=None, name="project", **mb):
    """Project with synthetic items; ``mb`` are make_batches params (short names)."""
    settings = {
        "classes_per_batch": 3,
        "images_per_class": 4,
        "epochs": 2,
        "small_classes": "replace",
        "triplets_per_anchor": 1,
        "seed": 0,
        **mb,
    }
    path = make_project({f"make_batches.{k}": v for k, v in settings.items()}, name=name)
    params = load_params(path)
    labels = write_items(params.paths["items"], train, test)
    return params, labels


def run(params):
    summary = make_batches.run(params.make_batches, params.paths)
    batches, meta = C.read_table(params.paths["batches"], C.BATCHES)
    triplets, tmeta = C.read_table(params.paths["triplets"], C.TRIPLETS)
    return summary, batches, meta, triplets, tmeta


def grouped(batches: pa.Table) -> dict[tuple[int, int], list[str]]:
    out: dict[tuple[int, int], list[str]] = defaultdict(list)
    for e, b, item in zip(
        batches[C.EPOCH].to_pylist(), batches[C.BATCH].to_pylist(), batches[C.ITEM_ID].to_pylist()
    ):
        out[(e, b)].append(item)
    return dict(out)


def assert_pk(batches: pa.Table, labels: dict[str, str], p: int, k: int) -> None:
    for key, items in grouped(batches).items():
        counts = Counter(labels[i] for i in items)
        assert len(items) == p * k, key
        assert len(counts) == p, (key, counts)
        assert set(counts.values()) == {k}, (key, counts)


EVEN = {f"c{i}": 8 + (i % 3) * 3 for i in range(7)}  # 8, 11, 14 images: all >= K=4
TEST = {"t0": 5, "t1": 5}


# --------------------------------------------------------------------------------------- structure


def test_every_batch_is_p_classes_times_k(make_project):
    params, labels = setup(make_project, EVEN, TEST, classes_per_batch=3, images_per_class=4, epochs=3)
    summary, batches, meta, _, _ = run(params)
    assert_pk(batches, labels, 3, 4)
    keys = grouped(batches)
    assert {e for e, _ in keys} == {0, 1, 2}
    for epoch in range(3):
        numbers = sorted(b for e, b in keys if e == epoch)
        assert numbers == list(range(len(numbers))) and numbers  # contiguous from 0
    assert meta["classes_per_batch"] == 3 and meta["images_per_class"] == 4 and meta["epochs"] == 3
    assert meta["small_classes"] == "replace" and meta["seed"] == 0
    assert meta["classes_smaller_than_k"] == [] and meta["excluded_classes"] == []
    assert summary["classes_per_batch"] == 3 and summary["n_small_classes"] == 0
    # rows of one batch are contiguous and batches ordered
    order = list(zip(batches[C.EPOCH].to_pylist(), batches[C.BATCH].to_pylist()))
    assert order == sorted(order)


def test_only_train_items(make_project):
    params, labels = setup(make_project, EVEN, TEST)
    _, batches, _, triplets, _ = run(params)
    assert set(batches[C.ITEM_ID].to_pylist()) <= set(labels)
    for col in (C.ANCHOR, C.POSITIVE, C.NEGATIVE):
        assert set(triplets[col].to_pylist()) <= set(labels)


def test_every_train_image_once_per_epoch(make_project):
    params, labels = setup(make_project, EVEN, TEST, epochs=4, classes_per_batch=2, images_per_class=4)
    _, batches, _, _, _ = run(params)
    chunks = sum(-(-n // 4) for n in EVEN.values())  # each class in K-sized chunks, the last topped up
    for epoch in range(4):
        drawn = [i for (e, _), items in grouped(batches).items() if e == epoch for i in items]
        assert set(drawn) == set(labels), epoch
        # Once, but for the top-ups and at most one fresh chunk when fewer than P classes are left.
        assert chunks * 4 <= len(drawn) <= (chunks + 1) * 4, epoch


def test_same_seed_same_plan_other_seed_differs(make_project):
    a, _ = setup(make_project, EVEN, TEST, name="a", seed=5)
    b, _ = setup(make_project, EVEN, TEST, name="b", seed=5)
    c, _ = setup(make_project, EVEN, TEST, name="c", seed=6)
    _, ba, _, ta, _ = run(a)
    _, bb, _, tb, _ = run(b)
    _, bc, _, tc, _ = run(c)
    assert ba.equals(bb) and ta.equals(tb)
    assert not ba.equals(bc)
    assert not ta.equals(tc)
    # and the same set of items each epoch, whatever the seed
    assert set(ba[C.ITEM_ID].to_pylist()) == set(bc[C.ITEM_ID].to_pylist())


def test_rerun_is_identical(make_project):
    params, _ = setup(make_project, EVEN, TEST)
    first = run(params)
    second = run(params)
    assert first[1].equals(second[1]) and first[3].equals(second[3])


# ------------------------------------------------------------------------------------ small classes


SMALL_MIX = {"big0": 9, "big1": 6, "big2": 5, "big3": 4, "small3": 3, "small2": 2, "single": 1}


def test_drop_excludes_small_classes(make_project):
    params, labels = setup(
        make_project, SMALL_MIX, TEST, small_classes="drop", classes_per_batch=2, images_per_class=4, epochs=3
    )
    summary, batches, meta, triplets, _ = run(params)
    assert sorted(meta["excluded_classes"]) == ["single", "small2", "small3"]
    assert sorted(meta["classes_smaller_than_k"]) == ["single", "small2", "small3"]
    used = {labels[i] for i in batches[C.ITEM_ID].to_pylist()}
    assert used == {"big0", "big1", "big2", "big3"}
    assert {labels[i] for i in triplets[C.ANCHOR].to_pylist()} == used
    assert {labels[i] for i in triplets[C.NEGATIVE].to_pylist()} <= used
    assert_pk(batches, labels, 2, 4)
    assert summary["n_small_classes"] == 3
    # in drop mode nothing is sampled with replacement: no item twice in a batch
    for items in grouped(batches).values():
        assert len(items) == len(set(items))


def test_replace_keeps_small_classes(make_project):
    params, labels = setup(
        make_project,
        SMALL_MIX,
        TEST,
        small_classes="replace",
        classes_per_batch=2,
        images_per_class=4,
        epochs=3,
    )
    summary, batches, meta, triplets, _ = run(params)
    assert sorted(meta["classes_smaller_than_k"]) == ["single", "small2", "small3"]
    assert meta["excluded_classes"] == ["single"]  # one image: never a positive pair
    used = {labels[i] for i in batches[C.ITEM_ID].to_pylist()}
    assert used == set(SMALL_MIX) - {"single"}
    assert_pk(batches, labels, 2, 4)
    # the small classes fill their K slots with repeats of their own images
    for items in grouped(batches).values():
        per_class = defaultdict(list)
        for i in items:
            per_class[labels[i]].append(i)
        for label in ("small2", "small3"):
            if label in per_class:
                assert len(per_class[label]) == 4 and len(set(per_class[label])) == SMALL_MIX[label]
    assert summary["n_small_classes"] == 3
    # every usable image still appears each epoch
    for epoch in range(3):
        seen = {i for (e, _), items in grouped(batches).items() if e == epoch for i in items}
        assert seen == {i for i, l in labels.items() if l != "single"}


@pytest.mark.parametrize("mode", ["replace", "drop"])
def test_single_image_class_always_excluded(make_project, mode):
    params, labels = setup(
        make_project,
        {"a": 4, "b": 4, "c": 4, "lonely": 1},
        small_classes=mode,
        classes_per_batch=3,
        images_per_class=2,
        epochs=5,
    )
    _, batches, meta, triplets, _ = run(params)
    assert "lonely" in meta["excluded_classes"]
    lonely = "lonely#0"
    assert lonely not in batches[C.ITEM_ID].to_pylist()
    for col in (C.ANCHOR, C.POSITIVE, C.NEGATIVE):
        assert lonely not in triplets[col].to_pylist()


def _unfillable(params, match: str, capsys) -> None:
    """No P×K batch can be made: make_batches warns and plans no batch (self-supervised training,
    which it cannot see, needs none); supervised training refuses the plan with the same reason."""
    from tasks.errors import DatasetError
    from tasks.train_data import check_plan, load_plan

    summary, batches, meta, triplets, _ = run(params)
    err = capsys.readouterr().err
    assert re.search(match, err) and "the plan holds no batch. Supervised training will refuse it (lower P or K)" in err
    assert batches.num_rows == 0 and re.search(match, meta["unfilled"]) and meta["epochs"] == params.make_batches.epochs
    items, _ = C.read_table(params.paths["items"], C.ITEMS, columns=[C.ITEM_ID, C.SPLIT])
    row_of = {i: n for n, i in enumerate(items[C.ITEM_ID].to_pylist())}
    with pytest.raises(DatasetError, match=rf"holds no batch: .*{match}.*: lower P or K, or set train.mode: self_supervised"):
        check_plan(params.paths)
    assert load_plan(params.paths, row_of)[1]["unfilled"] == meta["unfilled"]


def test_too_many_classes_per_batch(make_project, capsys):
    params, _ = setup(make_project, {"a": 4, "b": 4, "c": 1}, classes_per_batch=3, images_per_class=2)
    _unfillable(params, r"classes_per_batch=3 but only 2 train classes", capsys)


def test_drop_can_leave_too_few_classes(make_project, capsys):
    params, _ = setup(
        make_project, {"a": 8, "b": 3, "c": 3}, small_classes="drop", classes_per_batch=2, images_per_class=4
    )
    _unfillable(params, r"only 1 train classes .*small_classes='drop'", capsys)
    # the same data is fine under replace
    ok, _ = setup(
        make_project,
        {"a": 8, "b": 3, "c": 3},
        name="ok",
        small_classes="replace",
        classes_per_batch=2,
        images_per_class=4,
    )
    assert run(ok)[0]["n_small_classes"] == 2
    assert C.read_table(ok.paths["batches"], C.BATCHES)[1]["unfilled"] is None


def test_test_classes_do_not_count(make_project, capsys):
    params, _ = setup(
        make_project, {"a": 4, "b": 4}, {"x": 10, "y": 10}, classes_per_batch=3, images_per_class=2
    )
    _unfillable(params, "only 2 train classes", capsys)


# --------------------------------------------------------------------------------------- edge cases


def test_zero_epochs_writes_empty_plan(make_project):
    params, labels = setup(make_project, EVEN, TEST, epochs=0)
    summary, batches, meta, triplets, tmeta = run(params)
    assert batches.num_rows == 0
    assert batches.schema.equals(C.BATCHES.schema(), check_metadata=False)
    assert meta["epochs"] == 0 and meta["batches_per_epoch"] == []
    assert summary["batches_per_epoch"] == []
    assert triplets.num_rows == len(labels)  # triplets do not depend on epochs
    assert tmeta == {"per_anchor": 1}


def test_missing_items_is_contract_error(make_project):
    params = load_params(make_project())
    with pytest.raises(C.ContractError, match="missing"):
        make_batches.run(params.make_batches, params.paths)


def test_batches_per_epoch_metadata(make_project):
    # one chunk per class and P=2 over 6 classes: always exactly 3 full batches per epoch
    params, _ = setup(
        make_project, {f"c{i}": 4 for i in range(6)}, classes_per_batch=2, images_per_class=4, epochs=3
    )
    _, batches, meta, _, _ = run(params)
    per_epoch = Counter(e for e, _ in grouped(batches))
    assert per_epoch == {0: 3, 1: 3, 2: 3} and meta["batches_per_epoch"] == [3, 3, 3]


# ----------------------------------------------------------------------------------------- triplets


@pytest.mark.parametrize("per_anchor", [0, 1, 3])
def test_triplets(make_project, per_anchor):
    params, labels = setup(
        make_project,
        SMALL_MIX,
        TEST,
        triplets_per_anchor=per_anchor,
        small_classes="replace",
        classes_per_batch=2,
        images_per_class=4,
    )
    summary, _, _, triplets, tmeta = run(params)
    usable = {i for i, l in labels.items() if l != "single"}
    assert triplets.num_rows == per_anchor * len(usable) == summary["n_triplets"]
    assert tmeta == {"per_anchor": per_anchor}
    anchors = triplets[C.ANCHOR].to_pylist()
    assert Counter(anchors) == ({i: per_anchor for i in usable} if per_anchor else Counter())
    for a, p, n in zip(anchors, triplets[C.POSITIVE].to_pylist(), triplets[C.NEGATIVE].to_pylist()):
        assert a != p
        assert labels[a] == labels[p]
        assert labels[n] != labels[a]
        assert n in usable and p in usable


def test_triplets_drop_mode_count(make_project):
    params, labels = setup(
        make_project,
        SMALL_MIX,
        triplets_per_anchor=2,
        small_classes="drop",
        classes_per_batch=2,
        images_per_class=4,
    )
    _, _, _, triplets, _ = run(params)
    big = [i for i, l in labels.items() if l.startswith("big")]
    assert triplets.num_rows == 2 * len(big)
    assert set(triplets[C.ANCHOR].to_pylist()) == set(big)


def test_on_ingested_digits(make_project):
    """End to end from a real ingest (digits): the plan only uses train items, P×K each."""
    from tasks import ingest

    path = make_project(
        {
            "ingest.source": {"kind": "digits"},
            "ingest.image_size": 4,
            "ingest.workers": 1,
            "ingest.test_fraction": 0.4,
            "make_batches.classes_per_batch": 4,
            "make_batches.images_per_class": 8,
            "make_batches.epochs": 1,
            "make_batches.small_classes": "drop",
            "make_batches.triplets_per_anchor": 1,
        }
    )
    params = load_params(path)
    ingest.run(params.ingest, params.paths)
    items, _ = C.read_table(params.paths["items"], C.ITEMS, columns=[C.ITEM_ID, C.LABEL, C.SPLIT])
    labels = {
        i: l
        for i, l, s in zip(*(items[c].to_pylist() for c in (C.ITEM_ID, C.LABEL, C.SPLIT)))
        if s == C.TRAIN
    }
    _, batches, _, triplets, _ = run(params)
    assert_pk(batches, labels, 4, 8)
    assert set(batches[C.ITEM_ID].to_pylist()) == set(labels)
    assert triplets.num_rows == len(labels)


@pytest.mark.parametrize("rotations", [[], [90, 180, 270]])
def test_validation_classes_take_their_rotated_copies_along(make_project, rotations):
    """With ingest.train_rotations, a validation class's rotated copies are validation classes
    too (none of its copies is trained on); without, the names are just labels."""
    params, _ = setup(make_project, {}, val_fraction=0.25)
    names = [f"c{i}" for i in range(12)]
    labels = [n for n in names for _ in range(4)] + [C.rotated(n, d) for d in rotations for n in names for _ in range(4)]
    table = C.items_table([f"i{j}" for j in range(len(labels))], labels, [C.TRAIN] * len(labels),
                          labels, np.zeros((len(labels), 1), np.uint8))
    C.write_table(table, params.paths["items"], C.ITEMS,
                  {"height": 1, "width": 1, "channels": 1, "params": {"train_rotations": rotations}})
    summary, batches, meta, _, _ = run(params)
    val = set(meta["validation_classes"])
    assert {C.unrotated(v) for v in val} and len({C.unrotated(v) for v in val}) == 3  # 25 % of 12 characters
    assert val == {C.rotated(n, d) if d else n for n in {C.unrotated(v) for v in val} for d in [0, *rotations]}
    trained = {labels[int(i[1:])] for i in batches[C.ITEM_ID].to_pylist()}
    assert trained == set(labels) - val


def test_unrotated_only_strips_a_rotation_mark():
    assert C.unrotated(C.rotated("alphabet/char@x", 270)) == "alphabet/char@x"
    assert [C.unrotated(s) for s in ("a@rot45", "a@rot", "a@rot90b", "a")] == ["a@rot45", "a@rot", "a@rot90b", "a"]


@pytest.mark.parametrize("rotations, warned", [([], True), ([90], False)])
def test_one_validation_class_is_warned_of_counting_classes_as_train_does(make_project, capsys, rotations, warned):
    """Validation Recall@1 within one class is always 1. A held-out character with rotated copies
    is several classes (train's early stopping counts them so): no warning then."""
    params, _ = setup(make_project, {}, val_fraction=0.1)
    names = [f"c{i}" for i in range(8)]  # round(8 × 0.1) = 1 character held out
    labels = [n for n in names for _ in range(4)] + [C.rotated(n, d) for d in rotations for n in names for _ in range(4)]
    table = C.items_table([f"i{j}" for j in range(len(labels))], labels, [C.TRAIN] * len(labels),
                          labels, np.zeros((len(labels), 1), np.uint8))
    C.write_table(table, params.paths["items"], C.ITEMS,
                  {"height": 1, "width": 1, "channels": 1, "params": {"train_rotations": rotations}})
    run(params)
    assert ("holds out 1 of" in capsys.readouterr().err) is warned
