"""Tests for tasks.manifest: CSV / Parquet manifests, relative paths, and every kind of bad row."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tasks.errors import DatasetError
from tasks.manifest import manifest
from tasks.sources import Record, Rejected, load


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (5, 5), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def images(root: Path, names: list[str]) -> None:
    for i, name in enumerate(names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(png(i))


def test_csv_paths_relative_to_the_manifest(tmp_path):
    data = tmp_path / "data"
    images(data, ["img/a.png", "img/b.png", "c.png"])
    path = write_csv(data / "list.csv", ["path", "label"], [["img/a.png", "cat"], ["img/b.png", 7], ["c.png", "dog"]])
    out = [load(r) for r in manifest(path)]  # listed unread; ingest's first pass reads them
    assert all(isinstance(r, Record) for r in out)
    assert [(r.source, r.label, r.split, r.query, r.gallery) for r in out] == [
        ("img/a.png", "cat", None, None, None),
        ("img/b.png", "7", None, None, None),
        ("c.png", "dog", None, None, None),
    ]
    assert out[0].data == (data / "img/a.png").read_bytes()


def test_bad_rows_are_rejected_with_a_reason(tmp_path):
    data = tmp_path / "data"
    images(data, ["ok.png", "sub/ok2.png"])
    (tmp_path / "outside.png").write_bytes(png(9))  # exists, but above the manifest's directory
    (data / "empty.png").write_bytes(b"")
    rows = [
        ["ok.png", "a", "train", "false", "false"],
        ["../outside.png", "a", "train", "", ""],
        ["sub/../../outside.png", "a", "train", "", ""],
        [str(tmp_path / "outside.png"), "a", "train", "", ""],
        ["sub/ok2.png", "", "test", "true", "true"],  # no label
        ["missing.png", "b", "test", "true", "false"],
        ["", "b", "test", "true", "true"],
        ["ok.png", "b", "validation", "true", "true"],
        ["ok.png", "b", "test", "maybe", "true"],
        ["ok.png", "b", "train", "true", "false"],  # a train query makes no sense
        ["ok.png", "b", "test", "false", "false"],  # a test item nobody uses
        ["empty.png", "b", "test", "true", "true"],
        ["sub/./ok2.png", "b", "test", "1", "0"],
    ]
    listed = manifest(write_csv(data / "m.csv", ["path", "label", "split", "is_query", "is_gallery"], rows))
    out = [load(r) if isinstance(r, Record) else r for r in listed]
    kinds = [r.kind if isinstance(r, Rejected) else "ok" for r in out]
    assert kinds == [
        "ok", "outside root", "outside root", "outside root", "no label", "missing", "bad row", "bad row",
        "bad row", "bad row", "bad row", "empty", "ok",
    ]
    assert out[1].source == "m.csv:3:../outside.png" and "escapes" in out[1].reason  # line 3: after the header
    assert out[-1].source == "sub/ok2.png" and (out[-1].query, out[-1].gallery) == (True, False)
    assert (out[0].split, out[0].query, out[0].gallery) == ("train", False, False)
    assert all(r.reason for r in out if isinstance(r, Rejected))


def test_parquet_manifest_with_typed_columns(tmp_path):
    images(tmp_path, ["a.png", "b.png", "c.png"])
    table = pa.table({
        "path": ["a.png", "b.png", "c.png"],
        "label": [1, 2, None],
        "split": ["test", "test", "test"],
        "is_query": [True, False, True],
        "is_gallery": [False, True, True],
        "extra": [0.5, 0.5, 0.5],  # other columns are ignored
    })
    pq.write_table(table, tmp_path / "m.parquet")
    out = list(manifest(tmp_path / "m.parquet"))
    assert [(r.label, r.query, r.gallery) for r in out[:2]] == [("1", True, False), ("2", False, True)]
    assert isinstance(out[2], Rejected) and out[2].kind == "no label"
    assert out[2].source == "m.parquet:3:c.png"  # a Parquet file has no header line: its row number


def test_float_flag_columns_with_nan_for_train_rows(tmp_path):
    """pandas stores a flag column with gaps as float: 1.0 / 0.0, NaN where a train row left it
    empty. Those read as true / false / empty (false), not as 'neither true nor false'."""
    images(tmp_path, ["a.png", "b.png", "c.png"])
    flags = {f: pa.array(np.array(v), from_pandas=False) for f, v in
             (("is_query", [1.0, 0.0, np.nan]), ("is_gallery", [1.0, 1.0, np.nan]))}
    pq.write_table(pa.table({"path": ["a.png", "b.png", "c.png"], "label": ["x", "x", "y"],
                             "split": ["test", "test", "train"], **flags}), tmp_path / "m.parquet")
    out = list(manifest(tmp_path / "m.parquet"))
    assert [(r.query, r.gallery, r.split) for r in out] == [(True, True, "test"), (False, True, "test"), (False, False, "train")]


def test_a_float_label_column_with_nan_values(tmp_path):
    """numpy and polars write a missing float as NaN, not null: that row has no label (not a class
    called 'nan'), and the others' labels read as written (1, not 1.0)."""
    images(tmp_path, ["a.png", "b.png", "c.png"])
    labels = pa.array(np.array([1.0, np.nan, 2.5]), from_pandas=False)  # NaN kept as a value
    assert labels.null_count == 0
    pq.write_table(pa.table({"path": ["a.png", "b.png", "c.png"], "label": labels}), tmp_path / "m.parquet")
    out = list(manifest(tmp_path / "m.parquet"))
    assert [r.label for r in out if isinstance(r, Record)] == ["1", "2.5"]
    assert [(r.source, r.kind) for r in out if isinstance(r, Rejected)] == [("m.parquet:2:b.png", "no label")]


@pytest.mark.parametrize(
    "header, match",
    [
        (["file", "label"], r"no column \['path'\]"),
        (["path", "label", "split", "is_query"], "both is_query and is_gallery"),
        (["path", "label", "is_query", "is_gallery"], "need a split column"),
    ],
)
def test_manifest_shape_errors(tmp_path, header, match):
    path = write_csv(tmp_path / "m.csv", header, [])
    with pytest.raises(DatasetError, match=match):
        list(manifest(path))


def test_unreadable_manifests(tmp_path):
    with pytest.raises(FileNotFoundError):
        list(manifest(tmp_path / "absent.csv"))
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(DatasetError, match="not a readable Parquet"):
        list(manifest(tmp_path / "bad.parquet"))
    (tmp_path / "latin1.csv").write_bytes("path,label\nx.png,caf\xe9\n".encode("latin-1"))
    with pytest.raises(DatasetError, match="latin1.csv"):
        list(manifest(tmp_path / "latin1.csv"))


def test_bom_and_spaces_in_header(tmp_path):
    images(tmp_path, ["a.png"])
    (tmp_path / "m.csv").write_bytes("\ufeffpath , label\na.png , x \n".encode("utf-8"))
    (rec,) = manifest(tmp_path / "m.csv")
    assert (rec.source, rec.label) == ("a.png", "x")


def test_a_rejected_csv_row_is_named_by_its_line_in_the_file(tmp_path):
    """Blank lines and a quoted field over two lines: the line an editor shows, not a row count."""
    images(tmp_path, ["a.png", "b\nc.png"])
    (tmp_path / "m.csv").write_text('path,label\na.png,x\n\n../out.png,y\n"b\nc.png",z\n../out2.png,w\n')
    rejected = [r for r in manifest(tmp_path / "m.csv") if isinstance(r, Rejected)]
    assert [r.source for r in rejected] == ["m.csv:4:../out.png", "m.csv:7:../out2.png"]
