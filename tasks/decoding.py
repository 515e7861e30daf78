"""Ingest's second pass: decode images in chunks across cores, results in order, memory bounded.

Workers get *where* each image is (a file, a zip member) and read the bytes themselves, so the
parent never holds encoded images and nothing large is pickled; only sources that make images in
memory (digits, Fashion-MNIST) send bytes. A worker hashes the bytes it decodes: each file is read
once, and its content id always matches its pixels, even if the file changes during the stage.
"""

from __future__ import annotations

import multiprocessing
import zipfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import partial
from typing import Any

import numpy as np

from tasks import sources

# One image to decode: (origin file or None, zip member or None, inline bytes or None, content id
# or None: the worker hashes what it reads).
Job = tuple[str | None, str | None, bytes | None, str | None]
# A decoded chunk: pixels (n, size·size·channels) uint8, and per row the content id (None if the
# bytes could not be read) and None or the reason it failed.
Chunk = tuple[np.ndarray, list[str | None], list[str | None]]

_ZIPS: dict[str, zipfile.ZipFile] = {}  # per process: a worker opens each zip once, not per image
IN_FLIGHT_PER_WORKER = 4  # chunks queued per worker: keeps cores busy, bounds results held


def _read(origin: str | None, member: str | None, data: bytes | None) -> bytes | sources.Rejected:
    """The job's bytes, or why a listed file or zip member has none (missing, unreadable, empty)."""
    if origin is None:
        return data or b""
    if member is None:
        return sources.read_file(origin, origin)
    zf = _ZIPS.get(origin)
    if zf is None:
        zf = _ZIPS[origin] = zipfile.ZipFile(origin)
    return sources.read_member(zf, member, origin)


def decode_chunk(jobs: list[Job], size: int, channels: int, out: np.ndarray | None = None) -> Chunk:
    """Decode ``jobs`` into one (n, size·size·channels) uint8 array (``out`` if given, which must
    be zero); failed rows stay zero."""
    out = np.zeros((len(jobs), size * size * channels), np.uint8) if out is None else out
    ids: list[str | None] = []
    errors: list[str | None] = []
    for i, (origin, member, data, item_id) in enumerate(jobs):
        try:
            raw = _read(origin, member, data)
            reason = raw.reason if isinstance(raw, sources.Rejected) else None
        except Exception as err:  # BadZipFile, zlib.error, OSError ... of a zip member: the file, not our bug
            reason = f"unreadable: {sources.display(str(err))}"
        if reason is not None:
            ids.append(None)
            errors.append(reason)
            continue
        ids.append(item_id or sources.content_id(raw))
        try:
            out[i] = sources.decode(raw, size, channels).reshape(-1)
            errors.append(None)
        except ValueError as err:
            errors.append(str(err))
    return out, ids, errors


def _close_zips() -> None:
    for zf in _ZIPS.values():
        zf.close()
    _ZIPS.clear()


_SHARED: np.ndarray | None = None  # in a worker: (slots, rows, width) view of the parent's buffer


def _attach(buffer: Any, shape: tuple[int, int, int]) -> None:
    global _SHARED
    _SHARED = np.frombuffer(buffer, np.uint8).reshape(shape)


def _decode_into(task: tuple[int, list[Job]], size: int, channels: int) -> tuple[list[str | None], list[str | None]]:
    slot, jobs = task
    assert _SHARED is not None, "worker started without the shared buffer"  # our bug, not user data
    out = _SHARED[slot, : len(jobs)]
    out[:] = 0
    _, ids, errors = decode_chunk(jobs, size, channels, out)
    return ids, errors


def decode_chunks(
    chunks: Iterable[list[Job]], size: int, channels: int, workers: int, rows: int = 512
) -> Iterator[Chunk]:
    """Decoded chunks (at most ``rows`` jobs each) in the order given, on ``workers`` processes.

    Workers write pixels into a buffer shared with this process — one slot per chunk in flight —
    and send back only ids and errors: pickling a chunk's pixels through a pipe cost 8 % of the
    stage's time on small images. A slot is reused only after its chunk was copied out here."""
    if workers <= 1:
        yield from ordered_map(partial(decode_chunk, size=size, channels=channels), chunks, 1)
        return
    slots, width = workers * IN_FLIGHT_PER_WORKER, size * size * channels
    context = _context()
    buffer = context.RawArray("B", slots * rows * width)  # /dev/shm, or a temp file if too small
    view = np.frombuffer(buffer, np.uint8).reshape(slots, rows, width)

    def tasks() -> Iterator[tuple[int, list[Job]]]:
        for k, jobs in enumerate(chunks):
            if len(jobs) > rows:
                raise ValueError(f"decode chunk of {len(jobs)} jobs, more than rows={rows}")
            yield k % slots, jobs

    fn = partial(_decode_into, size=size, channels=channels)
    results = ordered_map(fn, tasks(), workers, context, initializer=_attach, initargs=(buffer, view.shape))
    for k, (ids, errors) in enumerate(results):
        # Copied before the next result is asked for: only then does ordered_map queue the
        # chunk that will reuse this slot (it keeps at most `slots` chunks in flight).
        yield view[k % slots, : len(ids)].copy(), ids, errors


def _context() -> multiprocessing.context.BaseContext:
    """A fork server, not fork(): the caller may be threaded (a Prefect flow, torch), and forking
    one can deadlock."""
    return multiprocessing.get_context("forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn")


def ordered_map(
    fn: Callable[[Any], Any], tasks: Iterable[Any], workers: int,
    context: multiprocessing.context.BaseContext | None = None,
    initializer: Callable[..., None] | None = None, initargs: tuple = (),
) -> Iterator[Any]:
    """``fn(task)`` for each task, results in order: here with ``workers`` <= 1, else on a process
    pool (``context``, by default :func:`_context`'s; ``initializer(*initargs)`` runs in each worker) with at most
    IN_FLIGHT_PER_WORKER tasks per worker queued, so results never pile up."""
    todo = iter(tasks)
    if workers <= 1:
        try:
            yield from map(fn, todo)
        finally:
            _close_zips()
        return
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
                    pool = ProcessPoolExecutor(
                        workers, mp_context=context or _context(), initializer=initializer, initargs=initargs
                    )
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
