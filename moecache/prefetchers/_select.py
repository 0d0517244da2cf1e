"""Shared by the prefetchers: keep each batch's most wanted experts within the budget."""

from __future__ import annotations

import numpy as np
from numba import njit

from moecache.replay import Prefetch


@njit(cache=True)
def _top(ids, offsets, rank, budget):
    """Per batch, its ``budget`` entries of largest ``rank`` in that order (ties: the earlier
    entry first), as a new CSR."""
    out = np.empty(ids.shape[0], np.int32)
    out_offsets = np.zeros(offsets.shape[0], np.int64)
    fill = 0
    for b in range(offsets.shape[0] - 1):
        lo, hi = offsets[b], offsets[b + 1]
        order = np.argsort(-rank[lo:hi], kind="mergesort")
        for i in range(min(budget, hi - lo)):
            out[fill] = ids[lo + order[i]]
            fill += 1
        out_offsets[b + 1] = fill
    return out[:fill], out_offsets


def top_batches(ids: np.ndarray, offsets: np.ndarray, rank: np.ndarray | None, budget: int,
                layers: int) -> Prefetch:
    """Batches (CSR ``ids``/``offsets``, one per position) cut to ``budget`` experts each,
    those of largest ``rank`` first (None: in the given order)."""
    if rank is None:
        rank = -np.arange(len(ids), dtype=np.float64)
    experts, batch_offsets = _top(ids, offsets, rank.astype(np.float64), budget)
    return Prefetch(experts, batch_offsets, layers)
