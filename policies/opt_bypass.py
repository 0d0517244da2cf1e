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

from . import opt
from ._state import (
    PINNED,
    lowest_candidate,
    lowest_rank_victim,
    lowest_slot,
    slots_add,
    slots_new,
    slots_remove,
)
from .opt import next_request, opt_rank
from .registry import Hooks, Policy, no_admit, no_evict


@njit(cache=True, nogil=True)
def simulate(keys, offsets, sizes, capacity, params, seed):
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


@njit(cache=True)
def keep(state, key, now, resident, pinned, mark):
    """Cache the miss ``key`` (not yet accessed at ``now``) unless it is needed later than
    every candidate victim (ties: the smaller id is the farther)."""
    rank, uses, cursor = state
    farthest = lowest_candidate(rank, resident, pinned, mark)
    incoming = -uses[cursor[key] + 1]
    return farthest >= 0 and (rank[farthest] < incoming or (rank[farthest] == incoming and farthest < key))


POLICY = Policy(
    name="opt-bypass", description="as opt, but a miss is cached only if some resident outside the "
    "request is needed later than it; otherwise it is streamed through (fetched, not kept)",
    hooks=Hooks(opt.init, opt.access, no_admit, lowest_rank_victim, no_evict, keep), kernel=simulate,
    resume=opt.resume, needs_future=True,
    admission="bypass", style={"linestyle": (0, (8, 2, 2, 2)), "marker": "D"},
    legend="opt-bypass (Belady\nwith bypass)", rank=90)
