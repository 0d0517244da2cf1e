"""FIFO: evict the earliest inserted expert; ties (inserted by one request) -> smallest id.

Invariant: the linked list orders residents by insertion, misses of one request being
appended in ascending id order; hits do not move. The victim is the first list entry
that is not part of the current request (marked in ``current``).
"""

import numpy as np
from numba import njit

from ._state import check_room, list_append, list_new, list_unlink


@njit(cache=True, nogil=True)
def simulate(keys, offsets, sizes, capacity, seed):
    num_keys = sizes.shape[0]
    head = num_keys
    links = list_new(num_keys)
    resident = np.zeros(num_keys, np.bool_)
    current = np.full(num_keys + 1, -1, np.int64)
    hits = np.zeros(offsets.shape[0] - 1, np.int32)
    used = 0
    for r in range(hits.shape[0]):
        lo, hi = offsets[r], offsets[r + 1]
        for j in range(lo, hi):
            current[keys[j]] = r
            if resident[keys[j]]:
                hits[r] += 1
        for j in range(lo, hi):
            key = keys[j]
            if not resident[key]:
                while used + sizes[key] > capacity:
                    victim = links[1, head]
                    while current[victim] == r:
                        victim = links[1, victim]
                    if victim == head:
                        check_room(used, sizes[key], capacity)
                    list_unlink(links, victim)
                    resident[victim] = False
                    used -= sizes[victim]
                resident[key] = True
                used += sizes[key]
                list_append(links, head, key)
    return hits
