"""Tests for tasks.sampling: plan_epoch's P×K batches, class_chunks and the label-free plan."""

from __future__ import annotations

from collections import Counter

import numpy as np

from tasks.sampling import class_chunks, plan_epoch, unlabelled_plan


def _classes(sizes: list[int]) -> list[np.ndarray]:
    out, start = [], 0
    for n in sizes:
        out.append(np.arange(start, start + n))
        start += n
    return out


def test_plan_epoch_random_configurations():
    rng_cfg = np.random.default_rng(2024)
    for trial in range(40):
        k = int(rng_cfg.integers(2, 6))
        n_classes = int(rng_cfg.integers(2, 9))
        p = int(rng_cfg.integers(2, n_classes + 1))
        # mostly >= K, sometimes smaller (the `replace` case), never below 2
        sizes = [int(s) for s in rng_cfg.integers(2, 4 * k, size=n_classes)]
        classes = _classes(sizes)
        owner = {int(i): c for c, m in enumerate(classes) for i in m}
        rng = np.random.default_rng(trial)
        batches = plan_epoch(classes, p, k, rng)
        chunks = sum(-(-n // k) for n in sizes)
        assert -(-chunks // p) <= len(batches) <= chunks, (sizes, p, k)
        seen = set()
        for batch in batches:
            assert batch.shape == (p * k,) and np.issubdtype(batch.dtype, np.integer)
            counts = Counter(owner[int(i)] for i in batch)
            assert len(counts) == p and set(counts.values()) == {k}, (sizes, p, k, counts)
            for c in counts:
                members = [int(i) for i in batch if owner[int(i)] == c]
                if sizes[c] >= k:  # enough images: no repeats inside a batch
                    assert len(set(members)) == k
            seen.update(int(i) for i in batch)
        assert seen == set(owner), (sizes, p, k)  # every image at least once this epoch


def test_plan_epoch_is_seeded():
    classes = _classes([5, 9, 4, 12, 7])
    a = plan_epoch(classes, 3, 4, np.random.default_rng(1))
    b = plan_epoch(classes, 3, 4, np.random.default_rng(1))
    c = plan_epoch(classes, 3, 4, np.random.default_rng(2))
    assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))
    assert len(a) != len(c) or not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_plan_epoch_exact_multiples_use_each_image_once():
    classes = _classes([8, 8, 8, 8])  # 2 chunks each, P=2 -> exactly 4 batches, no repeats
    batches = plan_epoch(classes, 2, 4, np.random.default_rng(0))
    assert len(batches) == 4
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(32))


def test_plan_epoch_fills_short_tail_with_other_classes():
    # one big class outlasts the rest: its last batches borrow fresh chunks of exhausted classes
    classes = _classes([40, 4, 4])
    for seed in range(5):
        batches = plan_epoch(classes, 2, 4, np.random.default_rng(seed))
        assert len(batches) >= 10  # the big class's 10 chunks each need a partner class
        big_per_batch = [sum(int(i) < 40 for i in b) for b in batches]
        assert set(big_per_batch) <= {0, 4} and big_per_batch.count(4) == 10
        small_uses = sum(int(i) >= 40 for b in batches for i in b)
        assert small_uses == 4 * (2 * len(batches) - 10) > 8  # small images appear again


def test_class_chunks_cover_and_top_up():
    rng = np.random.default_rng(0)
    members = np.arange(10, 20)
    chunks = class_chunks(members, 4, rng)
    assert [len(c) for c in chunks] == [4, 4, 4]
    assert set(np.concatenate(chunks).tolist()) == set(members.tolist())
    assert len(set(chunks[-1].tolist())) == 4  # topped up without replacement
    small = class_chunks(np.array([7, 8]), 5, rng)
    assert len(small) == 1 and len(small[0]) == 5 and set(small[0].tolist()) == {7, 8}


def test_unlabelled_plan_shuffles_every_row_at_most_once_per_epoch():
    rows = np.arange(100, 153)  # 53 rows: 5 batches of 10, 3 rows wait for another epoch
    plan = unlabelled_plan(rows, epochs=4, batch_size=10, seed=7)
    assert len(plan) == 4
    for epoch in plan:
        assert len(epoch) == 5 and all(b.shape == (10,) and b.dtype == np.int64 for b in epoch)
        drawn = np.concatenate(epoch)
        assert len(set(drawn.tolist())) == 50 and set(drawn.tolist()) <= set(rows.tolist())
    # Reshuffled every epoch, so the rows left out differ and every row trains over the epochs.
    assert len({tuple(np.concatenate(e)) for e in plan}) == 4
    assert set(np.concatenate([np.concatenate(e) for e in plan]).tolist()) == set(rows.tolist())
    again = unlabelled_plan(rows, epochs=4, batch_size=10, seed=7)
    assert all(np.array_equal(a, b) for e, f in zip(plan, again) for a, b in zip(e, f))
    other = unlabelled_plan(rows, epochs=4, batch_size=10, seed=8)
    assert not np.array_equal(plan[0][0], other[0][0])
    assert unlabelled_plan(rows, epochs=2, batch_size=60, seed=7) == [[], []]
