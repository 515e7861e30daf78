"""Manifest source: a CSV or Parquet table listing the images, one row each.

Columns ``path,label[,split][,is_query,is_gallery]`` (others are ignored). ``path`` is relative to
the manifest's directory and may not leave it (no ``..`` above it, no absolute path): a manifest
handed around must not read arbitrary files. A row that cannot be used — no path, no label, a path
outside the root, a missing file, an unknown split or flag — becomes a :class:`Rejected` with its
reason, never a crash and never a silent drop. An empty flag cell is false (train rows leave
them blank); a test row must be a query, a gallery item or both. The manifest itself being
unreadable, or lacking a required column, is a :class:`DatasetError`.
"""

from __future__ import annotations

import csv
import posixpath
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from tasks.errors import DatasetError
from tasks.sources import Record, Rejected, display, file_record

REQUIRED = ("path", "label")
FLAGS = ("is_query", "is_gallery")
_TRUE, _FALSE = {"true", "1", "yes", "t", "y"}, {"false", "0", "no", "f", "n", ""}
_BATCH_ROWS = 65_536  # Parquet rows read at a time: a million-row manifest is never all in memory


def _rows(path: Path) -> tuple[list[str], Iterator[tuple[int, dict[str, Any]]]]:
    """(column names, (where, row dict) pairs) streamed from a .csv or .parquet manifest; ``where``
    is the row as an editor finds it: a CSV's line (of the row's last line, should a quoted field
    span several; blank lines counted), a Parquet file's row number."""
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except Exception as err:  # pyarrow raises several types for a damaged file
            raise DatasetError(f"manifest {path}: not a readable Parquet file: {err}") from None
        return pf.schema_arrow.names, enumerate((r for b in pf.iter_batches(_BATCH_ROWS) for r in b.to_pylist()), start=1)
    def reader(handle) -> csv.DictReader:
        rd = csv.DictReader(handle)
        try:
            rd.fieldnames = [c.strip() for c in rd.fieldnames or []]
        except (UnicodeDecodeError, csv.Error) as err:
            raise DatasetError(f"manifest {path}: not a readable CSV file: {err}") from None
        return rd

    # -sig: spreadsheets write a BOM. The header is read here and the file closed; rows() opens it
    # again, so a caller that stops at the header (a missing column) leaves no file open.
    with open(path, newline="", encoding="utf-8-sig") as handle:
        columns = list(reader(handle).fieldnames)

    def rows() -> Iterator[tuple[int, dict[str, Any]]]:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            rd = reader(handle)
            try:
                for row in rd:
                    yield rd.line_num, row
            except (UnicodeDecodeError, csv.Error) as err:
                raise DatasetError(f"manifest {path}: line {rd.line_num}: {err}") from None

    return columns, rows()


def _flag(value: Any) -> bool | None:
    """True/False from a bool or a spelling of one; None if it is neither. A float column (1.0 /
    0.0, NaN where empty: pandas writes a flag column with gaps so) reads as its integers."""
    if isinstance(value, bool):
        return value
    text = _text(value).lower()
    return True if text in _TRUE else False if text in _FALSE else None


def _text(value: Any) -> str:
    """A cell as text: None and NaN (a float column's missing value, as numpy and polars write
    it) are empty; a whole float (a label column read as float because of a NaN) loses its .0."""
    if isinstance(value, float):
        return "" if value != value else str(int(value)) if value.is_integer() else str(value)
    return "" if value is None else str(value).strip()


def manifest(path: Path) -> Iterator[Record | Rejected]:
    """Records of the rows of ``path``, in row order; rows that cannot be used as Rejected."""
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} does not exist")
    columns, rows = _rows(path)
    missing = [c for c in REQUIRED if c not in columns]
    flags = [c for c in FLAGS if c in columns]
    if missing:
        raise DatasetError(f"manifest {path}: no column {missing} (has {columns})")
    if len(flags) == 1:
        raise DatasetError(f"manifest {path}: give both is_query and is_gallery, or neither")
    if flags and "split" not in columns:
        raise DatasetError(f"manifest {path}: is_query/is_gallery need a split column")
    root = path.parent
    for n, row in rows:  # n: the row's line (CSV) or number (Parquet), for the report
        rel = _text(row.get("path"))
        where = display(f"{path.name}:{n}:{rel}")
        if not rel:
            yield Rejected(where, "no path in this row", "bad row")
            continue
        norm = posixpath.normpath(rel.replace("\\", "/"))
        if PurePosixPath(norm).is_absolute() or norm == ".." or norm.startswith("../"):
            yield Rejected(where, "path escapes the manifest's directory", "outside root")
            continue
        label = _text(row.get("label"))
        if not label:
            yield Rejected(where, "no label", "no label")
            continue
        split = _text(row.get("split")).lower() if "split" in columns else None
        if split is not None and split not in ("train", "test"):
            yield Rejected(where, f"split {split!r} is neither train nor test", "bad row")
            continue
        query, gallery = (_flag(row.get(f)) for f in FLAGS) if flags else (None, None)
        if flags and (query is None or gallery is None):
            yield Rejected(where, f"is_query/is_gallery not true or false: {row.get(FLAGS[0])!r}, "
                           f"{row.get(FLAGS[1])!r}", "bad row")
            continue
        if flags and split == "train" and (query or gallery):
            yield Rejected(where, "a train item cannot be a query or gallery item", "bad row")
            continue
        if flags and split == "test" and not (query or gallery):
            yield Rejected(where, "a test item that is neither query nor gallery", "bad row")
            continue
        yield file_record(root / norm, display(norm), label, split, query, gallery)
