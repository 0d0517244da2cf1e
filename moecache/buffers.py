"""Large arrays with their memory mapped up front.

Touching a fresh page of a large NumPy array faults it in, one page at a time; on this
project's (virtualized) test machine that cost 0.5 s per 200 MB, seven times what asking
the kernel to map the whole range at once costs (``MAP_POPULATE``). The arrays a load or a
replay fills completely (ids, step sets, keys) are allocated here.
"""

from __future__ import annotations

import mmap

import numpy as np

POPULATE_ABOVE = 1 << 25
"""Bytes above which an array is mapped up front. Smaller ones come from NumPy's allocator:
glibc's malloc hands blocks of up to 32 MiB back out of its free lists, pages already
mapped (a streamed replay's spans reuse them), while every larger block is a fresh
mapping whose pages fault in one at a time."""


def mapped_zeros(shape: int | tuple[int, ...], dtype: type | np.dtype) -> np.ndarray:
    """An array of zeros of ``shape`` and ``dtype`` whose pages are mapped now (Linux: one
    ``MAP_POPULATE`` mapping, freed with the array); arrays up to :data:`POPULATE_ABOVE`
    bytes, other systems and a refused mapping: ``np.zeros``."""
    kind = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    size = count * kind.itemsize
    flags = getattr(mmap, "MAP_POPULATE", 0)
    if size <= POPULATE_ABOVE or not flags:
        return np.zeros(shape, kind)
    try:
        memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | flags)
    except OSError:  # no such mapping here (a memory limit): NumPy's own, as anywhere else
        return np.zeros(shape, kind)
    return np.frombuffer(memory, kind, count).reshape(shape)
