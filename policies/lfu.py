"""LFU: evict the fewest uses over the whole history (counts survive eviction);
ties -> least recently used, then smallest id.

Invariant: ``uses[k]`` counts the requests that contained ``k`` so far and ``last[k]`` is
the latest of them; the victim minimises (uses, last, key) over residents outside the
current request, found by a scan of the resident slots.
"""

import numpy as np
from numba import njit

from ._state import check_room, slots_add, slots_new, slots_remove


@njit(cache=True, nogil=True)
def simulate(keys, offsets, sizes, capacity, seed):
    num_keys = sizes.shape[0]
    slots, where = slots_new(num_keys)
    count = 0
    uses = np.zeros(num_keys, np.int64)
    last = np.full(num_keys, -1, np.int64)
    hits = np.zeros(offsets.shape[0] - 1, np.int32)
    used = 0
    for r in range(hits.shape[0]):
        lo, hi = offsets[r], offsets[r + 1]
        for j in range(lo, hi):
            key = keys[j]
            if where[key] >= 0:
                hits[r] += 1
            uses[key] += 1
            last[key] = r
        for j in range(lo, hi):
            key = keys[j]
            if where[key] < 0:
                while used + sizes[key] > capacity:
                    victim = -1
                    for s in range(count):
                        k = slots[s]
                        if last[k] == r:
                            continue
                        if (victim < 0 or uses[k] < uses[victim]
                                or (uses[k] == uses[victim]
                                    and (last[k] < last[victim]
                                         or (last[k] == last[victim] and k < victim)))):
                            victim = k
                    if victim < 0:
                        check_room(used, sizes[key], capacity)
                    count = slots_remove(slots, where, count, victim)
                    used -= sizes[victim]
                count = slots_add(slots, where, count, key)
                used += sizes[key]
    return hits
