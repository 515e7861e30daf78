"""Tests for tasks.scan: the first pass keeps metadata, not bytes; sources outside paths.raw."""

from __future__ import annotations

from pathlib import Path

from tasks import scan
from tasks.params import load_params
from test_ingest import SMALL, folder_project, write_tree


def test_first_pass_keeps_no_bytes_of_files_it_can_read_again(make_project):
    path = folder_project(make_project, {"root": "imgs"})
    write_tree(path.parent / "imgs", {f"c{i}": 2 for i in range(3)})
    params = load_params(path)
    kept, ids, rejected = scan.first_pass(params.ingest, Path(params.paths.root))
    assert len(kept) == len(ids) == 6 and rejected == []
    assert all(r.data is None and r.origin and Path(r.origin).is_file() for r in kept)
    digits, _, _ = scan.first_pass(load_params(make_project(SMALL, name="d")).ingest, path.parent)
    assert all(r.data and r.origin is None for r in digits)  # made in memory: the bytes stay


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


def test_parallel_scan_equals_serial_scan(make_project):
    """Hashing on worker processes changes nothing: same records, ids, and rejects in the same
    order (the first copy of a duplicate is kept)."""
    path = folder_project(make_project, {"root": "imgs"}, **{"ingest.workers": 2})
    root = path.parent / "imgs"
    tree = write_tree(root, {f"c{i}": 7 for i in range(6)})
    (root / "c0" / "empty.png").write_bytes(b"")
    (root / "c5" / "dup.png").write_bytes(tree["c1"][3])
    (root / "c2" / "notes.txt").write_text("x")
    params = load_params(path)
    serial = scan.first_pass(params.ingest, Path(params.paths.root), serial_images=10_000, chunk=8)
    parallel = scan.first_pass(params.ingest, Path(params.paths.root), serial_images=0, chunk=8)
    assert parallel == serial
    kept, ids, rejected = parallel
    assert len(kept) == 42 and len(set(ids)) == 42
    assert [(r.source, r.kind) for r in rejected] == [
        ("imgs/c0/empty.png", "empty"), ("imgs/c2/notes.txt", "not an image"), ("imgs/c5/dup.png", "duplicate"),
    ]
    assert rejected[2].reason == "duplicate of imgs/c1/img003.png"
