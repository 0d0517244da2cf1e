"""OPT (Belady): evict the resident whose next request is farthest (never -> +inf);
ties -> smallest id. The offline optimum under demand admission (every miss is kept).

Invariant: a resident's slot rank is ``-(next request * N + N - 1 - key)``, so the lowest
rank is the farthest next use and, among equals (never requested again), the smallest
id. Next requests come from one backward pass; current keys are pinned.
"""

import numpy as np
from numba import njit

from ._state import PINNED, lowest_rank_victim, lowest_slot, slots_add, slots_new, slots_remove
from .registry import Hooks, Policy, SpanKernel, always_keep, no_admit, no_evict


@njit(cache=True)
def next_request(keys, offsets, num_keys):
    """For each entry ``j`` of ``keys``, the next request holding ``keys[j]``, or R if none."""
    num_requests = offsets.shape[0] - 1
    upcoming = np.full(num_keys, num_requests, np.int32)
    nxt = np.empty(keys.shape[0], np.int32)  # int32 halves the memory traffic of this pass
    for r in range(num_requests - 1, -1, -1):
        for j in range(offsets[r], offsets[r + 1]):
            nxt[j] = upcoming[keys[j]]
            upcoming[keys[j]] = r
    return nxt


@njit(cache=True, inline="always")
def opt_rank(next_use, key, num_keys):
    """Eviction rank: lowest for the farthest next use, then the smallest id."""
    return -(np.int64(next_use) * num_keys + (num_keys - 1 - key))


@njit(cache=True, nogil=True)
def simulate(keys, offsets, sizes, capacity, params, seed):
    num_keys = sizes.shape[0]
    return serve_span(span_state(num_keys), keys, offsets, sizes, capacity, 0,
                      next_request(keys, offsets, num_keys))


@njit(cache=True, nogil=True)
def span_state(num_keys):
    slots, where, rank = slots_new(num_keys)
    return slots, where, rank, np.zeros(2, np.int64)  # and [count, used]


@njit(cache=True, nogil=True)
def serve_span(state, keys, offsets, sizes, capacity, first, following):
    """The requests of one span (all of them in memory); ``following[j]``: the next request
    holding ``keys[j]`` (R if none), numbered as the whole stream's."""
    slots, where, rank, scalars = state
    num_keys = where.shape[0]
    count, used = scalars[0], scalars[1]
    hits = np.zeros(offsets.shape[0] - 1, np.int32)
    for r in range(hits.shape[0]):
        lo, hi = offsets[r], offsets[r + 1]
        need = 0
        for j in range(lo, hi):
            s = where[keys[j]]
            if s >= 0:
                hits[r] += 1
                rank[s] = PINNED
            else:
                need += sizes[keys[j]]
        while used + need > capacity:
            victim = lowest_slot(rank, count)
            used -= sizes[slots[victim]]
            count = slots_remove(slots, where, rank, count, victim)
        used += need
        for j in range(lo, hi):
            key = keys[j]
            value = opt_rank(following[j], key, num_keys)
            if where[key] >= 0:
                rank[where[key]] = value
            else:
                count = slots_add(slots, where, rank, count, key, value)
    scalars[0], scalars[1] = count, used
    return hits


# -- hooks: state = (rank, uses, cursor): ``uses`` lists each key's requests of the span
# in order, each key's list ending with its next request after the span (R: never
# again), ``cursor[k]`` indexes k's next request not yet served, and rank[k] =
# -uses[cursor[k]], lowest for the farthest next request.


@njit(cache=True)
def init(keys, offsets, sizes, capacity, params, seed, scores):
    num_keys, num_requests = sizes.shape[0], offsets.shape[0] - 1
    never = np.full(num_keys, -num_requests, np.int64)  # a key the stream never requests
    blank = (never, np.zeros(num_keys, np.int64), np.zeros(num_keys, np.int64))
    following = next_request(keys, offsets, num_keys)
    return resume(blank, keys, offsets, scores, params, 0, 0, num_requests, following)


@njit(cache=True)
def resume(state, keys, offsets, scores, params, first, first_entry, total, future):
    """The lists of a span: a key the span does not hold keeps its rank."""
    rank = state[0]
    num_keys = rank.shape[0]
    starts = np.zeros(num_keys + 1, np.int64)
    for j in range(keys.shape[0]):
        starts[keys[j] + 1] += 1
    for k in range(num_keys):
        starts[k + 1] += starts[k] + 1  # one more entry per key: its next request after the span
    uses = np.empty(starts[num_keys], np.int64)
    cursor = starts[:num_keys].copy()
    for r in range(offsets.shape[0] - 1):
        for j in range(offsets[r], offsets[r + 1]):
            uses[cursor[keys[j]]] = first + r
            cursor[keys[j]] += 1
            uses[cursor[keys[j]]] = future[j]  # the last slot, unless a later entry takes it
    for k in range(num_keys):
        if cursor[k] == starts[k]:
            uses[starts[k]] = -rank[k]
    cursor[:] = starts[:num_keys]
    for k in range(num_keys):
        rank[k] = -uses[cursor[k]]
    return rank, uses, cursor


@njit(cache=True)
def access(state, key, now, hit):
    rank, uses, cursor = state
    cursor[key] += 1
    rank[key] = -uses[cursor[key]]


POLICY = Policy(
    name="opt", description="Belady: evicts the expert whose next request is farthest (never = infinitely "
    "far); ties: smallest id. The offline optimum under demand admission",
    hooks=Hooks(init, access, no_admit, lowest_rank_victim, no_evict, always_keep),
    kernel=simulate, stack="opt", resume=resume, needs_future=True, spans=SpanKernel(span_state, serve_span),
    style={"linestyle": "--", "marker": None, "linewidth": 2.2}, legend="opt (Belady, offline optimum)",
    rank=95, source="Belady, A study of replacement algorithms for a virtual-storage computer, 1966")
