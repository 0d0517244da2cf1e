"""S3-FIFO: a small probationary FIFO, a main FIFO with reinsertion, and a ghost FIFO.

As Yang et al., "FIFO queues are all you need for cache eviction", SOSP'23, in
libCacheSim's S3FIFO (libCacheSim/cache/eviction/S3FIFO.c, small-size-ratio=0.1,
ghost-size-ratio=0.9, move-to-main-threshold=2). With capacity C, the small queue's
share is S = floor(small x C), the main queue's C - S, and the ghost remembers the ids
of up to floor(ghost x C) (in size units) experts evicted from the small queue; it holds
no cache capacity. Each hit raises an expert's counter. A new expert enters the main
queue if the ghost remembers it, otherwise the small queue (the main queue while the
small one is full before the first eviction ever). To evict: from the main queue when it
is over its share or the small queue is empty, else from the small queue. The small
queue's oldest expert moves to the main queue (counter 0) if its counter reached
``threshold``, else it is evicted and remembered by the ghost (its oldest ids forgotten
first); the main queue's oldest expert is reinserted as its newest with counter
min(counter, 3) - 1 if its counter is positive, else evicted. Both repeat until one
expert is evicted.

Set steps (docs/semantics.md): a request's experts that the ghost remembers leave it when
the request arrives (before its prefetch batch and evictions, as libCacheSim's lookup
precedes its evictions) and enter the main queue when admitted; a prefetched expert the
ghost remembers also enters the main queue. The sweeps pass the current request's
experts without moving them or touching their counters, and "the small queue is empty"
reads "holds none of the other experts". With a memory budget the shares are floors in
units of the greatest common divisor of the experts' sizes, the driver's unit (whole
experts when all sizes are equal).

Against libCacheSim (tests/test_libcachesim_b.py): the same hits on one expert per step
whenever S >= 2. libCacheSim does not cache a new object whose size is at least the
small queue's (S3FIFO_insert), so with S <= 1 (C < 20 at the default share) it caches
nothing but ghost hits, i.e. nothing; here the small queue may then hold one expert or
none: the request 0, 0 at C = 10 is one hit here and none in libCacheSim.

Hooks only: state = (queue of each key, counters, the three queues as linked lists, used
size and share of each queue, the request at which each key left the ghost on arrival,
[evicted yet, the last request arrived, threshold], the request stream, sizes).
"""

import numpy as np
from numba import njit

from ._queues import move_to_tail, oldest_unpinned, queue_head, queues_new, sized_move, sized_remove
from .registry import Hooks, Param, Policy, always_keep

SMALL, MAIN, GHOST, QUEUES = 0, 1, 2, 3
NONE = -1  # not on any queue
EVICTED, ARRIVED, THRESHOLD = range(3)


@njit(cache=True)
def init(keys, offsets, sizes, capacity, params, seed, scores):
    num_keys = sizes.shape[0]
    prev, nxt = queues_new(num_keys, QUEUES)
    small = np.int64(capacity * params[0])
    share = np.array([small, capacity - small, np.int64(capacity * params[1])], np.int64)
    misc = np.array([0, -1, np.int64(params[2])], np.int64)
    return (np.full(num_keys, NONE, np.int64), np.zeros(num_keys, np.int64), prev, nxt,
            np.zeros(QUEUES, np.int64), share, np.full(num_keys, -1, np.int64), misc, keys, offsets, sizes)


@njit(cache=True)
def enqueue(state, key, queue):
    where, _, prev, nxt, used, _, _, _, _, _, sizes = state
    sized_move(where, prev, nxt, used, sizes, QUEUES, key, queue)


@njit(cache=True)
def dequeue(state, key):
    where, _, prev, nxt, used, _, _, _, _, _, sizes = state
    sized_remove(where, prev, nxt, used, sizes, key)


@njit(cache=True)
def arrive(state, now):
    """Request ``now``'s experts that the ghost remembers leave it (once per request)."""
    where, _, _, _, _, _, left, misc, keys, offsets, _ = state
    if misc[ARRIVED] == now:
        return
    misc[ARRIVED] = now
    for j in range(offsets[now], offsets[now + 1]):
        key = keys[j]
        if where[key] == GHOST:
            dequeue(state, key)
            left[key] = now


