"""LRU-K: evict the expert whose K-th most recent use is oldest (O'Neil, O'Neil and
Weikum, The LRU-K page replacement algorithm for database disk buffering, SIGMOD 1993),
as libCacheSim's LRUK (libCacheSim/cache/eviction/cpp/LRU_K.cpp, k=2).

An expert's history holds its uses since it was inserted (the insertion counts as one;
it is forgotten when the expert is evicted). Experts with fewer than K uses have an
infinite backward K-distance and go first, in insertion order (FIFO); the others go in
order of their K-th most recent use, ties (one request) by smallest id. Under set steps
(docs/semantics.md) the victim is the first such expert outside the current request; a
prefetched expert's insertion counts as a use, and a demand hit on it in the same
request as another. K = 1 is LRU. On one-expert-per-step traces this equals libCacheSim
exactly (tests/test_libcachesim_a.py).

Hooks only: state = (rank per key, ring of the last K use times per key, uses since
insertion per key, [insertions so far]); rank = insertion number - 2**62 for an expert
with fewer than K uses, else K-th last use * keys + key, so the lowest rank is the victim.
"""

import numpy as np
from numba import njit

from ._state import lowest_rank_victim
from .registry import Hooks, Param, Policy, always_keep, no_evict

FIFO_BASE = -(1 << 62)  # ranks of experts with fewer than K uses: below every K-th use


@njit(cache=True)
def init(keys, offsets, sizes, capacity, params, seed, scores):
    num_keys = sizes.shape[0]
    return (np.zeros(num_keys, np.int64), np.zeros((num_keys, int(params[0])), np.int64),
            np.zeros(num_keys, np.int64), np.zeros(1, np.int64))


@njit(cache=True)
def use(state, key, now):
    """Record a use at request ``now``; once the key has K uses its rank is the K-th last."""
    rank, history, uses, _ = state
    k = history.shape[1]
    history[key, uses[key] % k] = now
    uses[key] += 1
    if uses[key] >= k:
        rank[key] = history[key, uses[key] % k] * rank.shape[0] + key


@njit(cache=True)
def access(state, key, now, hit):
    if hit:
        use(state, key, now)


@njit(cache=True)
def admit(state, key, now):
    rank, _, uses, inserted = state
    uses[key] = 0
    rank[key] = FIFO_BASE + inserted[0]
    inserted[0] += 1
    use(state, key, now)


POLICY = Policy(
    name="lru-k", description="LRU-K: evicts experts with fewer than K uses since insertion first (FIFO), "
    "then the oldest K-th most recent use; ties: smallest id",
    hooks=Hooks(init, access, admit, lowest_rank_victim, no_evict, always_keep),
    params=(Param("k", 2, 1, 16, "uses tracked per expert (K = 1 is LRU)", integer=True),),
    style={"linestyle": (0, (3, 1, 1, 1)), "marker": "h"}, rank=45,
    source="O'Neil, O'Neil, Weikum, SIGMOD 1993; libCacheSim, cache/eviction/cpp/LRU_K.cpp (LRUK, k=2)")
