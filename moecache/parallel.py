"""Work per MoE layer on every core: threads over numba kernels that release the GIL
(``nogil=True``), so the layers of a layer-scope replay or curve run side by side and
give the same numbers as one after another."""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


def map_layers(work: Callable[[int], T], count: int, workers: int | None = None) -> list[T]:
    """``[work(0), ..., work(count - 1)]``, ``workers`` at a time (default: every core; 1 runs
    them in this thread). The first error is raised as soon as it is collected; on an
    error or Ctrl-C the layers not yet started are cancelled."""
    workers = min(count, workers or os.cpu_count() or 1)
    if workers <= 1:
        return [work(index) for index in range(count)]
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="moecache-layer")
    try:
        futures = [pool.submit(work, index) for index in range(count)]
        return [future.result() for future in futures]
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
