"""Stage 1 — ingest: images + labels from a source into one Parquet table of decoded pixels.

Output (``paths.items``, contract ``ITEMS``): item_id (content hash), label, split (train/test,
class-disjoint: test classes are never seen in training), is_query / is_gallery (leave-one-out on
the test split), source, and pixels decoded once to ``image_size``² × ``channels`` uint8, so
training and export never decode an image again. Files that cannot be used are skipped and listed
with their reason in ``paths.quarantine`` — never a crash mid-stage, never a silently lost file.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from tasks import contracts as C
from tasks import download, layouts, manifest, sources
from tasks.errors import DatasetError
from tasks.params import IngestParams, Paths

__all__ = ["DatasetError", "run", "main"]

_CHUNK = 512  # records per worker task: large enough to amortise pickling, small for a live bar
PARALLEL_MIN_IMAGES = 8192  # below this, decoding (~15k small images/s a core) beats starting workers


def _decode_chunk(args: tuple[list[bytes], int, int]) -> list[np.ndarray | str]:
    blobs, size, channels = args
    out: list[np.ndarray | str] = []
    for blob in blobs:
        try:
            out.append(sources.decode(blob, size, channels))
        except ValueError as err:
            out.append(str(err))
    return out


def _records(p: IngestParams, root: Path) -> Iterable[sources.Record | sources.Rejected]:
    src = p.source
    if src.kind == "digits":
        return sources.digits()
    if src.kind == "manifest":
        return manifest.manifest(root / src.path)
    if src.kind in layouts.READERS:
        download.ensure(src.downloads, root / src.root)
        return layouts.READERS[src.kind](root / src.root)
    if src.root is not None:
        return sources.image_folder(root / src.root, split=None)
    return (
        r
        for split, rel in ((C.TRAIN, src.train_root), (C.TEST, src.test_root))
        for r in sources.image_folder(root / rel, split=split)
    )


def _decode_all(records: list[sources.Record], p: IngestParams) -> list[np.ndarray | str]:
    """Decode across cores. Workers come from a fork server, not fork(): the caller may be a
    threaded process (a Prefect flow, torch), and forking one can deadlock. Small sources decode
    in-process: starting workers costs more than decoding a few thousand small images."""
    chunks = [
        ([r.data for r in records[i : i + _CHUNK]], p.image_size, p.channels)
        for i in range(0, len(records), _CHUNK)
    ]
    workers = min(p.workers or os.cpu_count() or 1, len(chunks))
    if len(records) < PARALLEL_MIN_IMAGES:
        workers = 1
    bar = tqdm(total=len(records), desc="ingest: decode", unit="img", file=sys.stderr, disable=None)
    results: list[np.ndarray | str] = []
    pool = None
    try:
        if workers <= 1:
            mapped = map(_decode_chunk, chunks)
        else:
            method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
            # ProcessPoolExecutor, unlike multiprocessing.Pool, fails (BrokenProcessPool) instead of
            # respawning workers forever when they cannot start.
            pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method))
            mapped = pool.map(_decode_chunk, chunks)
        for chunk in mapped:
            results.extend(chunk)
            bar.update(len(chunk))
    except BrokenProcessPool as err:
        raise RuntimeError(
            "ingest: decode workers could not start. Called from a script? Put the call under "
            "`if __name__ == '__main__':` (worker processes import the main module), or set ingest.workers: 1"
        ) from err
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return results


def _split_by_class(labels: list[str], splits: list[str | None], p: IngestParams) -> list[str]:
    """Keep a source's own split; otherwise send a seeded ``test_fraction`` of classes to test."""
    if all(s is not None for s in splits):
        return [s for s in splits if s is not None]
    classes = sorted(set(labels))
    rng = np.random.default_rng(p.seed)
    n_test = min(max(1, round(len(classes) * p.test_fraction)), len(classes) - 1)
    test = {classes[i] for i in rng.permutation(len(classes))[:n_test]}
    return [C.TEST if label in test else C.TRAIN for label in labels]


