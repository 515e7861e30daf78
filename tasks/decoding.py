"""Ingest's second pass: decode images in chunks across cores, results in order, memory bounded.

Workers get *where* each image is (a file, a zip member) and read the bytes themselves, so the
parent never holds encoded images and nothing large is pickled; only sources that make images in
memory (digits, Fashion-MNIST) send bytes. A worker re-hashes what it read: a file that changed
since the first pass would otherwise get pixels that do not match its content id.
"""

from __future__ import annotations

import multiprocessing
import zipfile
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np

from tasks import sources

# One image to decode: (origin file or None, zip member or None, inline bytes or None, content id).
Job = tuple[str | None, str | None, bytes | None, str]
# A decoded chunk: pixels (n, size·size·channels) uint8, and per row None or the reason it failed.
Chunk = tuple[np.ndarray, list[str | None]]

_ZIPS: dict[str, zipfile.ZipFile] = {}  # per process: a worker opens each zip once, not per image
IN_FLIGHT_PER_WORKER = 4  # chunks queued per worker: keeps cores busy, bounds results held


def _read(origin: str | None, member: str | None, data: bytes | None) -> bytes:
    if origin is None:
        return data or b""
    if member is None:
        with open(origin, "rb") as f:
            return f.read()
    zf = _ZIPS.get(origin)
    if zf is None:
        zf = _ZIPS[origin] = zipfile.ZipFile(origin)
    return zf.read(member)


def decode_chunk(jobs: list[Job], size: int, channels: int) -> Chunk:
    """Decode ``jobs`` into one (n, size·size·channels) uint8 array; failed rows stay zero."""
    out = np.zeros((len(jobs), size * size * channels), np.uint8)
    errors: list[str | None] = []
    for i, (origin, member, data, item_id) in enumerate(jobs):
        try:
            raw = _read(origin, member, data)
        except Exception as err:  # OSError, BadZipFile, zlib.error ...: the file, not our bug
            errors.append(f"unreadable: {sources.display(str(err))}")
            continue
        if sources.content_id(raw) != item_id:
            errors.append("changed while ingesting: content differs from the first pass")
            continue
        try:
            out[i] = sources.decode(raw, size, channels).reshape(-1)
            errors.append(None)
        except ValueError as err:
            errors.append(str(err))
    return out, errors


def _close_zips() -> None:
    for zf in _ZIPS.values():
        zf.close()
    _ZIPS.clear()


def decode_chunks(chunks: Iterable[list[Job]], size: int, channels: int, workers: int) -> Iterator[Chunk]:
    """Decoded chunks in the order given. ``workers`` > 1: a process pool on a fork server, not
    fork() — the caller may be threaded (a Prefect flow, torch), and forking one can deadlock —
    with at most IN_FLIGHT_PER_WORKER chunks per worker queued, so results never pile up."""
    if workers <= 1:
        try:
            for jobs in chunks:
                yield decode_chunk(jobs, size, channels)
        finally:
            _close_zips()
        return
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    # ProcessPoolExecutor, unlike multiprocessing.Pool, fails (BrokenProcessPool) instead of
    # respawning workers forever when they cannot start.
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method))
    pending: deque[Future] = deque()
    todo = iter(chunks)
    try:
        while True:
            while len(pending) < workers * IN_FLIGHT_PER_WORKER:
                jobs = next(todo, None)
                if jobs is None:
                    break
                pending.append(pool.submit(decode_chunk, jobs, size, channels))
            if not pending:
                return
            yield pending.popleft().result()
    except BrokenProcessPool as err:
        raise RuntimeError(
            "ingest: decode workers could not start. Called from a script? Put the call under "
            "`if __name__ == '__main__':` (worker processes import the main module), or set ingest.workers: 1"
        ) from err
    finally:
        pool.shutdown(cancel_futures=True)
