"""Work on both cores: threads over numba kernels that release the GIL (``nogil=True``), so
the layers of a layer-scope replay or curve run side by side and give the same numbers
as one after another; and reading ahead, so Parquet decoding (which releases the GIL
too) overlaps the work on what was read."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Any, TypeVar

T = TypeVar("T")


def cores(workers: int | None = None) -> int:
    """``workers``, or every core of this machine when None."""
    return workers or os.cpu_count() or 1


def split(count: int, parts: int) -> list[tuple[int, int]]:
    """[start, stop) ranges cutting ``range(count)`` into ``parts`` near-equal runs (fewer
    when ``count`` is smaller), in order."""
    parts = max(1, min(parts, count))
    bounds = [count * i // parts for i in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def map_parallel(work: Callable[[int], T], count: int, workers: int | None = None) -> list[T]:
    """``[work(0), ..., work(count - 1)]``, ``workers`` at a time (default: every core; 1 runs
    them in this thread) on threads kept for the process. Work that itself calls this runs
    its items in its own thread (no nesting, so no deadlock). The first error is raised as
    soon as it happens; on an error or Ctrl-C the items not yet started are dropped."""
    workers = min(count, cores(workers))
    if workers <= 1 or getattr(_worker, "busy", False):
        return [work(index) for index in range(count)]
    results: list[Any] = [None] * count
    upcoming = iter(range(count))
    taking, stop = threading.Lock(), threading.Event()

    def drain() -> None:
        _worker.busy = True
        try:
            while not stop.is_set():
                with taking:
                    index = next(upcoming, None)
                if index is None:
                    return
                results[index] = work(index)
        except BaseException:
            stop.set()
            raise
        finally:
            _worker.busy = False

    futures = [_threads().submit(drain) for _ in range(workers)]
    try:
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)  # all of them, unless one failed
        for future in done:
            if future.exception() is not None:
                raise future.exception()
    finally:
        stop.set()
    return results


_worker = threading.local()  # ``busy`` inside map_parallel's work
_pool: list[ThreadPoolExecutor] = []
_pool_lock = threading.Lock()


def _threads() -> ThreadPoolExecutor:
    """The process's worker threads (started as needed, kept between calls)."""
    with _pool_lock:
        if not _pool:
            _pool.append(ThreadPoolExecutor(max_workers=64, thread_name_prefix="moecache-worker"))
        return _pool[0]


def read_ahead(items: Iterator[T]) -> Iterator[T]:
    """``items``, the next one produced in a thread while the caller works on this one: at
    most two in memory. An error in the producer is raised where its item would be."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="moecache-read") as pool:
        upcoming = pool.submit(next, items, _END)
        while (item := upcoming.result()) is not _END:
            upcoming = pool.submit(next, items, _END)
            yield item


_END = object()  # what ``next`` returns once the items run out (an item may be None)
