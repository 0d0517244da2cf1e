"""ARC: adaptive replacement between a recency list and a frequency list with ghosts.

As Megiddo and Modha, "ARC: A Self-Tuning, Low Overhead Replacement Cache", FAST'03, in
libCacheSim's ARC (libCacheSim/cache/eviction/ARC.c). Residents are in T1 (seen once
since they entered) or T2 (hit since), each in LRU order; B1 and B2 remember the ids of
experts evicted from T1 and T2 (no cache capacity). A target p for T1's size starts at
0. A request for an expert in B1 raises p by max(|B2| / |B1|, 1) (at most C), one in B2
lowers it by max(|B1| / |B2|, 1) (at least 0); the expert leaves the ghost and enters T2
when admitted. A hit moves an expert to T2's most recent end, a new expert enters T1's.
To make room for a ghost hit, REPLACE evicts T1's least recent expert to B1 if
|T1| > p (or |T1| = p and the hit was in B2) or T2 is empty, else T2's to B2. For an
expert in no list: if |T1| + |B1| plus its size exceeds C, B1's oldest id is dropped
and REPLACE runs, or, with B1 empty, T1's least recent expert is evicted with no ghost
entry; otherwise, once |T1| + |B1| + |T2| + |B2| >= 2C, B2's oldest id is dropped, then
REPLACE runs. Sizes |.| are in size units (experts at unit size).

Set steps (docs/semantics.md): a request's experts found in B1 or B2 adapt p in
ascending id and leave the ghosts when the request arrives (before its prefetch batch
and evictions, as libCacheSim's lookup precedes its evictions). An eviction serves the
request's smallest expert not resident, its next miss (during a prefetch batch the same
expert; none: case "no list" with size 0); a prefetched expert that a ghost still holds
adapts p, leaves it and enters T2. "Least recent expert", "empty" and "has one" count
only experts outside the request. With a memory budget, sizes and p are in units of the
greatest common divisor of the experts' sizes, the driver's unit.

Against libCacheSim (tests/test_libcachesim_b.py): the same hits on one expert per step.

Hooks only: state = (list of each key, the four lists as linked lists, their sizes, [p],
request at which each key left a ghost on arrival, whether from B2, [last request
arrived, capacity, key to evict without a ghost entry], the request stream, sizes).
"""

import numpy as np
from numba import njit

from ._queues import oldest_unpinned, queue_head, queues_new, sized_move, sized_remove
from .registry import Hooks, Policy, always_keep

T1, T2, B1, B2, LISTS = 0, 1, 2, 3, 4
NONE = -1
ARRIVED, CAPACITY, GHOSTLESS = range(3)


@njit(cache=True)
def init(keys, offsets, sizes, capacity, params, seed, scores):
    num_keys = sizes.shape[0]
    prev, nxt = queues_new(num_keys, LISTS)
    return (np.full(num_keys, NONE, np.int64), prev, nxt, np.zeros(LISTS, np.int64), np.zeros(1),
            np.full(num_keys, -1, np.int64), np.zeros(num_keys, np.bool_),
            np.array([-1, capacity, NONE], np.int64), keys, offsets, sizes)


@njit(cache=True)
def enqueue(state, key, where_to):
    where, prev, nxt, used, _, _, _, _, _, _, sizes = state
    sized_move(where, prev, nxt, used, sizes, LISTS, key, where_to)


@njit(cache=True)
def dequeue(state, key):
    where, prev, nxt, used, _, _, _, _, _, _, sizes = state
    sized_remove(where, prev, nxt, used, sizes, key)


@njit(cache=True)
def ghost_hit(state, key):
    """Adapt p to a request for ``key`` in B1 or B2 and drop it from the ghost."""
    where, used, p, misc = state[0], state[3], state[4], state[7]
    if where[key] == B1:
        p[0] = min(p[0] + max(used[B2] / used[B1], 1.0), misc[CAPACITY])
    else:
        p[0] = max(p[0] - max(used[B1] / used[B2], 1.0), 0.0)
    dequeue(state, key)


@njit(cache=True)
def arrive(state, now):
    """Request ``now``'s experts in a ghost adapt p and leave it (once per request)."""
    where, _, _, _, _, left, from_b2, misc, keys, offsets, _ = state
    if misc[ARRIVED] == now:
        return
    misc[ARRIVED] = now
    for j in range(offsets[now], offsets[now + 1]):
        key = keys[j]
        if where[key] == B1 or where[key] == B2:
            from_b2[key] = where[key] == B2
            left[key] = now
            ghost_hit(state, key)


@njit(cache=True)
def access(state, key, now, hit):
    if hit:
        enqueue(state, key, T2)


@njit(cache=True)
def admit(state, key, now):
    where, left = state[0], state[5]
    arrive(state, now)
    if left[key] == now:
        enqueue(state, key, T2)
    elif where[key] == B1 or where[key] == B2:
        ghost_hit(state, key)
        enqueue(state, key, T2)
    else:
        enqueue(state, key, T1)


@njit(cache=True)
def least_recent(state, which, pinned, mark):
    """The least recent key of list ``which`` outside the request; -1 if none."""
    return oldest_unpinned(state[1], state[2], LISTS, which, pinned, mark)


@njit(cache=True)
def replace(state, pinned, mark, in_b2):
    used, p = state[3], state[4]
    t1 = least_recent(state, T1, pinned, mark)
    t2 = least_recent(state, T2, pinned, mark)
    if (t1 >= 0 and (used[T1] > p[0] or (used[T1] == p[0] and in_b2))) or t2 < 0:
        return t1
    return t2


@njit(cache=True)
def victim(state, resident, pinned, mark):
    _, prev, nxt, used, _, left, from_b2, misc, keys, offsets, sizes = state
    now = mark >> 1
    arrive(state, now)
    size = 0
    for j in range(offsets[now], offsets[now + 1]):
        if not resident[keys[j]]:
            if left[keys[j]] == now:
                return replace(state, pinned, mark, from_b2[keys[j]])
            size = sizes[keys[j]]
            break
    capacity = misc[CAPACITY]
    if used[T1] + used[B1] + size > capacity:
        if used[B1] > 0:
            dequeue(state, nxt[queue_head(prev, LISTS, B1)])
        else:
            key = least_recent(state, T1, pinned, mark)
            if key >= 0:
                misc[GHOSTLESS] = key
                return key
    elif used.sum() >= 2 * capacity and used[B2] > 0:
        dequeue(state, nxt[queue_head(prev, LISTS, B2)])
    return replace(state, pinned, mark, False)


@njit(cache=True)
def evict(state, key):
    where, misc = state[0], state[7]
    ghost = B1 if where[key] == T1 else B2
    dequeue(state, key)
    if misc[GHOSTLESS] == key:
        misc[GHOSTLESS] = NONE
    else:
        enqueue(state, key, ghost)


POLICY = Policy(
    name="arc", description="ARC: recency (T1) and frequency (T2) lists whose split adapts to hits in "
    "ghost lists of their evictions",
    hooks=Hooks(init, access, admit, victim, evict, always_keep),
    style={"linestyle": (0, (5, 1, 1, 1, 1, 1)), "marker": "d"}, rank=56,
    source="Megiddo and Modha, ARC: A Self-Tuning, Low Overhead Replacement Cache, FAST 2003; "
    "libCacheSim, cache/eviction/ARC.c")
