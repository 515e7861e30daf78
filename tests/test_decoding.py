"""Tests for tasks.decoding: workers read files and zip members themselves, hash what they decode, keep order."""

from __future__ import annotations

import io
import zipfile

import numpy as np
from PIL import Image

from tasks import decoding
from tasks.sources import content_id


def png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 4), value, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_decode_chunk_reads_files_zip_members_and_inline_bytes(tmp_path):
    (tmp_path / "a.png").write_bytes(png(10))
    with zipfile.ZipFile(tmp_path / "z.zip", "w") as zf:
        zf.writestr("top/b.png", png(20))
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "folder.png").mkdir()
    jobs = [
        (str(tmp_path / "a.png"), None, None, None),
        (str(tmp_path / "z.zip"), "top/b.png", None, None),
        (None, None, png(40), content_id(png(40))),  # made in memory: hashed by the first pass
        (str(tmp_path / "gone.png"), None, None, None),
        (str(tmp_path / "folder.png"), None, None, None),
        (str(tmp_path / "empty.png"), None, None, None),
        (None, None, b"junk", content_id(b"junk")),
    ]
    pixels, ids, errors = decoding.decode_chunk(jobs, 2, 1)
    assert pixels.shape == (7, 4) and pixels.dtype == np.uint8
    assert pixels[:3, 0].tolist() == [10, 20, 40]
    assert ids[:3] == [content_id(png(10)), content_id(png(20)), content_id(png(40))]  # of the bytes decoded
    assert errors[:3] == [None, None, None]
    assert errors[3] == "missing file" and ids[3] is None
    assert errors[4].startswith("unreadable") and ids[4] is None
    assert errors[5] == "empty file"
    assert errors[6].startswith("corrupt")
    assert not pixels[3:].any()  # failed rows stay zero
    decoding._close_zips()


def test_parallel_results_come_in_order(tmp_path, monkeypatch):
    monkeypatch.setattr(decoding, "IN_FLIGHT_PER_WORKER", 1)  # more chunks than the window
    chunks = [[(None, None, png(v), content_id(png(v)))] for v in range(12)]
    serial = [p[0, 0] for p, _, _ in decoding.decode_chunks(iter(chunks), 1, 1, workers=1)]
    parallel = [p[0, 0] for p, _, _ in decoding.decode_chunks(iter(chunks), 1, 1, workers=2)]
    assert serial == parallel == list(range(12))
