"""Tests for tasks.scan: the first pass lists the source without reading it; sources outside paths.raw."""

from __future__ import annotations

from pathlib import Path

import pytest

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


def test_first_pass_reads_no_zip_member(make_project, monkeypatch):
    """A zipped folder is listed from the zip's directory: its members are read (decompressed)
    once, by the decode workers, not also here (which cost more than the listing itself)."""
    import shutil
    import zipfile

    path = folder_project(make_project, {"root": "imgs.zip"})
    write_tree(path.parent / "imgs", {f"c{i}": 2 for i in range(3)})
    (path.parent / "imgs" / "c0" / "empty.png").write_bytes(b"")
    shutil.make_archive(str(path.parent / "imgs"), "zip", root_dir=path.parent, base_dir="imgs")
    reads = []
    real_read = zipfile.ZipFile.read
    monkeypatch.setattr(zipfile.ZipFile, "read", lambda self, name, pwd=None: reads.append(name) or real_read(self, name, pwd))
    kept, ids, rejected = scan.first_pass(load_params(path).ingest, path.parent)
    assert reads == [] and len(kept) == 6 and all(r.member and r.data is None for r in kept)
    assert [(r.source, r.category) for r in rejected] == [("imgs.zip/imgs/c0/empty.png", "empty")]  # from the directory


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


def test_in_a_dvc_temporary_copy_paths_beside_the_project_are_the_originals(make_project, monkeypatch, tmp_path):
    """``dvc exp run --queue/--temp`` runs the stages in a copy under .dvc/tmp/exps/...: a
    source ``../data`` means the folder beside the user's repository, not beside the copy;
    paths inside the project stay the copy's own."""
    path = folder_project(make_project, {"root": "../beside"}, name="repo")
    repo = path.parent
    write_tree(repo.parent / "beside", {f"c{i}": 2 for i in range(3)})
    copy = repo / ".dvc" / "tmp" / "exps" / "standalone" / "tmp123"
    (copy / ".dvc").mkdir(parents=True)  # a copy of the repository, .dvc/ included
    (copy / "params.yaml").write_text(path.read_text())
    write_tree(copy / "inside", {"x": 2, "y": 2})
    params = load_params(copy / "params.yaml")

    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    with pytest.raises(FileNotFoundError, match="tmp123/../beside"):  # beside the copy: nothing there
        list(scan.records(params.ingest, copy))
    monkeypatch.setenv("DVC_EXP_NAME", "exp-1")
    monkeypatch.setenv("DVC_ROOT", str(repo))
    got = list(scan.records(params.ingest, copy))
    assert len(got) == 6 and all(Path(r.origin).resolve().is_relative_to((repo.parent / "beside").resolve()) for r in got)
    inside = load_params(copy / "params.yaml", {"ingest.source.root": "inside"})
    assert all(Path(r.origin).resolve().is_relative_to(copy.resolve() / "inside") for r in scan.records(inside.ingest, copy))


def test_a_project_below_the_repository_top_maps_to_the_same_folder_of_the_original(tmp_path, monkeypatch):
    from tasks.params import project_origin

    copy = tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "standalone" / "tmp1"
    (copy / ".dvc").mkdir(parents=True)
    (copy / "sub" / "project").mkdir(parents=True)
    monkeypatch.setenv("DVC_EXP_NAME", "e")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "repo"))
    assert project_origin(copy / "sub" / "project") == (tmp_path / "repo" / "sub" / "project").resolve()
    assert project_origin(copy) == (tmp_path / "repo").resolve()
    monkeypatch.delenv("DVC_EXP_NAME")
    assert project_origin(copy / "sub") == (copy / "sub").resolve()
