"""Stage 1 — ingest: images + labels from a source into one Parquet table of decoded pixels.

Output (``paths.items``, contract ``ITEMS``): item_id (content hash), label, split (train/test,
class-disjoint: test classes are never seen in training), is_query / is_gallery (the source's own
protocol, else leave-one-out on the test split), source, and pixels decoded once to
``image_size``² × ``channels`` uint8, so training and export never decode an image again. Files
that cannot be used are skipped and listed with their reason in ``paths.quarantine`` — never a
crash mid-stage, never a silently lost file. With ``train_rotations``, each train image is
copied turned by 90/180/270° as new classes (``<label>@rot<deg>``; rows after their chunk).

Two passes keep memory bounded whatever the dataset's size. Pass 1 (tasks/scan.py) lists the
source, reading no image, and keeps only metadata — where each image is, its label and split —
from which the class split (tasks/classes.py) and the row order are decided. Pass 2
(tasks/decoding.py) reads each file once, in that order, in chunks across cores: workers hash
(the content id) and decode the same bytes; this module drops duplicates (a content id already
written) and writes the table row group by row group.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa

from tasks import contracts as C
from tasks import classes, decoding, progress, quarantine, scan, sources
from tasks.errors import DatasetError
from tasks.params import IngestParams, Paths

__all__ = ["DatasetError", "run", "main"]

CHUNK = 512  # images per decode task: amortises inter-process traffic, small enough for a live bar
CHUNK_BYTES = 8 << 20  # ...and at most this many decoded bytes: each chunk in flight holds a slot
# of memory shared with the workers (4 per worker), so large images make smaller chunks
PARALLEL_MIN_IMAGES = 8192  # below this, decoding (~15k small images/s a core) beats starting workers
ROW_GROUP_BYTES = 16 << 20  # per Parquet row group: small enough that writing one overlaps decoding


def _tables(
    kept: list[sources.Record], ids: list[str | None], splits: list[str], order: list[int], p: IngestParams,
    rejected: list[sources.Rejected],
) -> Iterator[pa.Table]:
    """ITEMS tables of about ROW_GROUP_BYTES each, rows in ``order``; decode failures and
    duplicates (same content id as a row before them) -> ``rejected``."""
    per_chunk = max(1, min(CHUNK, CHUNK_BYTES // (p.image_size * p.image_size * p.channels)))
    chunks = [order[i : i + per_chunk] for i in range(0, len(order), per_chunk)]
    jobs = ([(kept[i].origin, kept[i].member, kept[i].data, ids[i]) for i in c] for c in chunks)
    workers = 1 if len(order) < PARALLEL_MIN_IMAGES else min(p.workers or os.cpu_count() or 1, len(chunks))
    bar = progress.bar("ingest: decode", "img", len(order))
    first: dict[str, int] = {}  # content id -> index in kept of the copy written
    buffered: list[pa.Table] = []
    for rows, (pixels, got, errors) in zip(chunks, decoding.decode_chunks(jobs, p.image_size, p.channels, workers, per_chunk)):
        good = []
        for j, (item_id, error) in enumerate(zip(got, errors)):
            rec = kept[rows[j]]
            if error is not None:
                rejected.append(sources.Rejected(rec.source, error, quarantine.category(error)))
            elif item_id in first:
                rejected.append(sources.Rejected(rec.source, quarantine.duplicate(rec, kept[first[item_id]]), "duplicate"))
            else:
                first[item_id] = rows[j]
                good.append(j)
        recs = [kept[rows[j]] for j in good]
        split = [splits[rows[j]] for j in good]
        buffered.append(C.items_table(
            [got[j] for j in good], [r.label for r in recs], split, [r.source for r in recs], pixels[good],
            # A source's own query/gallery protocol wins; otherwise test items are both (leave-one-out).
            [r.query if r.query is not None else s == C.TEST for r, s in zip(recs, split)],
            [r.gallery if r.gallery is not None else s == C.TEST for r, s in zip(recs, split)],
        ))
        if p.train_rotations:
            train = [j for j, s in zip(good, split) if s == C.TRAIN]  # none in a chunk of test rows
            buffered.append(classes.rotated_copies([got[j] for j in train], [kept[rows[j]] for j in train], pixels[train], p))
        bar.update(len(rows))
        if sum(t.nbytes for t in buffered) >= ROW_GROUP_BYTES:
            yield pa.concat_tables(buffered)
            buffered = []
    bar.close()
    if buffered:
        yield pa.concat_tables(buffered)


def run(params: IngestParams, paths: Paths) -> dict:
    """Read the source, split by class, decode, write ``paths.items`` and ``paths.quarantine``."""
    kept, ids, rejected = scan.first_pass(params, Path(paths.root))
    for name in scan.outside_raw(params, paths):
        print(f"ingest: warning: {name} is outside paths.raw ({paths.raw}): dvc repro will not see it change",
              file=sys.stderr)
    if not kept:
        raise quarantine.explained(DatasetError(f"no usable image in source {params.source.model_dump()}"), rejected)
    clash = next((r.label for r in kept if C.unrotated(r.label) != r.label), None) if params.train_rotations else None
    if clash is not None:
        raise DatasetError(f"label {clash!r} looks like a rotated copy's; with ingest.train_rotations, "
                           f"no source label may end in {C.ROTATED}90/180/270")
    splits = classes.split_by_class([r.label for r in kept], [r.split for r in kept], params)
    try:
        warning = classes.check_usable(Counter(zip(splits, (r.label for r in kept))))  # before hours of decoding; again after
    except DatasetError as err:
        raise quarantine.explained(err, rejected) from None
    # Rotated copies are more classes: with them, the warning waits for the decoded table.
    said = None if params.train_rotations else warning
    if said:
        print(f"ingest: warning: {said}", file=sys.stderr)
    # Deterministic row order whatever the file-system order: by split, label, then source path.
    # Known before decoding (content ids are not: workers hash what they decode), so rows stream
    # out as they are decoded; of duplicate files, the first in this order is kept.
    order = sorted(range(len(kept)), key=lambda i: (splits[i], kept[i].label, kept[i].source))
    width = params.image_size * params.image_size * params.channels
    counts: Counter = Counter()  # (split, label) -> images written
    with C.stream_table(paths["items"], C.ITEMS, C.ITEMS.schema({C.PIXELS: C.pixels_type(width)})) as w:
        for table in _tables(kept, ids, splits, order, params, rejected):
            counts.update(zip(table[C.SPLIT].to_pylist(), table[C.LABEL].to_pylist()))
            w.write(table)
        try:
            if not w.rows:
                raise DatasetError(f"no usable image in source {params.source.model_dump()}")
            after = classes.check_usable(counts)  # decode failures or duplicates may have emptied classes
        except DatasetError as err:  # no output is written
            raise quarantine.explained(err, rejected) from None
        if after and after != said:
            print(f"ingest: warning: {after}", file=sys.stderr)
        summary = classes.summary(counts, rejected, len(params.train_rotations))
        w.finish({
            "height": params.image_size,
            "width": params.image_size,
            "channels": params.channels,
            # Params that shape the data; `workers` does not, and must not make the file differ.
            "params": params.model_dump(exclude={"workers"}),
            "summary": summary,
        })
    quarantine.write(rejected, paths["quarantine"])
    print(f"ingest: {w.rows:,} ingested, {len(rejected):,} skipped" + (f": {quarantine.detail(rejected)}" if rejected else ""))
    return summary


def main(argv: list[str] | None = None) -> None:
    from tasks.cli import stage_main

    stage_main("ingest", run, argv)


if __name__ == "__main__":
    main()
