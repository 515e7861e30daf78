"""Tests for tasks.contracts: checked Parquet I/O against data contracts, and atomic writes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks import contracts as C
from tasks.contracts import ContractError


def items_table(n: int = 3, pixels: int = 4) -> pa.Table:
    flat = np.arange(n * pixels).astype(np.uint8).reshape(n, pixels)
    return pa.table(
        {
            C.ITEM_ID: [f"id{i}" for i in range(n)],
            C.LABEL: [str(i % 2) for i in range(n)],
            C.SPLIT: [C.TRAIN] * n,
            C.IS_QUERY: [False] * n,
            C.IS_GALLERY: [False] * n,
            C.SOURCE: [f"src/{i}.png" for i in range(n)],
            C.PIXELS: C.pixels_array(flat),
        },
        schema=C.ITEMS.schema({C.PIXELS: C.pixels_type(pixels)}),
    )


META = {"height": 2, "width": 2, "channels": 1, "params": {"nested": [1, 2]}, "note": "é"}


def _raw_write(table: pa.Table, path: Path, meta: dict | None = None) -> None:
    """Write Parquet around the contract checks (what a hand-edited or stale file looks like)."""
    if meta is not None:
        table = C.with_meta(table, meta)
    pq.write_table(table, path)


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


# ------------------------------------------------------------------------------------- round trip


def test_pixels_column_round_trips_through_slices_and_chunks():
    """Stages read pixels from slices (export in batches) and multi-chunk columns (Parquet row
    groups): the view must start at the slice, not at the buffer."""
    px = np.arange(5 * 6).astype(np.uint8).reshape(5, 6)
    col = C.pixels_array(px)
    assert np.array_equal(C.pixels_numpy(col), px)
    assert np.array_equal(C.pixels_numpy(col.slice(2, 2)), px[2:4])
    chunked = pa.chunked_array([col.slice(0, 1), col.slice(1, 4)])
    assert np.array_equal(C.pixels_numpy(chunked.slice(1, 3)), px[1:4])
    assert C.pixels_numpy(col.slice(5, 0)).shape == (0, 6)


def test_round_trip_with_metadata(tmp_path):
    path = tmp_path / "sub" / "items.parquet"  # parent created on write
    table = items_table()
    C.write_table(table, path, C.ITEMS, META)
    back, meta = C.read_table(path, C.ITEMS)
    assert back.equals(table)
    assert back.schema.field(C.PIXELS).type == pa.binary(4)
    assert np.array_equal(C.pixels_numpy(back[C.PIXELS]), np.arange(12).reshape(3, 4))
    assert meta == META
    assert C.read_meta(path, C.ITEMS) == META
    assert _leftovers(path.parent) == []


def test_read_selected_columns(tmp_path):
    path = tmp_path / "items.parquet"
    C.write_table(items_table(), path, C.ITEMS, META)
    back, meta = C.read_table(path, C.ITEMS, columns=[C.ITEM_ID, C.LABEL])
    assert back.column_names == [C.ITEM_ID, C.LABEL]
    assert back[C.ITEM_ID].to_pylist() == ["id0", "id1", "id2"]
    assert meta["channels"] == 1


def test_round_trip_without_required_meta_contracts(tmp_path):
    path = tmp_path / "q.parquet"
    table = pa.table({C.PATH: ["a/b.txt"], C.REASON: ["not an image"]}, schema=C.QUARANTINE.schema())
    C.write_table(table, path, C.QUARANTINE)
    back, meta = C.read_table(path, C.QUARANTINE)
    assert back.to_pydict() == {C.PATH: ["a/b.txt"], C.REASON: ["not an image"]}
    assert meta == {}


def test_empty_table_round_trip(tmp_path):
    path = tmp_path / "b.parquet"
    meta = {"classes_per_batch": 2, "images_per_class": 2, "epochs": 0, "small_classes": "drop"}
    C.write_table(C.BATCHES.schema().empty_table(), path, C.BATCHES, meta)
    back, got = C.read_table(path, C.BATCHES)
    assert back.num_rows == 0 and got == meta


def test_extra_columns_are_tolerated(tmp_path):
    path = tmp_path / "q.parquet"
    table = pa.table({C.PATH: ["p"], C.REASON: ["r"], "extra": [1]})
    C.write_table(table, path, C.QUARANTINE)
    back, _ = C.read_table(path, C.QUARANTINE)
    assert "extra" in back.column_names


def test_schema_needs_concrete_type_for_predicate_columns():
    with pytest.raises(TypeError, match="items.pixels"):
        C.ITEMS.schema()


# ------------------------------------------------------------------------------ contract violations


def test_missing_column_on_write(tmp_path):
    path = tmp_path / "items.parquet"
    with pytest.raises(ContractError, match=r"items has no column 'label'") as info:
        C.write_table(items_table().drop_columns([C.LABEL]), path, C.ITEMS, META)
    assert str(path) in str(info.value)
    assert not path.exists() and list(tmp_path.iterdir()) == []


def test_missing_column_on_read(tmp_path):
    path = tmp_path / "items.parquet"
    _raw_write(items_table().drop_columns([C.SPLIT]), path, META)
    with pytest.raises(ContractError, match=r"no column 'split'") as info:
        C.read_table(path, C.ITEMS)
    assert str(path) in str(info.value)
    with pytest.raises(ContractError, match=r"no column 'split'"):
        C.read_meta(path, C.ITEMS)


@pytest.mark.parametrize(
    "column, array, expected",
    [
        (C.LABEL, pa.array([0, 1, 0], pa.int64()), "items.label is int64, expected string"),
        (C.IS_QUERY, pa.array(["no", "no", "no"]), "items.is_query is string, expected bool"),
        # pixels must be *fixed-size* binary; the list<uint8> of earlier versions is stale
        (C.PIXELS, pa.array([b"ab", b"c", b"d"], pa.binary()), "fixed_size_binary"),
        (
            C.PIXELS,
            pa.FixedSizeListArray.from_arrays(pa.array(range(12), pa.uint8()), 4),
            "re-run ingest",
        ),
    ],
)
def test_wrong_column_type(tmp_path, column, array, expected):
    table = items_table()
    table = table.set_column(table.schema.get_field_index(column), column, array)
    path = tmp_path / "items.parquet"
    with pytest.raises(ContractError, match="expected") as info:
        C.write_table(table, path, C.ITEMS, META)
    assert expected in str(info.value)
    assert not path.exists()
    _raw_write(table, path, META)
    with pytest.raises(ContractError) as info:
        C.read_table(path, C.ITEMS)
    assert expected in str(info.value)


def test_wrong_contract_is_rejected(tmp_path):
    path = tmp_path / "q.parquet"
    C.write_table(pa.table({C.PATH: ["p"], C.REASON: ["r"]}), path, C.QUARANTINE)
    with pytest.raises(ContractError, match=r"batches has no column 'epoch'"):
        C.read_table(path, C.BATCHES)


@pytest.mark.parametrize("meta", [None, {}, {"height": 2, "width": 2}])
def test_missing_required_metadata(tmp_path, meta):
    path = tmp_path / "items.parquet"
    with pytest.raises(ContractError, match=r"metadata lacks .*channels"):
        C.write_table(items_table(), path, C.ITEMS, meta)
    assert not path.exists()
    _raw_write(items_table(), path, meta)
    with pytest.raises(ContractError, match=r"metadata lacks .*channels"):
        C.read_table(path, C.ITEMS)
    with pytest.raises(ContractError, match=r"metadata lacks"):
        C.read_meta(path, C.ITEMS)


def test_nulls_rejected_on_read(tmp_path):
    path = tmp_path / "q.parquet"
    _raw_write(pa.table({C.PATH: ["a", None], C.REASON: ["x", "y"]}), path)
    with pytest.raises(ContractError, match=r"quarantine has nulls in \['path'\]") as info:
        C.read_table(path, C.QUARANTINE)
    assert str(path) in str(info.value)


def test_nulls_in_unread_column_ignored(tmp_path):
    path = tmp_path / "q.parquet"
    _raw_write(pa.table({C.PATH: ["a", "b"], C.REASON: ["x", None]}), path)
    back, _ = C.read_table(path, C.QUARANTINE, columns=[C.PATH])
    assert back[C.PATH].to_pylist() == ["a", "b"]


def test_nulls_not_written_with_contract_schema(tmp_path):
    path = tmp_path / "q.parquet"
    table = pa.table({C.PATH: ["a", None], C.REASON: ["x", "y"]}, schema=C.QUARANTINE.schema())
    with pytest.raises(Exception):  # noqa: B017 - pyarrow refuses nulls in a non-nullable column
        C.write_table(table, path, C.QUARANTINE)
    assert list(tmp_path.iterdir()) == []


def test_write_refuses_what_read_rejects(tmp_path):
    path = tmp_path / "q.parquet"
    with pytest.raises(ContractError, match="nulls"):
        C.write_table(pa.table({C.PATH: ["a", None], C.REASON: ["x", "y"]}), path, C.QUARANTINE)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.parquet"
    with pytest.raises(ContractError, match="missing") as info:
        C.read_table(path, C.QUARANTINE)
    assert str(path) in str(info.value)
    with pytest.raises(ContractError, match="missing"):
        C.read_meta(path, C.QUARANTINE)


@pytest.mark.parametrize(
    "content", [b"", b"not parquet at all", b"PAR1garbagePAR1", json.dumps({"a": 1}).encode()]
)
def test_non_parquet_file(tmp_path, content):
    path = tmp_path / "items.parquet"
    path.write_bytes(content)
    with pytest.raises(ContractError, match="not a readable Parquet file") as info:
        C.read_table(path, C.ITEMS)
    assert str(path) in str(info.value)


def test_truncated_parquet_file(tmp_path):
    path = tmp_path / "items.parquet"
    C.write_table(items_table(), path, C.ITEMS, META)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ContractError, match="not a readable Parquet file"):
        C.read_table(path, C.ITEMS)


# -------------------------------------------------------------------------------------- atomicity


def test_atomic_path_exception_keeps_old_file(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with C.atomic_path(path) as tmp:
            assert tmp.parent == path.parent and tmp != path
            tmp.write_text("half-written")
            raise RuntimeError("boom")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_atomic_path_exception_without_old_file(tmp_path):
    path = tmp_path / "new" / "out.txt"
    with pytest.raises(KeyboardInterrupt):
        with C.atomic_path(path) as tmp:
            tmp.write_text("partial")
            raise KeyboardInterrupt
    assert not path.exists()
    assert list(path.parent.iterdir()) == []


def test_atomic_path_success_replaces(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    with C.atomic_path(path) as tmp:
        tmp.write_text("new")
        assert path.read_text() == "old"  # not visible before the block ends
    assert path.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_write_table_failure_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "items.parquet"
    C.write_table(items_table(2), path, C.ITEMS, META)
    before = path.read_bytes()

    def broken(table, where, **kwargs):
        Path(where).write_bytes(b"PAR1 partial")
        raise OSError("disk full")

    monkeypatch.setattr(C.pq, "write_table", broken)
    with pytest.raises(OSError, match="disk full"):
        C.write_table(items_table(5), path, C.ITEMS, META)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["items.parquet"]


def test_write_table_contract_failure_keeps_old_file(tmp_path):
    path = tmp_path / "items.parquet"
    C.write_table(items_table(2), path, C.ITEMS, META)
    before = path.read_bytes()
    with pytest.raises(ContractError):
        C.write_table(items_table(5), path, C.ITEMS, {"height": 2})
    assert path.read_bytes() == before
    assert C.read_table(path, C.ITEMS)[0].num_rows == 2


def test_write_table_overwrites(tmp_path):
    path = tmp_path / "items.parquet"
    C.write_table(items_table(2), path, C.ITEMS, META)
    C.write_table(items_table(5), path, C.ITEMS, {**META, "height": 3})
    back, meta = C.read_table(path, C.ITEMS)
    assert back.num_rows == 5 and meta["height"] == 3
    assert _leftovers(tmp_path) == []


def test_write_text_and_json(tmp_path):
    path = tmp_path / "a" / "m.json"
    C.write_json(path, {"b": 1, "a": [1.5]})
    assert path.read_text() == '{\n  "a": [\n    1.5\n  ],\n  "b": 1\n}\n'
    C.write_text(path, "x")
    assert path.read_text() == "x"
    assert os.listdir(path.parent) == ["m.json"]


def test_items_table_flags_default_and_explicit():
    import numpy as np

    px = np.zeros((3, 4), np.uint8)
    splits = [C.TRAIN, C.TEST, C.TEST]
    default = C.items_table(["a", "b", "c"], ["x", "y", "y"], splits, ["s"] * 3, px)
    assert default[C.IS_QUERY].to_pylist() == [False, True, True] == default[C.IS_GALLERY].to_pylist()
    given = C.items_table(["a", "b", "c"], ["x", "y", "y"], splits, ["s"] * 3, px, [False, True, False], [False, False, True])
    assert given[C.IS_QUERY].to_pylist() == [False, True, False]
    assert given[C.IS_GALLERY].to_pylist() == [False, False, True]


# ------------------------------------------------------------------------------- streamed writes


def test_stream_table_row_groups_and_late_metadata(tmp_path):
    path = tmp_path / "items.parquet"
    table = items_table(n=6)
    with C.stream_table(path, C.ITEMS, table.schema) as w:
        w.write(table.slice(0, 4))
        w.write(table.slice(4))
        w.finish({**META, "rows": w.rows})  # metadata that depends on every row written
    back, meta = C.read_table(path, C.ITEMS)
    assert back.equals(table) and meta == {**META, "rows": 6}
    assert pq.ParquetFile(path).metadata.num_row_groups == 2
    assert _leftovers(tmp_path) == []


def test_stream_table_refuses_bad_rows_and_leaves_no_file(tmp_path):
    path = tmp_path / "items.parquet"
    table = items_table()
    with pytest.raises(ContractError, match="no column 'label'"):
        with C.stream_table(path, C.ITEMS, table.drop_columns([C.LABEL]).schema):
            pass
    with pytest.raises(ContractError, match="do not fit"):
        with C.stream_table(path, C.ITEMS, table.schema) as w:
            w.write(items_table(pixels=8))
    with pytest.raises(ContractError, match="finish"):
        with C.stream_table(path, C.ITEMS, table.schema) as w:
            w.write(table)
    with pytest.raises(ContractError, match=r"metadata lacks \['channels'\]"):
        with C.stream_table(path, C.ITEMS, table.schema) as w:
            w.finish({"height": 2, "width": 2})
    with pytest.raises(KeyError):  # the stage failed mid-way: no half file for DVC
        with C.stream_table(path, C.ITEMS, table.schema) as w:
            w.write(table)
            raise KeyError("boom")
    assert not path.exists() and _leftovers(tmp_path) == []


def _embeddings(values: list[list[float | None]], dim: int) -> pa.Table:
    n = len(values)
    return C.with_meta(pa.table({
        C.ITEM_ID: [f"id{i}" for i in range(n)], C.LABEL: ["a"] * n, C.SPLIT: [C.TEST] * n,
        C.IS_QUERY: [True] * n, C.IS_GALLERY: [True] * n,
        C.EMBEDDING: pa.array(values, pa.list_(pa.float32(), len(values[0]))),
    }), {"dim": dim, "model_sha256": "x", "normalized": True})


def test_embeddings_of_another_length_than_dim_are_refused(tmp_path):
    """Rows of 4 values under dim 2 would reshape into twice as many vectors, silently."""
    path = tmp_path / "e.parquet"
    pq.write_table(_embeddings([[1, 0, 0, 0], [0, 1, 0, 0]], dim=2), path)
    with pytest.raises(ContractError, match="4 values per row, its metadata says dim 2"):
        C.read_embeddings(path)


def test_a_null_or_nan_inside_an_embedding_is_refused(tmp_path):
    path = tmp_path / "e.parquet"
    with pytest.raises(ContractError, match=r"embeddings has nulls in \['embedding'\]"):
        C.write_table(_embeddings([[1, 0], [None, 1]], dim=2), path, C.EMBEDDINGS)
    pq.write_table(_embeddings([[1, 0], [None, 1]], dim=2), path)
    with pytest.raises(ContractError, match=r"nulls in \['embedding'\]"):
        C.read_embeddings(path)
    pq.write_table(_embeddings([[1, 0], [0, 1], [float("nan"), 1]], dim=2), path)
    with pytest.raises(ContractError, match="1 embeddings hold NaN or Inf .first: item id2"):
        C.read_embeddings(path)
    pq.write_table(_embeddings([[1, 0], [0, 1]], dim=2), path)
    assert C.read_embeddings(path)[1].shape == (2, 2)
