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

Rank = insertion number - 2**62 for an expert with fewer than K uses, else K-th last use
* keys + key, so the lowest rank is the victim.

Two exact fast kernels of unit sizes, chosen by ``simulate``; in both, request r's misses
evict, one by one in ascending id, the lowest-ranked residents outside it (its residents
are pinned), then every key of the request is used at r (an admission resets the key's
uses, then counts as its first use):

* masks (at most 64 keys): ``young[t]`` holds, as a 64-bit mask, the residents with fewer
  than K uses inserted by request t, ``old[t]`` those with K uses whose K-th last use is
  request t. Invariant: the groups partition the residents, so victims are the lowest
  bits outside the request of the oldest young groups, then of the oldest old groups.
  Every group before ``young_oldest`` is empty, and so is every old group before
  ``old_oldest``, which moves back when a key joins an older group.
* slots (any number of keys): the residents in slots with their ranks
  (``_state.slots_*``), the victim the lowest by one scan; while request r is served its
  residents' slots hold rank ``PINNED``, never the lowest.

Hooks: state = (rank per key, the last K use times per key, uses since insertion per key
(at most K), [insertions so far]).
"""

import numpy as np
from numba import njit, uint64

from ._state import (
    PINNED,
    fits_masks,
    lowest_bits,
    lowest_rank_victim,
    lowest_slot,
    no_room,
    popcount,
    request_mask,
    slots_add,
    slots_new,
    slots_remove,
)
from .registry import Hooks, Param, Policy, always_keep, no_evict

FIFO_BASE = -(1 << 62)  # ranks of experts with fewer than K uses: below every K-th use


@njit(cache=True, nogil=True)
def simulate(keys, offsets, sizes, capacity, params, seed):
    k = int(params[0])
    if fits_masks(sizes):
        return simulate_masks(keys, offsets, capacity, k)
    return simulate_slots(keys, offsets, sizes.shape[0], capacity, k)


@njit(cache=True, inline="always")
def take_oldest(groups, g, end, step, n):
    """Clear the ``n`` lowest bits outside ``step`` of ``groups[g:end]``, oldest group first
    (fewer if they hold fewer); returns the mask of those cleared."""
    taken = uint64(0)
    while n > 0 and g < end:
        take = lowest_bits(groups[g] & ~step, n)
        n -= popcount(take)
        groups[g] ^= take
        taken |= take
        g += 1
    return taken


@njit(cache=True, nogil=True)
def simulate_masks(keys, offsets, capacity, k):
    num_requests = offsets.shape[0] - 1
    young = np.zeros(num_requests, np.uint64)
    old = np.zeros(num_requests, np.uint64)
    group = np.zeros(64, np.int64)  # the request indexing each resident's group
    history = np.zeros((64, k), np.int64)
    uses = np.zeros(64, np.int64)
    hits = np.zeros(num_requests, np.int32)
    resident = uint64(0)
    count = 0
    young_oldest = 0
    old_oldest = 0
    for r in range(num_requests):
        lo, hi = offsets[r], offsets[r + 1]
        step = request_mask(keys, lo, hi)
        found = popcount(step & resident)
        hits[r] = found
        misses = hi - lo - found
        evict = count + misses - capacity
        if evict > 0:
            if evict > count - found:
                no_room()
            count -= evict
            taken = take_oldest(young, young_oldest, r, step, evict)
            evict -= popcount(taken)
            resident ^= taken | take_oldest(old, old_oldest, r, step, evict)
            while young_oldest < r and young[young_oldest] == 0:
                young_oldest += 1
            while old_oldest < r and old[old_oldest] == 0:
                old_oldest += 1
        count += misses
        fresh = step & ~resident
        resident |= step
        young[r] = fresh
        for j in range(lo, hi):
            key = keys[j]
            bit = uint64(1) << uint64(key)
            if fresh & bit:
                uses[key] = 0
                group[key] = r
            was_young = uses[key] < k
            t = record_use(history, uses, key, r)
            if t >= 0:
                if was_young:
                    young[group[key]] ^= bit
                else:
                    old[group[key]] ^= bit
                old[t] |= bit
                group[key] = t
                old_oldest = min(old_oldest, t)
    return hits


@njit(cache=True, nogil=True)
def simulate_slots(keys, offsets, num_keys, capacity, k):
    slots, where, rank = slots_new(num_keys)
    key_rank = np.zeros(num_keys, np.int64)  # the hooks' rank, also while the slot holds PINNED
    history = np.zeros((num_keys, k), np.int64)
    uses = np.zeros(num_keys, np.int64)
    hits = np.zeros(offsets.shape[0] - 1, np.int32)
    count = 0
    inserted = 0
    for r in range(hits.shape[0]):
        lo, hi = offsets[r], offsets[r + 1]
        if hi - lo > capacity:
            no_room()
        found = 0
        for j in range(lo, hi):
            s = where[keys[j]]
            if s >= 0:
                found += 1
                rank[s] = PINNED
        hits[r] = found
        if found < hi - lo:
            for j in range(lo, hi):
                key = keys[j]
                if where[key] < 0:
                    if count == capacity:
                        count = slots_remove(slots, where, rank, count, lowest_slot(rank, count))
                    count = slots_add(slots, where, rank, count, key, PINNED)
                    uses[key] = 0
                    key_rank[key] = FIFO_BASE + inserted
                    inserted += 1
        for j in range(lo, hi):
            key = keys[j]
            use_rank(key_rank, history, uses, key, r)
            rank[where[key]] = key_rank[key]
    return hits


@njit(cache=True)
def init(keys, offsets, sizes, capacity, params, seed, scores):
    num_keys = sizes.shape[0]
    return (np.zeros(num_keys, np.int64), np.zeros((num_keys, int(params[0])), np.int64),
            np.zeros(num_keys, np.int64), np.zeros(1, np.int64))


@njit(cache=True, inline="always")
def record_use(history, uses, key, now):
    """Record a use at request ``now``; returns the K-th last use once the key has K uses
    since insertion, else -1. ``history[key]`` holds the last K uses, oldest first."""
    k = history.shape[1]
    for i in range(k - 1):
        history[key, i] = history[key, i + 1]
    history[key, k - 1] = now
    uses[key] = min(uses[key] + 1, k)
    return history[key, 0] if uses[key] == k else -1


@njit(cache=True, inline="always")
def use_rank(rank, history, uses, key, now):
    """Record a use; a key with K uses ranks by its K-th last use, then its id."""
    last = record_use(history, uses, key, now)
    if last >= 0:
        rank[key] = last * rank.shape[0] + key


@njit(cache=True)
def use(state, key, now):
    rank, history, uses, _ = state
    use_rank(rank, history, uses, key, now)


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
    kernel=simulate, unit_kernel=True,
    params=(Param("k", 2, 1, 16, "uses tracked per expert (K = 1 is LRU)", integer=True),),
    style={"linestyle": (0, (3, 1, 1, 1)), "marker": "h"}, rank=45,
    source="O'Neil, O'Neil, Weikum, SIGMOD 1993; libCacheSim, cache/eviction/cpp/LRU_K.cpp (LRUK, k=2)")
