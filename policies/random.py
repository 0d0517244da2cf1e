"""RANDOM: evict a uniformly random resident outside the current request, seeded.

The generator is splitmix64 (so results do not depend on NumPy or numba versions).
Misses are admitted one by one in ascending id order; each eviction draws
``slot = next() % residents`` over the resident slot array (swap-remove on eviction,
append on admission) and redraws while the slot holds a key of the current request.
"""

import numpy as np
from numba import njit, uint64

from ._state import no_room, slots_add, slots_new, slots_remove
from .registry import Hooks, Policy, always_keep, no_access

_GOLDEN = uint64(0x9E3779B97F4A7C15)
_MIX1 = uint64(0xBF58476D1CE4E5B9)
_MIX2 = uint64(0x94D049BB133111EB)


@njit(cache=True, inline="always")
def splitmix64(state):
    """Returns (new state, output)."""
    state = state + _GOLDEN
    z = state
    z = (z ^ (z >> uint64(30))) * _MIX1
    z = (z ^ (z >> uint64(27))) * _MIX2
    return state, z ^ (z >> uint64(31))


@njit(cache=True, nogil=True)
def simulate(keys, offsets, sizes, capacity, params, seed):
    num_keys = sizes.shape[0]
    slots, where, rank = slots_new(num_keys)
    count = 0
    current = np.full(num_keys, -1, np.int64)
    state = uint64(seed)
    hits = np.zeros(offsets.shape[0] - 1, np.int32)
    used = 0
    for r in range(hits.shape[0]):
        lo, hi = offsets[r], offsets[r + 1]
        for j in range(lo, hi):
            current[keys[j]] = r
            if where[keys[j]] >= 0:
                hits[r] += 1
        candidates = count - hits[r]
        for j in range(lo, hi):
            key = keys[j]
            if where[key] >= 0:
                continue
            while used + sizes[key] > capacity:
                if candidates <= 0:
                    no_room()
                while True:
                    state, draw = splitmix64(state)
                    index = np.int64(draw % uint64(count))
                    if current[slots[index]] != r:
                        break
                used -= sizes[slots[index]]
                count = slots_remove(slots, where, rank, count, index)
                candidates -= 1
            count = slots_add(slots, where, rank, count, key, 0)
            used += sizes[key]
    return hits


# -- hooks: state = (slots, where, rank (unused), [count], [generator state]), the slot
# array of the kernel: append on admission, swap-remove on eviction


@njit(cache=True)
def init(keys, offsets, sizes, capacity, params, seed, scores):
    slots, where, rank = slots_new(sizes.shape[0])
    return slots, where, rank, np.zeros(1, np.int64), np.full(1, seed, np.uint64)


@njit(cache=True)
def admit(state, key, now):
    slots, where, rank, count, _ = state
    count[0] = slots_add(slots, where, rank, count[0], key, 0)


@njit(cache=True)
def victim(state, resident, pinned, mark):
    slots, _, _, count, generator = state
    while True:
        generator[0], draw = splitmix64(generator[0])
        key = slots[np.int64(draw % uint64(count[0]))]
        if pinned[key] != mark:
            return key


@njit(cache=True)
def evict(state, key):
    slots, where, rank, count, _ = state
    count[0] = slots_remove(slots, where, rank, count[0], where[key])


POLICY = Policy(
    name="random", description="evicts a uniformly random resident outside the request, seeded "
    "(splitmix64 over the resident slot array, redrawn while it hits a pinned key)",
    hooks=Hooks(init, no_access, admit, victim, evict, always_keep), kernel=simulate,
    style={"linestyle": (0, (3, 1.5)), "marker": "x"}, rank=40)
