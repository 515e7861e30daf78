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
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import partial
from itertools import islice
from typing import Any

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
    """Decoded chunks in the order given, on ``workers`` processes (see :func:`ordered_map`)."""
    return ordered_map(partial(decode_chunk, size=size, channels=channels), chunks, workers)


def ordered_map(fn: Callable[[Any], Any], tasks: Iterable[Any], workers: int, serial_first: int = 0) -> Iterator[Any]:
    """``fn(task)`` for each task, results in order. The first ``serial_first`` tasks run here
    (a source too small to pay for starting workers never starts them); the rest, with
    ``workers`` > 1, on a process pool from a fork server, not fork() — the caller may be threaded
    (a Prefect flow, torch), and forking one can deadlock — with at most IN_FLIGHT_PER_WORKER tasks
    per worker queued, so results never pile up."""
    todo = iter(tasks)
    try:
        for task in islice(todo, serial_first if workers > 1 else None):
            yield fn(task)
    finally:
        _close_zips()
    if workers <= 1:
        return
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    pool = None
    pending: deque[Future] = deque()
    try:
        while True:
            while len(pending) < workers * IN_FLIGHT_PER_WORKER:
                task = next(todo, _END)
                if task is _END:
                    break
                if pool is None:  # ProcessPoolExecutor, unlike multiprocessing.Pool, fails
                    # (BrokenProcessPool) instead of respawning workers that cannot start forever.
                    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method))
                pending.append(pool.submit(fn, task))
            if not pending:
                return
            yield pending.popleft().result()
    except BrokenProcessPool as err:
        raise RuntimeError(
            "ingest: decode workers could not start. Called from a script? Put the call under "
            "`if __name__ == '__main__':` (worker processes import the main module), or set ingest.workers: 1"
        ) from err
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


_END = object()
