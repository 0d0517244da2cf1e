"""LFU: evict the fewest uses over the whole history (counts survive eviction);
ties -> least recently used, then smallest id.

Invariant: ``uses[k]`` counts the requests that contained ``k`` so far; a resident's
slot rank is ``uses * (R + 1) + last request``, so the lowest rank is the victim up to
the final tie on the id (equal ranks only share a request), settled by a second scan.
Keys of the current request are pinned.
"""

import numpy as np
from numba import njit

from ._state import PINNED, lowest_rank_victim, lowest_slot, slots_add, slots_new, slots_remove
from .registry import Hooks, Policy, always_keep, no_admit, no_evict


@njit(cache=True, nogil=True)
def simulate(keys, offsets, sizes, capacity, params, seed):
    num_keys = sizes.shape[0]
    slots, where, rank = slots_new(num_keys)
    count = 0
    uses = np.zeros(num_keys, np.int64)
    scale = offsets.shape[0]
    hits = np.zeros(offsets.shape[0] - 1, np.int32)
    used = 0
    for r in range(hits.shape[0]):
        lo, hi = offsets[r], offsets[r + 1]
        need = 0
        for j in range(lo, hi):
            key = keys[j]
            uses[key] += 1
            s = where[key]
            if s >= 0:
                hits[r] += 1
                rank[s] = PINNED
            else:
                need += sizes[key]
        while used + need > capacity:
            victim = lowest_slot(rank, count)
            for s in range(victim + 1, count):
                if rank[s] == rank[victim] and slots[s] < slots[victim]:
                    victim = s
            used -= sizes[slots[victim]]
            count = slots_remove(slots, where, rank, count, victim)
        used += need
        for j in range(lo, hi):
            key = keys[j]
            value = uses[key] * scale + r
            if where[key] >= 0:
                rank[where[key]] = value
            else:
                count = slots_add(slots, where, rank, count, key, value)
    return hits


# -- hooks: state = (rank, uses) per key and the scale R + 1 (one element); rank =
# uses * (R + 1) + last use + 1 orders as the kernel does, 0 for a key never requested


@njit(cache=True)
def init(keys, offsets, sizes, capacity, params, seed, scores):
    num_keys = sizes.shape[0]
    return np.zeros(num_keys, np.int64), np.zeros(num_keys, np.int64), np.full(1, offsets.shape[0], np.int64)


@njit(cache=True)
def resume(state, keys, offsets, scores, params, first, first_entry, total, future):
    """The scale is the length of the whole stream, R + 1."""
    state[2][0] = total + 1
    return state


@njit(cache=True)
def access(state, key, now, hit):
    rank, uses, scale = state
    uses[key] += 1
    rank[key] = uses[key] * scale[0] + now + 1


POLICY = Policy(
    name="lfu", description="evicts the fewest uses over the whole history (counts survive eviction); "
    "ties: least recent, then smallest id",
    hooks=Hooks(init, access, no_admit, lowest_rank_victim, no_evict, always_keep),
    kernel=simulate, stack="lfu", resume=resume,
    style={"linestyle": "-.", "marker": "s"}, rank=20)
