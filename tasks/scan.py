"""Ingest's first pass: what the source holds, without reading or keeping the images' bytes.

:func:`records` picks the reader for ``ingest.source``; :func:`first_pass` streams it and keeps,
per image, only where it is (so a decode worker can read it), its label, split and protocol
flags — enough to decide the class split and the row order before any decoding starts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path

from tasks import contracts as C
from tasks import download, layouts, manifest, progress, sources
from tasks.params import IngestParams, Paths, source_path


def records(p: IngestParams, root: Path) -> Iterable[sources.Record | sources.Rejected]:
    """The configured source's items, lazily; ``root`` anchors its relative paths (those leading
    out of the project: :func:`tasks.params.source_path`). A layout's configured downloads are
    fetched (and checked) first."""
    src = p.source
    if src.kind == "digits":
        return sources.digits()
    if src.kind == "manifest":
        return manifest.manifest(source_path(root, src.path))
    if src.kind in layouts.READERS:
        download.ensure(src.downloads, source_path(root, src.root))
        return layouts.READERS[src.kind](source_path(root, src.root))
    if src.root is not None:
        return sources.image_folder(source_path(root, src.root), split=None)
    return (
        r
        for split, rel in ((C.TRAIN, src.train_root), (C.TEST, src.test_root))
        for r in sources.image_folder(source_path(root, rel), split=split)
    )


def outside_raw(p: IngestParams, paths: Paths) -> list[str]:
    """The source's files or folders that are not under ``paths.raw``: DVC, which watches only
    ``paths.raw``, would not re-run ingest when they change."""
    src = p.source.model_dump()
    named = [src[k] for k in ("root", "train_root", "test_root", "path") if src.get(k) is not None]
    raw = paths["raw"].resolve()
    return [n for n in named if not (Path(paths.root) / n).resolve().is_relative_to(raw)]


def first_pass(p: IngestParams, root: Path) -> tuple[list[sources.Record], list[str | None], list[sources.Rejected]]:
    """(records without their bytes where they can be read again, content ids, rejected).

    Lists the source, reading no file: a record that a decode worker can read again (a file, a
    zip member) gets its content id there, from the very bytes it decodes — each file is read
    once in the whole stage. Only images made in memory (digits, Fashion-MNIST) keep their bytes
    and get their id here."""
    kept: list[sources.Record] = []
    ids: list[str | None] = []
    rejected: list[sources.Rejected] = []
    bar = progress.bar("ingest: scan", "img")
    for n, rec in enumerate(records(p, root), 1):
        if n % 4096 == 0:  # a progress update costs as much as the rest of this loop
            bar.update(4096)
        if isinstance(rec, sources.Rejected):
            rejected.append(rec)
        elif rec.origin:
            kept.append(dataclasses.replace(rec, data=None) if rec.data else rec)
            ids.append(None)
        else:
            kept.append(rec)
            ids.append(rec.item_id)
    bar.update(len(kept) + len(rejected) - bar.n)
    bar.close()
    return kept, ids, rejected
