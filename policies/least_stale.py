"""Least-Stale: evict the expert whose next use, predicted from its own reuse interval, is
farthest away.

SpecMD (Hoang et al., arXiv 2602.03921, 2026) proposes Least-Stale because MoE expert
accesses are regular rather than recency-ordered: an expert returns at its own period
(in one cache over all layers, once per pass through the layers), so the expert just used
is the one needed last, and LRU evicts exactly the expert about to return (SpecMD's
"collision misses"). Only the paper's abstract could be read where this was written; the
rule below is the one public ports of SpecMD's policy use (a "phase5e" least_stale port:
an exponentially weighted reuse interval, seeded by the first interval, weight 0.25 for
the newest; victim = the largest last use + max(interval, 1); ties: the more recent last
use). It is an online estimate of Belady's next use.

Per key: ``last``, the request of its latest use, and ``interval``, the estimate (0 until
the key has been used twice; then the first interval, then
``(1 - alpha) * interval + alpha * (now - last)`` at each use). Both survive eviction,
like lfu's counts: the history belongs to the expert, not to the cache. A key inserted
before any use (a prefetch) counts as used at that request. Victim: the candidate with
the largest ``last + max(interval, 1)``, ties the larger ``last``, then the smallest id.
"""

import numpy as np
from numba import njit

from .registry import Hooks, Param, Policy, always_keep, no_evict


@njit(cache=True)
def init(keys, offsets, sizes, capacity, params, seed, scores):
    """State: (last use per key, -1 before any; reuse interval per key; [alpha])."""
    num_keys = sizes.shape[0]
    return np.full(num_keys, -1, np.int64), np.zeros(num_keys, np.float64), params[:1].copy()


@njit(cache=True)
def admit(state, key, now):
    last = state[0]
    if last[key] < 0:
        last[key] = now


@njit(cache=True)
def access(state, key, now, hit):
    last, interval, alpha = state
    gap = now - last[key]
    if gap > 0:
        interval[key] = gap if interval[key] == 0.0 else (1.0 - alpha[0]) * interval[key] + alpha[0] * gap
    last[key] = now


@njit(cache=True)
def victim(state, resident, pinned, mark):
    last, interval, _ = state
    best, best_next = -1, 0.0
    for key in range(last.shape[0]):
        if resident[key] and pinned[key] != mark:
            upcoming = last[key] + max(interval[key], 1.0)
            if best < 0 or upcoming > best_next or (upcoming == best_next and last[key] > last[best]):
                best, best_next = key, upcoming
    return best


POLICY = Policy(
    name="least-stale",
    description="evicts the expert whose next use, predicted as last use + its smoothed reuse interval, "
    "is farthest (SpecMD's Least-Stale); ties: the more recent last use, then smallest id",
    hooks=Hooks(init, access, admit, victim, no_evict, always_keep),
    params=(Param("alpha", 0.25, 0, 1, "weight of the newest reuse interval in the running estimate"),),
    style={"linestyle": (0, (5, 1)), "marker": "h"}, rank=56,
    source="SpecMD, Hoang et al., arXiv 2602.03921 (2026); rule as in public ports (EWMA interval 0.75/0.25)")