def _check_usable(labels: list[str], splits: list[str]) -> None:
    for name, wanted in ((C.TRAIN, 2), (C.TEST, 1)):
        counts = Counter(label for label, s in zip(labels, splits) if s == name)
        usable = [c for c, n in counts.items() if n >= 2]
        if len(counts) < 2 or len(usable) < wanted:
            raise DatasetError(
                f"{name} split has {len(counts)} classes, {len(usable)} with at least 2 images; "
                f"metric learning needs at least 2 classes and {wanted} with 2+ images"
            )


def run(params: IngestParams, paths: Paths) -> dict:
    """Read the source, decode, split by class, write ``paths.items`` and ``paths.quarantine``."""
    kept: list[sources.Record] = []
    rejected: list[sources.Rejected] = []
    first_seen: dict[str, str] = {}
    for rec in _records(params, Path(paths.root)):
        if isinstance(rec, sources.Rejected):
            rejected.append(rec)
        elif rec.item_id in first_seen:
            rejected.append(sources.Rejected(rec.source, f"duplicate of {first_seen[rec.item_id]}", "duplicate"))
        else:
            first_seen[rec.item_id] = rec.source
            kept.append(rec)
    decoded = _decode_all(kept, params)
    good = [(r, px) for r, px in zip(kept, decoded) if not isinstance(px, str)]
    rejected += [
        sources.Rejected(r.source, px, "too large" if px.startswith("too large") else "corrupt")
        for r, px in zip(kept, decoded)
        if isinstance(px, str)
    ]
    if not good:
        raise DatasetError(f"no usable image in source {params.source.model_dump()}")

    labels = [r.label for r, _ in good]
    splits = _split_by_class(labels, [r.split for r, _ in good], params)
    _check_usable(labels, splits)
    flat = np.stack([px for _, px in good]).reshape(len(good), -1)
    # A source's own query/gallery protocol wins; otherwise test items are both (leave-one-out).
    is_query = [r.query if r.query is not None else s == C.TEST for (r, _), s in zip(good, splits)]
    is_gallery = [r.gallery if r.gallery is not None else s == C.TEST for (r, _), s in zip(good, splits)]
    table = C.items_table(
        [r.item_id for r, _ in good], labels, splits, [r.source for r, _ in good], flat, is_query, is_gallery
    )
    # Deterministic row order whatever the file-system order: by split, label, then content id.
    table = table.sort_by([(C.SPLIT, "ascending"), (C.LABEL, "ascending"), (C.ITEM_ID, "ascending")])
    reasons = Counter(r.category for r in rejected)
    summary = {
        "ingested": len(good),
        "skipped": len(rejected),
        "skipped_by_reason": dict(reasons),
        "classes": {s: len({l for l, sp in zip(labels, splits) if sp == s}) for s in (C.TRAIN, C.TEST)},
        "images": dict(Counter(splits)),
        # Kept: a test singleton is a gallery distractor (and a query with no positive, which
        # evaluation must allow); in train, make_batches.small_classes decides.
        "single_image_classes": sum(1 for n in Counter(zip(labels, splits)).values() if n == 1),
    }
    meta = {
        "height": params.image_size,
        "width": params.image_size,
        "channels": params.channels,
        # Params that shape the data; `workers` does not, and must not make the file differ.
        "params": params.model_dump(exclude={"workers"}),
        "summary": summary,
    }
    C.write_table(table, paths["items"], C.ITEMS, meta)
    quarantine = pa.table(
        {C.PATH: [r.source for r in rejected], C.REASON: [r.reason for r in rejected]},
        schema=C.QUARANTINE.schema(),
    )
    C.write_table(quarantine, paths["quarantine"], C.QUARANTINE)
    detail = ", ".join(f"{n} {why}" for why, n in reasons.most_common())
    print(f"ingest: {len(good):,} ingested, {len(rejected):,} skipped" + (f": {detail}" if detail else ""))
    return summary


def main(argv: list[str] | None = None) -> None:
    from tasks.cli import stage_main

    stage_main("ingest", run, argv)


if __name__ == "__main__":
    main()
