"""SIEVE: a FIFO queue swept by a hand that evicts the first unvisited expert.

As Zhang et al., "SIEVE is Simpler than LRU", NSDI'24, and libCacheSim's Sieve
(libCacheSim/cache/eviction/Sieve.c): residents stay in insertion order; a hit sets a
visited bit; new experts join the newest end unvisited. To evict, the hand, starting
where it stopped (at the oldest expert the first time and after it passed the newest),
moves from older to newer, clears the visited bits it meets and evicts the first expert
without one; it then rests on that expert's newer neighbour. Under set steps
(docs/semantics.md) the hand passes the current request's experts without clearing
their bits. On one expert per step it equals libCacheSim's hit count
(tests/test_libcachesim_b.py).

Hooks only: state = (visited bit per key, the queue as a linked list from oldest to
newest, [the hand: a key, or the list's sentinel for "start at the oldest"]).
"""

import numpy as np
from numba import njit

from ._state import list_append, list_new, list_unlink
from .registry import Hooks, Policy, always_keep


@njit(cache=True)
def init(keys, offsets, sizes, capacity, params, seed, scores):
    prev, nxt, head = list_new(sizes.shape[0])
    return np.zeros(sizes.shape[0], np.bool_), prev, nxt, np.full(1, head, np.int64)


@njit(cache=True)
def access(state, key, now, hit):
    if hit:
        state[0][key] = True


@njit(cache=True)
def admit(state, key, now):
    visited, prev, nxt, _ = state
    visited[key] = False
    list_append(prev, nxt, prev.shape[0] - 2, key)


@njit(cache=True)
def victim(state, resident, pinned, mark):
    visited, prev, nxt, hand = state
    head = prev.shape[0] - 2
    key = hand[0]
    while True:
        if key == head:  # past the newest: back to the oldest
            key = nxt[head]
        if pinned[key] != mark:
            if not visited[key]:
                return key
            visited[key] = False
        key = nxt[key]


@njit(cache=True)
def evict(state, key):
    _, prev, nxt, hand = state
    hand[0] = nxt[key]
    list_unlink(prev, nxt, key)


POLICY = Policy(
    name="sieve", description="SIEVE: a hand sweeping the insertion-ordered queue from oldest to newest "
    "evicts the first expert not hit since the hand last passed it",
    hooks=Hooks(init, access, admit, victim, evict, always_keep),
    style={"linestyle": (0, (2, 1)), "marker": "P"}, rank=52,
    source="Zhang et al., SIEVE is Simpler than LRU, NSDI 2024; libCacheSim, cache/eviction/Sieve.c")
