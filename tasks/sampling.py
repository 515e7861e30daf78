"""P×K batch plans and explicit triplets over classes' item indices (tasks.make_batches writes them),
and the label-free plan self-supervised training uses instead.

Pure numpy on index arrays, seeded by the generator given: no I/O, no labels, no ids until the
triplets' table.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from tasks import contracts as C


def class_chunks(members: np.ndarray, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle one class's item indices into K-sized chunks covering every item once.

    The last chunk is topped up from the class's other items (without replacement when it can be,
    which needs ≥ K items; smaller classes come here only under ``replace``).
    """
    order = rng.permutation(members)
    chunks = [order[i : i + k] for i in range(0, len(order), k)]
    short = k - len(chunks[-1])
    if short:
        pool = np.setdiff1d(members, chunks[-1])
        if len(pool) >= short:
            extra = rng.choice(pool, size=short, replace=False)
        else:
            extra = rng.choice(members, size=short, replace=True)
        chunks[-1] = np.concatenate([chunks[-1], extra])
    return chunks


def plan_epoch(classes: list[np.ndarray], p: int, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    """One epoch of batches, each an int array of P·K item indices from P distinct classes.

    Classes are drawn with probability proportional to their remaining chunks, so big classes do
    not all end up in the last batches. When fewer than P classes still have chunks, the batch is
    completed with fresh chunks of other classes (those images then appear twice this epoch).
    """
    queues = [class_chunks(m, k, rng) for m in classes]
    batches: list[np.ndarray] = []
    while True:
        left = np.array([len(q) for q in queues])
        live = np.flatnonzero(left)
        if len(live) == 0:
            return batches
        if len(live) >= p:
            chosen = rng.choice(live, size=p, replace=False, p=left[live] / left[live].sum())
            parts = [queues[c].pop() for c in chosen]
        else:
            parts = [queues[c].pop() for c in live]
            others = np.setdiff1d(np.arange(len(classes)), live)
            for c in rng.choice(others, size=p - len(live), replace=False):
                parts.append(class_chunks(classes[c], k, rng)[0])
        batches.append(np.concatenate(parts))


def unlabelled_plan(rows: np.ndarray, epochs: int, batch_size: int, seed: int) -> list[list[np.ndarray]]:
    """Self-supervised batches: each epoch a seeded permutation of ``rows`` cut into batches of
    ``batch_size`` (the remainder waits for the next epoch's shuffle, as SimCLR drops it) ->
    plan[epoch][batch] int64 (batch_size,).

    Two views of one image are the only positives there, so a P×K plan would be wrong three ways:
    the K − 1 other images of a class would be negatives in every batch, a class's size would
    decide whether its images train at all, and a padded small class would hold one image twice —
    a negative of itself. Here every image trains, at most once per epoch, beside random others.
    """
    rng = np.random.default_rng([seed, 2])
    n = len(rows) // batch_size * batch_size
    return [list(rng.permutation(rows)[:n].reshape(-1, batch_size).astype(np.int64)) for _ in range(epochs)]


def random_triplets(classes: list[np.ndarray], ids: np.ndarray, per_anchor: int, seed: int) -> pa.Table:
    """``per_anchor`` (anchor, positive, negative) per image: positive = another image of its
    class, negative = a random image of another class. Its own rng, so the plan's length
    (``epochs``) does not change the triplets."""
    rng = np.random.default_rng([seed, 1])
    everyone = np.concatenate(classes) if classes else np.empty(0, np.int64)
    starts = np.cumsum([0] + [len(m) for m in classes])
    anchors, positives, negatives = [], [], []
    for c, members in enumerate(classes):
        a = np.repeat(np.arange(len(members)), per_anchor)
        # A random *other* member: draw from n-1 slots and skip the anchor's own.
        p = rng.integers(0, len(members) - 1, size=len(a))
        p += p >= a
        # A random member of another class: draw from N-n slots and skip this class's block.
        n = rng.integers(0, len(everyone) - len(members), size=len(a))
        n += np.where(n >= starts[c], len(members), 0)
        anchors.append(members[a])
        positives.append(members[p])
        negatives.append(everyone[n])
    col = lambda xs: pa.array(ids[np.concatenate(xs)] if xs else [], pa.string())  # noqa: E731
    return pa.table(
        {C.ANCHOR: col(anchors), C.POSITIVE: col(positives), C.NEGATIVE: col(negatives)},
        schema=C.TRIPLETS.schema(),
    )
