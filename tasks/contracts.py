"""Data contracts: the column names and Arrow schemas of every artifact, and their checked I/O.

Every table a stage writes or reads goes through :func:`write_table` / :func:`read_table`, which
check it against its :class:`Contract` and raise :class:`ContractError` naming the file and the
column — a hand-edited or stale file fails loudly at the stage boundary, not as a shape error deep
inside training. Writes are atomic (temporary file in the same directory + ``os.replace``), so an
interrupted stage never leaves a half-written file for DVC to cache.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

import numpy as np

from tasks.errors import ContractError  # noqa: E402  (re-exported: readers catch it from here)

META_KEY = b"tripletflow"
_UMASK = os.umask(0)
os.umask(_UMASK)  # read once: the process umask, restored immediately

# Column names, spelled once.
ITEM_ID, LABEL, SPLIT, IS_QUERY, IS_GALLERY, SOURCE, PIXELS = (
    "item_id", "label", "split", "is_query", "is_gallery", "source", "pixels",
)
EPOCH, BATCH = "epoch", "batch"
ANCHOR, POSITIVE, NEGATIVE = "anchor", "positive", "negative"
EMBEDDING, POSITION, PATH, REASON = "embedding", "position", "path", "reason"
TRAIN, TEST = "train", "test"
# ingest.train_rotations: a rotated copy's id, label and source are the original's + this + degrees.
ROTATED = "@rot"


def rotated(name: str, degrees: int) -> str:
    """The id, label or source of ``name``'s copy rotated by ``degrees`` (``a`` -> ``a@rot90``)."""
    return f"{name}{ROTATED}{degrees}"


def unrotated(label: str) -> str:
    """The label a rotated copy's label came from (``a@rot90`` -> ``a``); others unchanged."""
    base, mark, degrees = label.rpartition(ROTATED)
    return base if mark and degrees in ("90", "180", "270") else label


def _fixed_list_of(value_type: pa.DataType) -> Callable[[pa.DataType], bool]:
    def check(t: pa.DataType) -> bool:
        return pa.types.is_fixed_size_list(t) and t.value_type == value_type

    check.__doc__ = f"fixed_size_list<{value_type}>"
    return check


def _fixed_binary(t: pa.DataType) -> bool:
    """fixed_size_binary (H·W·C bytes; a file with another type is stale: re-run ingest)"""
    # The docstring is the contract error's "expected ...". The type before this one,
    # fixed_size_list<uint8>, made Parquet write a repetition level per byte: 17× slower to
    # write and 9× slower to read than one value per row.
    return pa.types.is_fixed_size_binary(t)

TypeSpec = pa.DataType | Callable[[pa.DataType], bool]


@dataclass(frozen=True)
class Contract:
    """Name, ordered columns (type or predicate) and the metadata keys a file must carry."""

    name: str
    columns: tuple[tuple[str, TypeSpec], ...]
    required_meta: tuple[str, ...] = ()

    def schema(self, overrides: dict[str, pa.DataType] | None = None) -> pa.Schema:
        """The Arrow schema; predicate columns need a concrete type in ``overrides``."""
        overrides = overrides or {}
        fields = []
        for name, spec in self.columns:
            t = overrides.get(name, spec)
            if not isinstance(t, pa.DataType):
                raise TypeError(f"{self.name}.{name} needs a concrete type")
            fields.append(pa.field(name, t, nullable=False))
        return pa.schema(fields)

    def check(self, schema: pa.Schema, where: str, want_meta: bool = True) -> dict[str, Any]:
        """Raise ContractError unless ``schema`` fits (its columns, and unless ``want_meta`` is False
        the required metadata keys); return the decoded metadata."""
        for name, spec in self.columns:
            idx = schema.get_field_index(name)
            if idx < 0:
                raise ContractError(f"{where}: {self.name} has no column {name!r}")
            t = schema.field(idx).type
            ok = spec(t) if callable(spec) and not isinstance(spec, pa.DataType) else t == spec
            if not ok:
                want = spec.__doc__ if callable(spec) and not isinstance(spec, pa.DataType) else spec
                raise ContractError(f"{where}: {self.name}.{name} is {t}, expected {want}")
        raw = (schema.metadata or {}).get(META_KEY)
        meta = json.loads(raw) if raw else {}
        missing = [k for k in self.required_meta if k not in meta]
        if missing and want_meta:
            raise ContractError(f"{where}: {self.name} metadata lacks {missing}")
        return meta


