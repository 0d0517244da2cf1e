"""Work on both cores: threads over numba kernels that release the GIL (``nogil=True``), so
the layers of a layer-scope replay or curve run side by side and give the same numbers
as one after another; and reading ahead, so Parquet decoding (which releases the GIL
too) overlaps the work on what was read."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

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
    them in this thread). The first error is raised as soon as it is collected; on an
    error or Ctrl-C the items not yet started are cancelled."""
    workers = min(count, cores(workers))
    if workers <= 1:
        return [work(index) for index in range(count)]
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="moecache-layer")
    try:
        futures = [pool.submit(work, index) for index in range(count)]
        return [future.result() for future in futures]
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def read_ahead(items: Iterator[T]) -> Iterator[T]:
    """``items``, the next one produced in a thread while the caller works on this one: at
    most two in memory. An error in the producer is raised where its item would be."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="moecache-read") as pool:
        upcoming = pool.submit(next, items, None)
        while (item := upcoming.result()) is not None:
            upcoming = pool.submit(next, items, None)
            yield item
