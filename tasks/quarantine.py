"""Files ingest skips, and why: the reason for each (a decode failure's, or which row a duplicate
is a copy of), its category in the summary, and the ``paths.quarantine`` table that lists them —
nothing the source held is lost without a line saying so.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pyarrow as pa

from tasks import contracts as C
from tasks import sources
from tasks.errors import DatasetError


def duplicate(rec: sources.Record, kept: sources.Record) -> str:
    """Why ``rec`` is dropped for ``kept`` (the same bytes), with the labels when they disagree:
    one image under two labels is a labelling error the user will want to find."""
    why = "listed twice" if rec.source == kept.source else f"duplicate of {kept.source}"
    notes = [f"labelled {kept.label!r} there, {rec.label!r} here"] if rec.label != kept.label else []
    # A source's own protocol (a manifest's is_query / is_gallery): the kept row carries only its
    # own roles (it may be written already), so say which role of this copy evaluation loses.
    lost = [role for role, here, there in (("query", rec.query, kept.query), ("gallery item", rec.gallery, kept.gallery))
            if here and there is False]
    if lost:
        notes.append(f"a {' and a '.join(lost)} here, not there: evaluation has one {' and one '.join(lost)} fewer")
    return why + (f" ({'; '.join(notes)})" if notes else "")


def category(reason: str) -> str:
    """The summary's word for a decode failure (sources.decode and decoding.decode_chunk reasons)."""
    for start in ("too large", "unreadable", "missing", "empty"):
        if reason.startswith(start):
            return start
    return "corrupt"


def write(rejected: list[sources.Rejected], path: Path) -> None:
    """``path``: one row per skipped file (path, reason), written atomically and also when empty
    (a DVC output, and an empty report says nothing was lost)."""
    table = pa.table({C.PATH: [r.source for r in rejected], C.REASON: [r.reason for r in rejected]}, schema=C.QUARANTINE.schema())
    C.write_table(table, path, C.QUARANTINE)


def explained(err: DatasetError, rejected: list[sources.Rejected]) -> DatasetError:
    """``err`` saying which files were skipped, and why: "no usable image" alone leaves a user to
    guess whether every row was a missing file or a path outside the root."""
    if not rejected:
        return err
    examples = "; ".join(f"{r.source}: {r.reason}" for r in rejected[:5])
    return DatasetError(f"{err}; {len(rejected):,} files were skipped ({detail(rejected)}), e.g. {examples}")


def detail(rejected: list[sources.Rejected]) -> str:
    """"5 duplicate, 2 corrupt": the skipped files by category, most first."""
    return ", ".join(f"{n} {why}" for why, n in Counter(r.category for r in rejected).most_common())