ITEMS = Contract(
    "items",
    (
        (ITEM_ID, pa.string()),
        (LABEL, pa.string()),
        (SPLIT, pa.string()),
        (IS_QUERY, pa.bool_()),
        (IS_GALLERY, pa.bool_()),
        (SOURCE, pa.string()),
        (PIXELS, _fixed_binary),  # H*W*C bytes, row-major HWC
    ),
    required_meta=("height", "width", "channels"),
)


def items_table(
    item_ids: list[str],
    labels: list[str],
    splits: list[str],
    sources: list[str],
    pixels: np.ndarray,
    is_query: list[bool] | None = None,
    is_gallery: list[bool] | None = None,
) -> pa.Table:
    """Build an ITEMS table; pixels (N, H·W·C) uint8.

    Without ``is_query`` / ``is_gallery`` every test item is both a query and a gallery item
    (leave-one-out), the protocol of sources without their own; train items are neither.
    """
    is_test = [s == TEST for s in splits]
    width = pixels.shape[1]
    return pa.table(
        {
            ITEM_ID: item_ids,
            LABEL: labels,
            SPLIT: splits,
            IS_QUERY: pa.array(is_test if is_query is None else is_query, pa.bool_()),
            IS_GALLERY: pa.array(is_test if is_gallery is None else is_gallery, pa.bool_()),
            SOURCE: sources,
            PIXELS: pixels_array(pixels),
        },
        schema=ITEMS.schema({PIXELS: pixels_type(width)}),
    )


def pixels_type(width: int) -> pa.DataType:
    """The ITEMS pixel column's type for images of ``width`` = H·W·C bytes."""
    return pa.binary(width)


def pixels_array(pixels: np.ndarray) -> pa.FixedSizeBinaryArray:
    """(N, H·W·C) uint8 -> the ITEMS pixel column (one fixed-size value per row, no copy)."""
    pixels = np.ascontiguousarray(pixels, np.uint8)
    n, width = pixels.shape
    return pa.FixedSizeBinaryArray.from_buffers(pixels_type(width), n, [None, pa.py_buffer(pixels)])


