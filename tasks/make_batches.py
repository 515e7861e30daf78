"""Stage 2 — make_batches: a seeded P×K batch plan (and explicit triplets) from the train labels.

Each batch holds P distinct classes × K images of each. Within an epoch every train image appears
once where possible: each class's images are shuffled and cut into K-sized chunks; the short last
chunk is topped up with other images of the same class. Classes with fewer than K images are
either sampled with replacement (``small_classes: replace``) or excluded (``drop``); the output's
metadata says which classes were treated so. Training reads this plan, so a batch composition is
versioned by DVC and identical between runs. The sampling itself is tasks/sampling.py.

Outputs: ``paths.batches`` (epoch, batch, item_id) and ``paths.triplets`` (anchor, positive,
negative item ids: ``triplets_per_anchor`` per train image, for losses that take fixed triplets).
"""

from __future__ import annotations

import sys

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tasks import contracts as C
from tasks.errors import DatasetError
from tasks.params import MakeBatchesParams, Paths
from tasks.sampling import plan_epoch, random_triplets


def run(params: MakeBatchesParams, paths: Paths) -> dict:
    """Plan ``epochs`` epochs of P×K batches over the train split; write batches and triplets."""
    items, meta = C.read_table(paths["items"], C.ITEMS, columns=[C.ITEM_ID, C.LABEL, C.SPLIT])
    train = items.filter(pc.equal(items[C.SPLIT], C.TRAIN))
    ids = np.asarray(train[C.ITEM_ID].to_pylist(), dtype=object)
    all_names, codes = np.unique(np.asarray(train[C.LABEL].to_pylist(), dtype=object), return_inverse=True)
    # Validation classes: drawn with their own rng, so val_fraction 0 leaves the plan unchanged.
    # Rotated copies (ingest.train_rotations) go with their class: training on a validation
    # character turned 90° would leak it into validation.
    rotated = bool(meta.get("params", {}).get("train_rotations"))
    groups, group_of = np.unique([C.unrotated(n) if rotated else n for n in all_names], return_inverse=True)
    n_val = round(len(groups) * params.val_fraction)
    held = np.random.default_rng([params.seed, 2]).choice(len(groups), size=n_val, replace=False)
    val = set(np.flatnonzero(np.isin(group_of, held)).tolist())
    if len(val) == 1:  # classes, as train counts them (a group with rotated copies is several)
        print(f"make_batches: warning: val_fraction {params.val_fraction} holds out 1 of {len(all_names)} train classes: "
              "validation Recall@1 within one class is always 1 (train's early stopping refuses it)", file=sys.stderr)
    kept = [c for c in range(len(all_names)) if c not in val]
    # Each class's rows, ascending: one stable sort, not a pass over the rows per class (O(N·C):
    # minutes for unlabelled images given one label each).
    by_class = np.split(np.argsort(codes, kind="stable"), np.cumsum(np.bincount(codes, minlength=len(all_names)))[:-1])
    members = [by_class[c] for c in kept]
    names = all_names[kept]
    p, k = params.classes_per_batch, params.images_per_class
    small = [str(names[c]) for c, m in enumerate(members) if len(m) < k]
    # A class with one image can never give a positive pair: always excluded.
    min_size = k if params.small_classes == "drop" else 2
    usable = [m for m in members if len(m) >= min_size]
    unfilled = None
    if len(usable) < p:
        unfilled = (f"make_batches.classes_per_batch={p} but only {len(usable)} train classes can fill "
                    f"{k} images each (small_classes={params.small_classes!r})")
        if not len(ids):
            raise DatasetError(f"{paths['items']} has no train item")
        # Not an error here: self-supervised training (which this stage cannot see) needs no labels
        # and takes only the plan's batch size and epochs. Supervised training refuses the plan.
        if params.epochs:  # an untrained baseline (epochs 0) needs no batch in either mode
            print(f"make_batches: warning: {unfilled}: the plan holds no batch. Supervised training will refuse "
                  "it (lower P or K); train.mode self_supervised needs none", file=sys.stderr)

    rng = np.random.default_rng(params.seed)
    epoch_col, batch_col, item_col, per_epoch = [], [], [], []
    for epoch in range(params.epochs if unfilled is None else 0):
        plan = plan_epoch(usable, p, k, rng)
        per_epoch.append(len(plan))
        for b, idx in enumerate(plan):
            epoch_col.append(np.full(len(idx), epoch, np.int32))
            batch_col.append(np.full(len(idx), b, np.int32))
            item_col.append(ids[idx])
    cat = (lambda xs, dt: np.concatenate(xs) if xs else np.empty(0, dt))
    batches = pa.table(
        {
            C.EPOCH: pa.array(cat(epoch_col, np.int32)),
            C.BATCH: pa.array(cat(batch_col, np.int32)),
            C.ITEM_ID: pa.array(cat(item_col, object), pa.string()),
        },
        schema=C.BATCHES.schema(),
    )
    meta = {
        "classes_per_batch": p,
        "images_per_class": k,
        "epochs": params.epochs,
        "small_classes": params.small_classes,
        "classes_smaller_than_k": small,
        "excluded_classes": [str(names[c]) for c, m in enumerate(members) if len(m) < min_size],
        "batches_per_epoch": per_epoch,
        "seed": params.seed,
        "triplets_per_anchor": params.triplets_per_anchor,
        "val_fraction": params.val_fraction,
        "validation_classes": sorted(str(all_names[c]) for c in val),
        "unfilled": unfilled,  # why the plan holds no batch (None: it holds them)
    }
    C.write_table(batches, paths["batches"], C.BATCHES, meta)

    triplets = random_triplets(usable if len(usable) >= 2 else [], ids, params.triplets_per_anchor, params.seed)
    C.write_table(triplets, paths["triplets"], C.TRIPLETS, {"per_anchor": params.triplets_per_anchor})
    lists = ("classes_smaller_than_k", "excluded_classes", "validation_classes")
    return {k_: v for k_, v in meta.items() if k_ not in lists} | {
        "n_validation_classes": len(val),
        "n_small_classes": len(small),
        "n_triplets": triplets.num_rows,
    }


def main(argv: list[str] | None = None) -> None:
    from tasks.cli import stage_main

    stage_main("make_batches", run, argv)


if __name__ == "__main__":
    main()
