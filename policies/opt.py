"""OPT (Belady): evict the resident whose next request is farthest (never -> +inf);
ties -> smallest id. The offline optimum under demand admission (every miss is kept).

Invariant: ``next_use[k]`` is, for a resident ``k``, the index of the next request that
contains it (``never`` if none); one backward pass gives it for every entry of ``keys``.
"""

import numpy as np
from numba import njit

from ._state import check_room, slots_add, slots_new, slots_remove


@njit(cache=True)
def next_request(keys, offsets, num_keys):
    """For each entry ``j`` of ``keys``, the next request holding ``keys[j]``, or R if none."""
    num_requests = offsets.shape[0] - 1
    upcoming = np.full(num_keys, num_requests, np.int64)
    nxt = np.empty(keys.shape[0], np.int64)
    for r in range(num_requests - 1, -1, -1):
        for j in range(offsets[r], offsets[r + 1]):
            nxt[j] = upcoming[keys[j]]
            upcoming[keys[j]] = r
    return nxt


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
            if where[key] < 0:
                while used + sizes[key] > capacity:
                    victim = -1
                    for s in range(count):
                        k = slots[s]
                        if current[k] == r:
                            continue
                        if (victim < 0 or next_use[k] > next_use[victim]
                                or (next_use[k] == next_use[victim] and k < victim)):
                            victim = k
                    if victim < 0:
                        check_room(used, sizes[key], capacity)
                    count = slots_remove(slots, where, count, victim)
                    used -= sizes[victim]
                count = slots_add(slots, where, count, key)
                used += sizes[key]
    return hits