@njit(cache=True)
def access(state, key, now, hit):
    if hit:
        state[1][key] += 1


@njit(cache=True)
def admit(state, key, now):
    where, counter, _, _, used, share, left, misc, _, _, _ = state
    arrive(state, now)
    counter[key] = 0
    if left[key] == now or where[key] == GHOST:
        enqueue(state, key, MAIN)
    elif misc[EVICTED] == 0 and used[SMALL] >= share[SMALL]:
        enqueue(state, key, MAIN)
    else:
        enqueue(state, key, SMALL)


@njit(cache=True)
def holds_other(state, queue, pinned, mark):
    """Whether ``queue`` holds a key outside the current request."""
    return oldest_unpinned(state[2], state[3], QUEUES, queue, pinned, mark) >= 0


@njit(cache=True)
def sweep_small(state, pinned, mark):
    """The small queue's first evictable expert from the oldest, moving those whose counter
    reached the threshold to the main queue; -1 if none is left."""
    _, counter, prev, nxt, _, _, _, misc, _, _, _ = state
    head = queue_head(prev, QUEUES, SMALL)
    key = nxt[head]
    while key != head:
        after = nxt[key]
        if pinned[key] != mark:
            if counter[key] < misc[THRESHOLD]:
                return key
            counter[key] = 0
            enqueue(state, key, MAIN)
        key = after
    return -1


@njit(cache=True)
def sweep_main(state, pinned, mark):
    """The main queue's first expert with counter 0 from the oldest, reinserting the others
    with their counter lowered (the queue holds a key outside the request)."""
    _, counter, prev, nxt, _, _, _, _, _, _, _ = state
    head = queue_head(prev, QUEUES, MAIN)
    key = nxt[head]
    while True:
        if key == head:
            key = nxt[head]
        after = nxt[key]
        if pinned[key] != mark:
            if counter[key] == 0:
                return key
            counter[key] = min(counter[key], 3) - 1
            move_to_tail(prev, nxt, head, key)
        key = after


@njit(cache=True)
def victim(state, resident, pinned, mark):
    used, share, misc = state[4], state[5], state[7]
    arrive(state, mark >> 1)
    misc[EVICTED] = 1
    while True:
        main = used[MAIN] > share[MAIN] or not holds_other(state, SMALL, pinned, mark)
        if main and holds_other(state, MAIN, pinned, mark):
            return sweep_main(state, pinned, mark)
        key = sweep_small(state, pinned, mark)
        if key >= 0:
            return key


@njit(cache=True)
def evict(state, key):
    where, _, prev, nxt, used, share, _, _, _, _, sizes = state
    small = where[key] == SMALL
    dequeue(state, key)
    if small and sizes[key] <= share[GHOST]:
        ghost = queue_head(prev, QUEUES, GHOST)
        while used[GHOST] + sizes[key] > share[GHOST]:
            dequeue(state, nxt[ghost])
        enqueue(state, key, GHOST)


POLICY = Policy(
    name="s3fifo", description="S3-FIFO: new experts wait in a small FIFO; those hit there move to a "
    "main FIFO with reinsertion (2-bit counter); a ghost of the small queue's evictions admits "
    "returning experts to the main queue",
    hooks=Hooks(init, access, admit, victim, evict, always_keep),
    params=(Param("small", 0.1, 0.0, 1.0, "the small queue's share of the capacity"),
            Param("ghost", 0.9, 0.0, 4.0, "the ghost's size as a share of the capacity (ids only)"),
            Param("threshold", 2, 1, 16, "hits in the small queue that move an expert to the main queue",
                  integer=True)),
    style={"linestyle": (0, (4, 1, 1, 1)), "marker": "X"}, rank=54,
    source="Yang et al., FIFO queues are all you need for cache eviction, SOSP 2023; "
    "libCacheSim, cache/eviction/S3FIFO.c")
