"""Tests for tasks.scan: the first pass lists the source without reading it; sources outside paths.raw."""

from __future__ import annotations

from pathlib import Path

from tasks import scan
from tasks.params import load_params
from test_ingest import SMALL, folder_project, write_tree


def test_first_pass_reads_no_file_and_keeps_no_bytes_it_can_read_again(make_project, monkeypatch):
    path = folder_project(make_project, {"root": "imgs"})
    write_tree(path.parent / "imgs", {f"c{i}": 2 for i in range(3)})
    params = load_params(path)
    real_open = open

    def no_image_reads(file, *args, **kwargs):
        assert not str(file).endswith(".png"), f"first pass read {file}"
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", no_image_reads)
    kept, ids, rejected = scan.first_pass(params.ingest, Path(params.paths.root))
    monkeypatch.undo()
    assert len(kept) == len(ids) == 6 and rejected == []
    assert ids == [None] * 6  # the decode worker hashes the bytes it decodes
    assert all(r.data is None and r.origin and Path(r.origin).is_file() for r in kept)
    digits, digit_ids, _ = scan.first_pass(load_params(make_project(SMALL, name="d")).ingest, path.parent)
    assert all(r.data and r.origin is None for r in digits)  # made in memory: the bytes stay
    assert digit_ids == [r.item_id for r in digits]


def test_outside_raw(make_project):
    path = folder_project(make_project, {"root": "imgs"})
    params = load_params(path)
    assert scan.outside_raw(params.ingest, params.paths) == ["imgs"]
    inside = load_params(path, {"paths.raw": "."})
    assert scan.outside_raw(inside.ingest, inside.paths) == []
    split = load_params(path, {"ingest.source": {"kind": "image_folder", "train_root": "data/raw/a", "test_root": "/b"}})
    assert scan.outside_raw(split.ingest, split.paths) == ["/b"]
    digits = load_params(make_project(SMALL, name="d"))
    assert scan.outside_raw(digits.ingest, digits.paths) == []
