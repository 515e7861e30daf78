"""Ingest's first pass: what the source holds, without keeping the images' bytes.

:func:`records` picks the reader for ``ingest.source``; :func:`first_pass` streams it and keeps,
per image, only where it is (so a decode worker can read it again), its label, split, protocol
flags and content hash — the bytes of a million files are never in memory together. Duplicates
(same content hash) are decided here, in source order: the first copy is kept.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path

from tqdm import tqdm

from tasks import contracts as C
from tasks import decoding, download, layouts, manifest, sources
from tasks.params import IngestParams, Paths


def records(p: IngestParams, root: Path) -> Iterable[sources.Record | sources.Rejected]:
    """The configured source's items, lazily; ``root`` anchors its relative paths. A layout's
    configured downloads are fetched (and checked) first."""
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


def outside_raw(p: IngestParams, paths: Paths) -> list[str]:
    """The source's files or folders that are not under ``paths.raw``: DVC, which watches only
    ``paths.raw``, would not re-run ingest when they change."""
    src = p.source.model_dump()
    named = [src[k] for k in ("root", "train_root", "test_root", "path") if src.get(k) is not None]
    raw = paths["raw"].resolve()
    return [n for n in named if not (Path(paths.root) / n).resolve().is_relative_to(raw)]


def first_pass(
    p: IngestParams, root: Path, serial_images: int = 8192, chunk: int = 512
) -> tuple[list[sources.Record], list[str], list[sources.Rejected]]:
    """(records without their bytes where they can be read again, content ids, rejected).

    Files are read and hashed in chunks of ``chunk`` on ``ingest.workers`` processes once more
    than ``serial_images`` were seen (below that, here: starting workers costs more); zip members
    and images made in memory are hashed here. Results are taken in source order, so the copy
    kept of a duplicate is the first one whatever the number of workers."""
    kept: list[sources.Record] = []
    ids: list[str] = []
    rejected: list[sources.Rejected] = []
    first_seen: dict[str, str] = {}
    queued: deque[list] = deque()  # the chunks whose file hashes are being computed, in order

    def tasks() -> Iterator[list[tuple[str, str]]]:
        items = iter(records(p, root))
        while batch := list(islice(items, chunk)):
            queued.append(batch)
            yield [(r.origin, r.source) for r in batch if isinstance(r, sources.Record) and r.data is None]

    # Digits and Fashion-MNIST make their images in memory: nothing for workers to read.
    workers = 1 if p.source.kind in ("digits", "fashion_mnist") else p.workers or os.cpu_count() or 1
    bar = tqdm(desc="ingest: scan", unit="img", file=sys.stderr, disable=None)
    for hashes in decoding.ordered_map(sources.hash_files, tasks(), workers, serial_first=serial_images // chunk):
        batch = queued.popleft()
        hashed = iter(hashes)
        for rec in batch:
            if isinstance(rec, sources.Rejected):
                rejected.append(rec)
                continue
            item_id = next(hashed) if rec.data is None else rec.item_id
            if isinstance(item_id, sources.Rejected):
                rejected.append(item_id)
            elif item_id in first_seen:
                rejected.append(sources.Rejected(rec.source, f"duplicate of {first_seen[item_id]}", "duplicate"))
            else:
                first_seen[item_id] = rec.source
                # Bytes that can be read again (a file, a zip member) are dropped; the decode
                # worker reads them. Only images made in memory keep theirs.
                kept.append(dataclasses.replace(rec, data=None) if rec.origin and rec.data else rec)
                ids.append(item_id)
        bar.update(len(batch))
    bar.close()
    return kept, ids, rejected
