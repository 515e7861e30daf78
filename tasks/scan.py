"""Ingest's first pass: what the source holds, without keeping the images' bytes.

:func:`records` picks the reader for ``ingest.source``; :func:`first_pass` streams it and keeps,
per image, only where it is (so a decode worker can read it again), its label, split, protocol
flags and content hash — the bytes of a million files are never in memory together. Duplicates
(same content hash) are decided here, in source order: the first copy is kept.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterable
from pathlib import Path

from tqdm import tqdm

from tasks import contracts as C
from tasks import download, layouts, manifest, sources
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


def first_pass(p: IngestParams, root: Path) -> tuple[list[sources.Record], list[str], list[sources.Rejected]]:
    """(records without their bytes where they can be read again, content ids, rejected)."""
    kept, ids, rejected = [], [], []
    first_seen: dict[str, str] = {}
    labels: dict[str, str] = {}  # one str object per label: a million records share a few thousand
    bar = tqdm(desc="ingest: scan", unit="img", file=sys.stderr, disable=None)
    for rec in records(p, root):
        bar.update()
        if isinstance(rec, sources.Rejected):
            rejected.append(rec)
            continue
        item_id = rec.item_id
        if item_id in first_seen:
            rejected.append(sources.Rejected(rec.source, f"duplicate of {first_seen[item_id]}", "duplicate"))
            continue
        first_seen[item_id] = rec.source
        label = labels.setdefault(rec.label, rec.label)
        kept.append(dataclasses.replace(rec, label=label, data=b"" if rec.origin else rec.data))
        ids.append(item_id)
    bar.close()
    return kept, ids, rejected
