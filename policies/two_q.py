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

Hooks only: state = (queue per key: -1 absent, 0 A1in, 1 Am, 2 A1out; the three queues
from policies/_queues.py, oldest or least recent first; sizes held per queue; [A1in
threshold, A1out size]; sizes).
"""

import numpy as np
from numba import njit

from ._queues import move_to_tail, oldest_unpinned, queue_head, queues_new
from ._state import list_unlink
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


POLICY = Policy(
    name="2q", description="2Q: new experts enter a FIFO (A1in); a miss remembered by its ghost list "
    "(A1out) enters an LRU (Am); evicts from A1in while it is over its share, else from Am",
    hooks=Hooks(init, access, admit, victim, evict, always_keep),
    params=(Param("in", 0.25, 0.0, 1.0, "A1in's share of the capacity"),
            Param("out", 0.5, 0.0, 10.0, "A1out's size (ghost ids) as a multiple of the capacity")),
    style={"linestyle": (0, (4, 2, 1, 2)), "marker": "p"}, rank=46,
    source="Johnson, Shasha, VLDB 1994; libCacheSim, cache/eviction/TwoQ.c (TwoQ, Ain-size-ratio=0.25, "
    "Aout-size-ratio=0.5)")
