"""FIFO: evict the earliest inserted expert; ties (inserted by one request) -> smallest id.

Two exact implementations of the same order, chosen by ``simulate``:

* masks (at most 64 keys, unit sizes): ``groups[t]`` holds, as a 64-bit mask, the keys
  inserted by request ``t`` and still cached. Invariant: the groups partition the
  residents by insertion, so victims are the lowest bits of the oldest groups, skipping
  keys of the current request, which stay where they are.
* list (any size): a linked list orders residents by insertion, the misses of one
  request appended in ascending id order; hits do not move. Victims are taken from the
  head, skipping keys of the current request (marked in ``current``).
"""

import numpy as np
from numba import njit, uint64

from ._state import (
    fits_masks,
    list_append,
    list_new,
    list_unlink,
    lowest_bits,
    lowest_rank_victim,
    no_room,
    popcount,
    request_mask,
)
from .lru import new_stamps, stamp
from .registry import Hooks, Policy, always_keep, no_access, no_evict


@njit(cache=True, nogil=True)
def simulate(keys, offsets, sizes, capacity, params, seed):
    if fits_masks(sizes):
        return simulate_masks(keys, offsets, capacity)
    return simulate_list(keys, offsets, sizes, capacity)


@njit(cache=True, nogil=True)
def simulate_masks(keys, offsets, capacity):
    num_requests = offsets.shape[0] - 1
    groups = np.zeros(num_requests, np.uint64)
    hits = np.zeros(num_requests, np.int32)
    resident = uint64(0)
    count = 0
    oldest = 0
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
            g = oldest
            while evict > 0:  # whole groups at once, then the lowest bits of the last
                group = groups[g]
                take = lowest_bits(group & ~step, evict)
                evict -= popcount(take)
                groups[g] = group ^ take
                resident ^= take
                g += 1
            while oldest < r and groups[oldest] == 0:
                oldest += 1
        count += misses
        groups[r] = step & ~resident
        resident |= step
    return hits


@njit(cache=True, nogil=True)
def simulate_list(keys, offsets, sizes, capacity):
    num_keys = sizes.shape[0]
    prev, nxt, head = list_new(num_keys)
    resident = np.zeros(num_keys, np.int32)
    current = np.full(num_keys + 2, -1, np.int64)  # request that last asked for each node
    hits = np.zeros(offsets.shape[0] - 1, np.int32)
    used = 0
    for r in range(hits.shape[0]):
        lo, hi = offsets[r], offsets[r + 1]
        found = 0
        need = 0
        for j in range(lo, hi):
            key = keys[j]
            current[key] = r
            here = resident[key]
            found += here
            need += (1 - here) * sizes[key]
        hits[r] = found
        node = nxt[head]
        while used + need > capacity:
            while current[node] == r:
                node = nxt[node]
            if node == head:
                no_room()
            victim = node
            node = nxt[node]
            list_unlink(prev, nxt, victim)
            resident[victim] = 0
            used -= sizes[victim]
        used += need
        if found < hi - lo:
            for j in range(lo, hi):
                key = keys[j]
                if resident[key] == 0:
                    resident[key] = 1
                    list_append(prev, nxt, head, key)
    return hits


POLICY = Policy(
    name="fifo", description="evicts the earliest inserted expert; ties: smallest id",
    # hooks: LRU's stamps, set on insertion only
    hooks=Hooks(new_stamps, no_access, stamp, lowest_rank_victim, no_evict, always_keep), kernel=simulate,
    style={"linestyle": (0, (6, 1.5, 1, 1.5, 1, 1.5)), "marker": "^"}, rank=30)
