"""Tests for tasks.download: fetch with sha256 verification (file:// URLs: no network) and extract."""

from __future__ import annotations

import hashlib
import io
import tarfile
import zipfile

import pytest

from tasks.contracts import file_digest
from tasks import download
from tasks.errors import DatasetError


def test_fetch_verifies_and_caches(tmp_path):
    src = tmp_path / "remote" / "data.bin"
    src.parent.mkdir()
    src.write_bytes(b"x" * 3_000_000)  # several copy blocks
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    dest = tmp_path / "cache" / "data.bin"
    assert download.fetch(src.as_uri(), digest, dest) == dest
    assert dest.read_bytes() == src.read_bytes()
    src.unlink()  # a second call uses the cache: the URL is not read again
    assert download.fetch(src.as_uri(), digest, dest) == dest


def test_fetch_refuses_a_wrong_checksum_and_leaves_nothing(tmp_path):
    src = tmp_path / "data.bin"
    src.write_bytes(b"payload")
    dest = tmp_path / "cache" / "data.bin"
    with pytest.raises(DatasetError, match="sha256"):
        download.fetch(src.as_uri(), "0" * 64, dest)
    assert not dest.exists() and list(dest.parent.iterdir()) == []
    dest.write_bytes(b"something else")  # a stale or tampered cache file is not silently replaced
    with pytest.raises(DatasetError, match="remove it"):
        download.fetch(src.as_uri(), hashlib.sha256(b"payload").hexdigest(), dest)


def test_fetch_unreachable_url(tmp_path):
    with pytest.raises(DatasetError, match="failed"):
        download.fetch((tmp_path / "absent").as_uri(), "0" * 64, tmp_path / "out")


def test_ensure_fetches_and_extracts_zip_and_tar(tmp_path):
    from tasks.params import Download

    remote = tmp_path / "remote"
    remote.mkdir()
    with zipfile.ZipFile(remote / "a.zip", "w") as zf:
        zf.writestr("top/a.txt", "A")
    with tarfile.open(remote / "b.tgz", "w:gz") as tf:
        info = tarfile.TarInfo("top/b.txt")
        info.size = 1
        tf.addfile(info, io.BytesIO(b"B"))
    downloads = [
        Download(url=(remote / n).as_uri(), sha256=file_digest(remote / n), file=n, extract=True)
        for n in ("a.zip", "b.tgz")
    ]
    root = tmp_path / "root"
    download.ensure(downloads, root)
    assert (root / "top" / "a.txt").read_text() == "A" and (root / "top" / "b.txt").read_text() == "B"
    (root / "top" / "a.txt").unlink()
    download.ensure(downloads, root)  # extracted once: the marker stops a second unpacking
    assert not (root / "top" / "a.txt").exists()


def test_a_new_version_of_an_archive_is_unpacked_again(tmp_path, capsys):
    """The data was re-published: the downloads entry gets the new sha256, the old archive is
    removed. The new version is unpacked over the old one, and files it no longer has go."""
    from tasks.params import Download

    def publish(files: dict[str, str]) -> list:
        with zipfile.ZipFile(tmp_path / "remote.zip", "w") as zf:
            for name, text in files.items():
                zf.writestr(name, text)
        return [Download(url=str(tmp_path / "remote.zip"), sha256=file_digest(tmp_path / "remote.zip"),
                         file="data.zip", extract=True)]  # a plain absolute path is a url too

    root = tmp_path / "root"
    download.ensure(publish({"top/a/1.txt": "v1", "top/b/1.txt": "v1"}), root)
    (root / "data.zip").unlink()
    download.ensure(publish({"top/a/1.txt": "v2", "top/c/1.txt": "v2"}), root)
    assert (root / "top/a/1.txt").read_text() == "v2" and (root / "top/c/1.txt").exists()
    assert not (root / "top/b/1.txt").exists()
    out = capsys.readouterr().out
    assert "data.zip changed" in out and "1 files of the old version removed" in out


def test_a_relative_path_is_no_download_url(tmp_path):
    with pytest.raises(DatasetError, match="give a URL .* or an absolute path"):
        download.fetch("data/x.zip", "0" * 64, tmp_path / "x.zip")


def test_tar_members_escaping_the_root_are_refused(tmp_path):
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tf:
        info = tarfile.TarInfo("../evil.txt")
        info.size = 1
        tf.addfile(info, io.BytesIO(b"E"))
    with pytest.raises(DatasetError, match="unsafe member"):
        download.extract(archive, tmp_path / "into")
    assert not (tmp_path / "evil.txt").exists()
