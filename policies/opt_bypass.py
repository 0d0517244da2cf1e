"""OPT-BYPASS: Belady when a fetched expert may be streamed through without being kept.

Each miss is fetched (and counted) either way; it is cached only if some resident
outside the current request is needed later than it. Misses are considered in
ascending id order; the candidate victim is the resident with the farthest next request
(ties -> smallest id, as in ``opt``), and the incoming expert competes with it under the
same order: if the incoming one is farther, it bypasses the cache. With unit sizes this
is the offline optimum when bypass is allowed (never worse than ``opt``). With mixed
expert sizes (global scope with ``memory``) the incoming expert is bypassed if it is
farther than the farthest resident, otherwise residents are evicted farthest-first
until it fits: a heuristic, not an optimum.

Invariant: slot ranks as in ``opt``; keys of the current request, cached or just
admitted, are pinned until the request ends.
"""

import numpy as np
from numba import njit

from ._state import PINNED, lowest_slot, slots_add, slots_new, slots_remove
from .opt import next_request, opt_rank


@njit(cache=True, nogil=True)
def simulate(keys, offsets, sizes, capacity, seed):
    num_keys = sizes.shape[0]
    following = next_request(keys, offsets, num_keys)
    slots, where, rank = slots_new(num_keys)
    count = 0
    hits = np.zeros(offsets.shape[0] - 1, np.int32)
    used = 0
    for r in range(hits.shape[0]):
        lo, hi = offsets[r], offsets[r + 1]
        for j in range(lo, hi):
            s = where[keys[j]]
            if s >= 0:
                hits[r] += 1
                rank[s] = PINNED
        for j in range(lo, hi):
            key = keys[j]
            if where[key] >= 0:
                continue
            if used + sizes[key] > capacity:
                if opt_rank(following[j], key, num_keys) < rank[lowest_slot(rank, count)]:
                    continue  # the incoming expert is the farthest: stream it through
                while used + sizes[key] > capacity:
                    victim = lowest_slot(rank, count)
                    used -= sizes[slots[victim]]
                    count = slots_remove(slots, where, rank, count, victim)
            count = slots_add(slots, where, rank, count, key, PINNED)
            used += sizes[key]
        for j in range(lo, hi):
            if where[keys[j]] >= 0:
                rank[where[keys[j]]] = opt_rank(following[j], keys[j], num_keys)
    return hits
