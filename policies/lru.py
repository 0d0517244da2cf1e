"""LRU: evict the least recently used expert; ties (same request) -> smallest id.

Invariant: the linked list orders residents from least to most recent, and the keys of
one request sit next to each other in ascending id order, so the list head is always the
victim DESIGN prescribes. During a request its own residents are taken off the list,
which makes them ineligible without any check in the eviction loop.
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
    hits = np.zeros(offsets.shape[0] - 1, np.int32)
    used = 0
    for r in range(hits.shape[0]):
        lo, hi = offsets[r], offsets[r + 1]
        for j in range(lo, hi):
            if resident[keys[j]]:
                hits[r] += 1
                list_unlink(links, keys[j])
        for j in range(lo, hi):
            key = keys[j]
            if not resident[key]:
                while used + sizes[key] > capacity:
                    victim = links[1, head]
                    if victim == head:
                        check_room(used, sizes[key], capacity)
                    list_unlink(links, victim)
                    resident[victim] = False
                    used -= sizes[victim]
                resident[key] = True
                used += sizes[key]
        for j in range(lo, hi):
            list_append(links, head, keys[j])
    return hits
