"""Which classes an ingested dataset has and where they go (tasks.ingest's class decisions).

- :func:`split_by_class`: class-disjoint train/test split — a test class is never seen in training;
- :func:`shared_labels`: the classes a split puts on both sides;
- :func:`check_usable`: whether the splits can be trained on and scored at all;
- :func:`rotated_copies`: train images turned by 90/180/270° as new classes;
- :func:`summary`: the figures ingest reports (and stores in the table's metadata).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable

import numpy as np
import pyarrow as pa

from tasks import contracts as C
from tasks import sources
from tasks.errors import DatasetError
from tasks.params import IngestParams


def split_by_class(labels: list[str], splits: list[str | None], p: IngestParams) -> list[str]:
    """Keep a source's own split; otherwise send a seeded ``test_fraction`` of classes to test
    (at least one class to each side).

    A source's split that puts a class on both sides (a manifest's ``split`` column, train_root and
    test_root holding the same class folder) is a DatasetError unless ``p.shared_classes`` is
    ``allow``: the test metrics would measure classes seen in training, not the open set."""
    if all(s is not None for s in splits):
        given = [s for s in splits if s is not None]
        shared = sorted(shared_labels(zip(given, labels)))
        if shared and p.shared_classes == "error":
            raise DatasetError(
                f"the source's split puts {len(shared):,} classes in both train and test "
                f"(e.g. {', '.join(map(repr, shared[:5]))}): test classes must be unseen in training. "
                "Give each class one split, or drop the split (ingest then splits by class), or set "
                "ingest.shared_classes: allow to evaluate on classes seen in training"
            )
        return given
    classes = set(labels)
    n_test = min(max(1, round(len(classes) * p.test_fraction)), len(classes) - 1)
    # Classes ranked by a seeded hash of their own name, the first n_test to test: a class keeps
    # its rank when others come or go, so a new drop with one class more moves at most one old
    # class across (a seeded permutation of the sorted list reshuffled them all: a model of drop 2
    # would have trained on drop 1's test classes, and the two drops' metrics meant other things).
    ranked = sorted(classes, key=lambda c: hashlib.blake2b(f"{p.seed}\0{c}".encode(), digest_size=8).digest())
    test = set(ranked[:n_test])
    return [C.TEST if label in test else C.TRAIN for label in labels]


def shared_labels(pairs: Iterable[tuple[str, str]]) -> set[str]:
    """Labels of the (split, label) ``pairs`` that occur in both train and test."""
    sides: dict[str, set[str]] = {C.TRAIN: set(), C.TEST: set()}
    for split, label in pairs:
        sides.setdefault(split, set()).add(label)
    return sides[C.TRAIN] & sides[C.TEST]


def check_usable(counts: Counter) -> str | None:
    """``counts``: (split, label) -> images. Raise DatasetError unless the test split can be scored
    (2 classes, one with 2+ images: a query with a positive and a negative) and train has images.
    -> a warning when supervised training cannot use the train split (it needs 2 classes with 2+
    images): unlabelled train images — one label for all, or one each — are for
    ``train.mode: self_supervised``, which needs no labels (make_batches and train say so again)."""
    for name, wanted in ((C.TEST, 1), (C.TRAIN, 2)):  # test first: its problems are errors
        sizes = [n for (s, _), n in counts.items() if s == name]
        usable = sum(1 for n in sizes if n >= 2)
        if name == C.TRAIN and not sizes:
            raise DatasetError("train split has no image: nothing to train on")
        if len(sizes) < 2 or usable < wanted:
            problem = (f"{name} split has {len(sizes)} class{'es' * (len(sizes) != 1)}, {usable} with at least 2 images; "
                       f"metric learning needs at least 2 classes and {wanted} with 2+ images")
            if name == C.TEST:
                raise DatasetError(problem)
            return f"{problem}: only train.mode self_supervised can train on it (it needs no labels)"
    return None


def rotated_copies(ids: list[str], recs: list[sources.Record], pixels: np.ndarray, p: IngestParams) -> pa.Table:
    """Train images (pixels (N, H·W·C)) rotated counter-clockwise by each of ``p.train_rotations``
    degrees, each angle of each class a new class: a character turned 90° is another character to
    tell apart (Vinyals et al. 2016, Santoro et al. 2016), which 4× the classes training sees.
    Rows: per angle, the N copies in the originals' order; neither queries nor gallery items."""
    images = pixels.reshape(len(ids), p.image_size, p.image_size, p.channels)
    copies = [np.rot90(images, deg // 90, axes=(1, 2)).reshape(pixels.shape) for deg in p.train_rotations]
    return C.items_table(
        [C.rotated(i, deg) for deg in p.train_rotations for i in ids],
        [C.rotated(r.label, deg) for deg in p.train_rotations for r in recs],
        [C.TRAIN] * (len(ids) * len(p.train_rotations)),
        [C.rotated(r.source, deg) for deg in p.train_rotations for r in recs],
        np.concatenate(copies),  # called only with train_rotations set: never empty
    )


def summary(counts: Counter, rejected: list[sources.Rejected], rotations: int) -> dict:
    """``counts``: (split, label) -> images written; ``rotations``: angles per train image."""
    return {
        "ingested": sum(counts.values()),
        "skipped": len(rejected),
        "skipped_by_reason": dict(Counter(r.category for r in rejected)),
        "classes": {s: sum(1 for sp, _ in counts if sp == s) for s in (C.TRAIN, C.TEST)},
        "images": {s: sum(n for (sp, _), n in counts.items() if sp == s) for s in (C.TRAIN, C.TEST)},
        # Kept: a test singleton is a gallery distractor (and a query with no positive, which
        # evaluation must allow); in train, make_batches.small_classes decides.
        "single_image_classes": sum(1 for n in counts.values() if n == 1),
        # Non-zero only with ingest.shared_classes: allow (test metrics then include seen classes).
        "classes_in_both_splits": len(shared_labels(counts)),
        # Included in the train counts above: each train image has one copy per angle.
        "rotated_copies": sum(n for (s, _), n in counts.items() if s == C.TRAIN) * rotations // (rotations + 1),
    }
