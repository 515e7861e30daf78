"""Fetch a dataset file once, into a local cache, and refuse it unless its sha256 matches.

Only used when a layout's ``downloads`` are configured and the file is not already there; nothing
downloads otherwise (and these machines have no network: tests use ``file://`` URLs).
"""

from __future__ import annotations

import shutil
import tarfile
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

from tasks.contracts import atomic_path, file_digest
from tasks.errors import DatasetError

_BLOCK = 1 << 20


def fetch(url: str, sha256: str, dest: Path, timeout: float = 60.0) -> Path:
    """``dest`` if it exists with the right sha256; otherwise download ``url`` there (atomically:
    a broken transfer never leaves a file that looks complete) and check it. A mismatch is a
    DatasetError and leaves no file behind."""
    if dest.is_file() and file_digest(dest) == sha256:
        return dest
    if dest.exists():
        raise DatasetError(f"{dest} exists but its sha256 is not {sha256}: remove it to download again")
    if not urllib.parse.urlsplit(url).scheme:  # a local file, as a user with the archive at hand gives it
        if not Path(url).is_absolute():
            raise DatasetError(f"download url {url!r}: give a URL (https://, file://) or an absolute path")
        url = Path(url).as_uri()
    with atomic_path(dest) as tmp:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
                shutil.copyfileobj(response, out, _BLOCK)
        except OSError as err:  # URLError is an OSError
            raise DatasetError(f"download of {url} failed: {err}") from None
        got = file_digest(tmp)
        if got != sha256:
            raise DatasetError(f"download of {url}: sha256 {got}, expected {sha256}")
    return dest


def extract(archive: Path, into: Path, digest: str | None = None) -> None:
    """Unpack a .zip or .tar(.gz|.bz2|.xz) into ``into`` once per archive version: a marker file
    holds the archive's sha256 and the files it unpacked. A new version (another sha256, as when
    a ``downloads`` entry is updated) is unpacked again, and the files only the old one had are
    removed — else ingest would read the old data, or a class the new version dropped. Tar
    members that would land outside ``into`` (``..``, absolute, links) are refused by the 'data'
    filter. ``digest``: the archive's sha256 when the caller has just checked it (a GB archive
    takes seconds to hash again)."""
    marker = into / f".{archive.name}.extracted"
    digest = digest or file_digest(archive)
    old = marker.read_text().split("\n") if marker.exists() else []
    if old and old[0] == digest:
        return
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            members = [i.filename for i in zf.infolist() if not i.is_dir()]
            zf.extractall(into)  # zipfile drops '..' and absolute prefixes itself
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            members = [m.name for m in tf.getmembers() if not m.isdir()]
            try:
                tf.extractall(into, filter="data")
            except tarfile.FilterError as err:
                raise DatasetError(f"{archive}: unsafe member refused: {err}") from None
    else:
        raise DatasetError(f"{archive}: extract is set but it is neither a zip nor a tar archive")
    stale = {m for m in old[1:] if m} - set(members)  # the previous version's files this one lacks
    for name in stale:
        path = (into / name).resolve()
        if path.is_relative_to(into.resolve()) and path.is_file():
            path.unlink()
    if old:
        print(f"download: {archive.name} changed (sha256 {digest[:12]}, was {old[0][:12]}): unpacked again, "
              f"{len(stale)} files of the old version removed")
    marker.write_text("\n".join([digest, *members]) + "\n")


def ensure(downloads: list, root: Path) -> None:
    """Fetch (and unpack) each configured download into ``root``; ``downloads`` are params'
    Download models (url, sha256, file, extract)."""
    for d in downloads:
        path = fetch(d.url, d.sha256, root / d.file)
        if d.extract:
            extract(path, root, d.sha256)  # fetch checked it
