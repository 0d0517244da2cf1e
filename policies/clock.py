"""CLOCK (second chance): FIFO that gives referenced experts another round.

As libCacheSim's Clock (libCacheSim/cache/eviction/Clock.c, n-bit-counter=1): residents
sit in a ring in insertion order, each with a counter of ``bits`` bits (at most
2**(bits-1)); an expert enters just behind the hand with counter 0, a hit raises its
counter by one up to the maximum, and the hand, starting where it stopped, evicts the
first expert with counter 0, decrementing the counters it passes. Under set steps
(docs/semantics.md) the hand passes the current request's experts without touching
them.

Hooks only (no fast kernel): state = (counter per key, ring as a linked list whose head
side is the hand, [maximum counter]); passing an expert moves it to the ring's tail.
"""

import numpy as np
from numba import njit

from ._state import list_append, list_new, list_unlink
from .registry import Hooks, Param, Policy, always_keep


@njit(cache=True)
def init(keys, offsets, sizes, capacity, params, seed, scores):
    prev, nxt, _ = list_new(sizes.shape[0])
    top = np.full(1, 1 << (int(params[0]) - 1), np.int64)
    return np.zeros(sizes.shape[0], np.int64), prev, nxt, top


@njit(cache=True)
def access(state, key, now, hit):
    counter, _, _, top = state
    if hit and counter[key] < top[0]:
        counter[key] += 1


@njit(cache=True)
def admit(state, key, now):
    counter, prev, nxt, _ = state
    counter[key] = 0
    list_append(prev, nxt, prev.shape[0] - 2, key)


@njit(cache=True)
def victim(state, resident, pinned, mark):
    counter, prev, nxt, _ = state
    head = prev.shape[0] - 2
    while True:
        key = nxt[head]
        if pinned[key] != mark:
            if counter[key] == 0:
                return key
            counter[key] -= 1
        list_unlink(prev, nxt, key)
        list_append(prev, nxt, head, key)


@njit(cache=True)
def evict(state, key):
    list_unlink(state[1], state[2], key)


POLICY = Policy(
    name="clock", description="CLOCK (second chance): the hand evicts the first expert whose reference "
    "counter is 0, decrementing those it passes; hits raise the counter, new experts enter with 0",
    hooks=Hooks(init, access, admit, victim, evict, always_keep),
    params=(Param("bits", 1, 1, 8, "bits of the reference counter (1: second chance)", integer=True),),
    style={"linestyle": (0, (1, 1)), "marker": "v"}, rank=50,
    source="libCacheSim, cache/eviction/Clock.c (Clock, n-bit-counter=1)")
