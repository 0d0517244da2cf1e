"""OPT-BYPASS: Belady when a fetched expert may be streamed through without being kept.

Each miss is fetched (and counted) either way; it is cached only if some resident
outside the current request is needed later than it. The victim is the resident with
the farthest next request (ties -> smallest id), and the incoming expert itself is a
candidate: if it is the farthest (same tie-break), it bypasses the cache. With unit
sizes this is the offline optimum when bypass is allowed (it never does worse than
``opt``). With mixed expert sizes (global scope with ``memory``), the incoming expert is
bypassed if it is needed later than the farthest resident; otherwise residents are
evicted farthest-first until it fits, a heuristic rather than an optimum.

Invariant: as in ``opt``, ``next_use[k]`` is the next request index of resident ``k``.
"""

import numpy as np
from numba import njit

from ._state import check_room, slots_add, slots_new, slots_remove
from .opt import next_request


@njit(cache=True, inline="always")
def _farthest(slots, count, next_use, current, r):
    """The resident outside request ``r`` requested farthest ahead (ties: smallest id)."""
    victim = -1
    for s in range(count):
        k = slots[s]
        if current[k] == r:
            continue
        if victim < 0 or next_use[k] > next_use[victim] or (next_use[k] == next_use[victim] and k < victim):
            victim = k
    return victim


@njit(cache=True, nogil=True)
def simulate(keys, offsets, sizes, capacity, seed):
    num_keys = sizes.shape[0]
    following = next_request(keys, offsets, num_keys)
    slots, where = slots_new(num_keys)
    count = 0
    next_use = np.zeros(num_keys, np.int64)
    current = np.full(num_keys, -1, np.int64)
    hits = np.zeros(offsets.shape[0] - 1, np.int32)
    used = 0
    for r in range(hits.shape[0]):
        lo, hi = offsets[r], offsets[r + 1]
        for j in range(lo, hi):
            key = keys[j]
            if where[key] >= 0:
                hits[r] += 1
            next_use[key] = following[j]
            current[key] = r
        for j in range(lo, hi):
            key = keys[j]
            if where[key] >= 0 or sizes[key] > capacity:
                continue
            if used + sizes[key] > capacity:
                victim = _farthest(slots, count, next_use, current, r)
                if victim < 0:
                    check_room(used, sizes[key], capacity)
                if next_use[key] > next_use[victim] or (next_use[key] == next_use[victim] and key < victim):
                    continue  # the incoming expert is the farthest: stream it, keep the cache
                while used + sizes[key] > capacity:
                    victim = _farthest(slots, count, next_use, current, r)
                    if victim < 0:
                        check_room(used, sizes[key], capacity)
                    count = slots_remove(slots, where, count, victim)
                    used -= sizes[victim]
            count = slots_add(slots, where, count, key)
            used += sizes[key]
    return hits
