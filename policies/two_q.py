"""2Q (Johnson and Shasha, 2Q: a low overhead high performance buffer management
replacement algorithm, VLDB 1994; the full version), as libCacheSim's TwoQ
(libCacheSim/cache/eviction/TwoQ.c, Ain-size-ratio=0.25, Aout-size-ratio=0.5).

A new expert enters A1in, a FIFO; hits there change nothing. Experts evicted from A1in
are remembered in A1out, a FIFO of ids only (a ghost list: it holds no cache capacity)
of ``int(out x capacity)`` sizes. A miss on an expert remembered in A1out takes it out
and makes it the most recent of Am, an LRU; hits in Am make it the most recent. The
victim is A1in's oldest expert while A1in holds more than ``int(in x capacity)``,
otherwise Am's least recent. Under set steps (docs/semantics.md) the victim is the first
expert outside the current request in that queue's order, or in the other queue's when
the chosen one holds only the request's experts; A1out is cut to its size (oldest first)
when a miss is admitted, after the miss is looked up in it, so that the victims of one
admission never push that miss out of A1out first (libCacheSim looks it up before
evicting).

libCacheSim equality (tests/test_libcachesim_a.py): exact on one-expert-per-step traces
whenever ``int(in x capacity)`` is at least 1. Below that libCacheSim's TwoQ admits no
object larger than A1in, so it never caches anything (capacity 3: ids 0 0 miss twice);
here every miss is cached (demand admission), and the second 0 hits.

Hooks: state = (queue per key: -1 absent, 0 A1in, 1 Am, 2 A1out; the three queues
from policies/_queues.py, oldest or least recent first; sizes held per queue; [A1in
threshold, A1out size]; sizes).

Fast kernel (``simulate``, unit sizes): the same queues in flat arrays, without calls
through the state tuple; a request's keys carry a stamp instead of the driver's marks.
"""

import numpy as np
from numba import njit

from ._queues import move_to_tail, oldest_unpinned, queue_head, queues_new
from ._state import list_unlink, no_room
from .registry import Hooks, Param, Policy, always_keep

AIN, AM, AOUT = 0, 1, 2


@njit(cache=True)
def init(keys, offsets, sizes, capacity, params, seed, scores):
    prev, nxt = queues_new(sizes.shape[0], 3)
    limits = np.array([int(capacity * params[0]), int(capacity * params[1])], np.int64)
    return np.full(sizes.shape[0], -1, np.int64), prev, nxt, np.zeros(3, np.int64), limits, sizes


@njit(cache=True)
def place(state, key, queue):
    """Make ``key`` the newest of ``queue`` (taking it off its own queue)."""
    where, prev, nxt, held, _, sizes = state
    if where[key] >= 0:
        held[where[key]] -= sizes[key]
    move_to_tail(prev, nxt, queue_head(prev, 3, queue), key)
    where[key] = queue
    held[queue] += sizes[key]


@njit(cache=True)
def admit(state, key, now):
    where, prev, nxt, held, limits, sizes = state
    place(state, key, AM if where[key] == AOUT else AIN)
    head = queue_head(prev, 3, AOUT)
    while held[AOUT] > limits[1]:  # forget the oldest ghosts
        ghost = nxt[head]
        held[AOUT] -= sizes[ghost]
        where[ghost] = -1
        list_unlink(prev, nxt, ghost)


@njit(cache=True)
def access(state, key, now, hit):
    if hit and state[0][key] == AM:
        place(state, key, AM)


@njit(cache=True)
def victim(state, resident, pinned, mark):
    _, prev, nxt, held, limits, _ = state
    first = AIN if held[AIN] > limits[0] else AM
    key = oldest_unpinned(prev, nxt, 3, first, pinned, mark)
    return key if key >= 0 else oldest_unpinned(prev, nxt, 3, AIN + AM - first, pinned, mark)


@njit(cache=True)
def evict(state, key):
    where, prev, nxt, held, _, sizes = state
    if where[key] == AIN:
        place(state, key, AOUT)
    else:
        held[AM] -= sizes[key]
        where[key] = -1
        list_unlink(prev, nxt, key)


@njit(cache=True, nogil=True)
def simulate(keys, offsets, sizes, capacity, params, seed):
    """The hooks over flat arrays: ``where`` and the queues as theirs, ``held`` counting the
    keys on each queue (sizes are 1). Request r's keys carry ``current[key] == r`` (never
    victims); a first pass lists its misses (``missed``, ascending) and its hits in Am
    (``am_hits``, the keys ``access`` moves), without branches."""
    num_keys = sizes.shape[0]
    limit_in, limit_out = int(capacity * params[0]), int(capacity * params[1])
    prev, nxt = queues_new(num_keys, 3)
    am_head, out_head = queue_head(prev, 3, AM), queue_head(prev, 3, AOUT)
    where = np.full(num_keys, -1, np.int64)
    held = np.zeros(3, np.int64)
    current = np.full(num_keys, -1, np.int64)
    missed = np.empty(num_keys, np.int64)
    am_hits = np.empty(num_keys, np.int64)
    hits = np.zeros(offsets.shape[0] - 1, np.int32)
    for r in range(hits.shape[0]):
        lo, hi = offsets[r], offsets[r + 1]
        if hi - lo > capacity:
            no_room()
        num_missed = 0
        num_am = 0
        for j in range(lo, hi):
            key = keys[j]
            current[key] = r
            missed[num_missed] = key
            num_missed += (where[key] < AIN) | (where[key] == AOUT)
            am_hits[num_am] = key
            num_am += where[key] == AM
        hits[r] = hi - lo - num_missed
        for i in range(num_missed):
            key = missed[i]
            if held[AIN] + held[AM] == capacity:  # victim and evict
                first = AIN if held[AIN] > limit_in else AM
                out = oldest_unpinned(prev, nxt, 3, first, current, r)
                if out < 0:  # the other queue has one: the request fits the capacity
                    first = AIN + AM - first
                    out = oldest_unpinned(prev, nxt, 3, first, current, r)
                held[first] -= 1
                if first == AIN:
                    move_to_tail(prev, nxt, out_head, out)
                    where[out] = AOUT
                    held[AOUT] += 1
                else:
                    list_unlink(prev, nxt, out)
                    where[out] = -1
            queue = AIN  # admit
            if where[key] == AOUT:
                queue = AM
                held[AOUT] -= 1
            move_to_tail(prev, nxt, queue_head(prev, 3, queue), key)
            where[key] = queue
            held[queue] += 1
            while held[AOUT] > limit_out:
                ghost = nxt[out_head]
                list_unlink(prev, nxt, ghost)
                where[ghost] = -1
                held[AOUT] -= 1
        for i in range(num_am):  # access
            move_to_tail(prev, nxt, am_head, am_hits[i])
    return hits


POLICY = Policy(
    name="2q", description="2Q: new experts enter a FIFO (A1in); a miss remembered by its ghost list "
    "(A1out) enters an LRU (Am); evicts from A1in while it is over its share, else from Am",
    hooks=Hooks(init, access, admit, victim, evict, always_keep), kernel=simulate, unit_kernel=True,
    params=(Param("in", 0.25, 0.0, 1.0, "A1in's share of the capacity"),
            Param("out", 0.5, 0.0, 10.0, "A1out's size (ghost ids) as a multiple of the capacity")),
    style={"linestyle": (0, (4, 2, 1, 2)), "marker": "p"}, rank=46,
    source="Johnson, Shasha, VLDB 1994; libCacheSim, cache/eviction/TwoQ.c (TwoQ, Ain-size-ratio=0.25, "
    "Aout-size-ratio=0.5)")