def pixels_numpy(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """The ITEMS pixel column -> (N, H·W·C) uint8, a read-only view where it is one chunk."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    width = arr.type.byte_width
    flat = np.frombuffer(arr.buffers()[1], np.uint8) if len(arr) else np.zeros(0, np.uint8)
    return flat[arr.offset * width : (arr.offset + len(arr)) * width].reshape(len(arr), width)


QUARANTINE = Contract("quarantine", ((PATH, pa.string()), (REASON, pa.string())))
BATCHES = Contract(
    "batches",
    ((EPOCH, pa.int32()), (BATCH, pa.int32()), (ITEM_ID, pa.string())),
    required_meta=("classes_per_batch", "images_per_class", "epochs", "small_classes"),
)
TRIPLETS = Contract("triplets", ((ANCHOR, pa.string()), (POSITIVE, pa.string()), (NEGATIVE, pa.string())))
EMBEDDINGS = Contract(
    "embeddings",
    (
        (ITEM_ID, pa.string()),
        (LABEL, pa.string()),
        (SPLIT, pa.string()),
        (IS_QUERY, pa.bool_()),
        (IS_GALLERY, pa.bool_()),
        (EMBEDDING, _fixed_list_of(pa.float32())),
    ),
    required_meta=("dim", "model_sha256", "normalized"),
)
INDEX_IDS = Contract(
    "index_ids",
    ((POSITION, pa.int64()), (ITEM_ID, pa.string()), (LABEL, pa.string())),
    required_meta=("factory", "metric", "model_sha256"),
)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp creates 0600; give the file the permissions any other new file would get.
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes, read in blocks. ``sha256`` names models and downloads; ``md5``
    is the hash DVC keys its cache by (provenance tags name DVC's copy of a data file)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def with_meta(table: pa.Table, meta: dict[str, Any]) -> pa.Table:
    return table.replace_schema_metadata({META_KEY: _meta_bytes(meta)})


def write_table(table: pa.Table, path: Path, contract: Contract, meta: dict[str, Any] | None = None) -> None:
    """Check ``table`` against ``contract`` and write it to ``path`` atomically as Parquet."""
    if meta is not None:
        table = with_meta(table, meta)
    contract.check(table.schema, f"writing {path}")
    _check_no_nulls(table, f"writing {path}", contract)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


class StreamWriter:
    """Rows of one contract file written row group by row group (see :func:`stream_table`)."""

    def __init__(self, writer: pq.ParquetWriter, schema: pa.Schema, contract: Contract, where: str):
        self._writer, self.schema, self._contract, self._where = writer, schema, contract, where
        self.meta: dict[str, Any] | None = None
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        """Append ``table`` (same columns and types as the stream) as one or more row groups."""
        if not table.schema.equals(self.schema, check_metadata=False):
            raise ContractError(f"{self._where}: rows with schema {table.schema} do not fit {self.schema}")
        _check_no_nulls(table, self._where, self._contract)
        self._writer.write_table(table.replace_schema_metadata(None))
        self.rows += table.num_rows

    def finish(self, meta: dict[str, Any]) -> None:
        """Set the file's metadata, known only once every row is written (counts, summaries)."""
        self._contract.check(with_meta(self.schema.empty_table(), meta).schema, self._where)
        self.meta = meta


@contextmanager
def stream_table(path: Path, contract: Contract, schema: pa.Schema) -> Iterator[StreamWriter]:
    """Write a contract file in row groups, without holding it in memory, atomically: the file
    appears only if the block ends without error and :meth:`StreamWriter.finish` was called.

    Parquet keeps the Arrow schema (and our metadata in it) in the footer, written at close; the
    metadata is set there, so it may depend on every row written."""
    where = f"writing {path}"
    contract.check(schema, where, want_meta=False)  # the metadata is checked by finish()
    with atomic_path(path) as tmp:
        writer = pq.ParquetWriter(tmp, schema.remove_metadata(), compression="zstd")
        stream = StreamWriter(writer, schema.remove_metadata(), contract, where)
        try:
            yield stream
            if stream.meta is None:
                raise ContractError(f"{where}: finish(meta) was not called")
            final = stream.schema.with_metadata({META_KEY: _meta_bytes(stream.meta)})
            writer.add_key_value_metadata({
                "ARROW:schema": base64.b64encode(final.serialize().to_pybytes()).decode(),
                META_KEY.decode(): _meta_bytes(stream.meta).decode(),
            })
        finally:
            writer.close()


def _meta_bytes(meta: dict[str, Any]) -> bytes:
    return json.dumps(meta, sort_keys=True).encode()


def read_meta(path: Path, contract: Contract) -> dict[str, Any]:
    """Metadata of a contract file, checked, without reading its rows."""
    return contract.check(_schema(path), str(path))


def _schema(path: Path) -> pa.Schema:
    if not path.exists():
        raise ContractError(f"{path}: missing (has the stage that writes it run?)")
    try:
        return pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise ContractError(f"{path}: not a readable Parquet file: {err}") from None


def read_table(path: Path, contract: Contract, columns: list[str] | None = None) -> tuple[pa.Table, dict[str, Any]]:
    """Read a contract file (optionally only some columns); return the table and its metadata."""
    meta = contract.check(_schema(path), str(path))
    table = pq.read_table(path, columns=columns)
    _check_no_nulls(table, str(path), contract)
    return table, meta


def _check_no_nulls(table: pa.Table, where: str, contract: Contract) -> None:
    # A list column's values too: a null float inside an embedding is no null row.
    nulls = [c for c in table.column_names if table.column(c).null_count or (
        pa.types.is_fixed_size_list(table.column(c).type) and any(ch.flatten().null_count for ch in table.column(c).chunks))]
    if nulls:
        raise ContractError(f"{where}: {contract.name} has nulls in {nulls}")


def read_embeddings(path: Path) -> tuple[pa.Table, np.ndarray, dict]:
    """-> (table without the vectors, float32 (N, dim) C-contiguous, metadata). Raises
    ContractError for vectors of another length than ``dim`` or with NaN/Inf values."""
    table, meta = read_table(path, EMBEDDINGS)
    col = table[EMBEDDING].combine_chunks()
    if col.type.list_size != meta["dim"]:  # else N rows would reshape into other N·size/dim vectors
        raise ContractError(f"{path}: embeddings hold {col.type.list_size} values per row, its metadata says dim {meta['dim']}")
    vectors = np.ascontiguousarray(col.flatten().to_numpy().reshape(-1, meta["dim"]), dtype=np.float32)
    bad = ~np.isfinite(vectors).all(axis=1)
    if bad.any():
        raise ContractError(f"{path}: {int(bad.sum()):,} embeddings hold NaN or Inf (first: item "
                            f"{table[ITEM_ID][int(np.argmax(bad))]}); re-export them from a sound model")
    return table.drop_columns([EMBEDDING]), vectors, meta
