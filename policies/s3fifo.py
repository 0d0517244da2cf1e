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

Hooks: state = (queue of each key, counters, the three queues as linked lists, used
size and share of each queue, the request at which each key left the ghost on arrival,
[evicted yet, the last request arrived, threshold], the request stream, sizes).

Fast kernel (``simulate``, unit sizes), two exact implementations of the hooks:

* masks (at most 64 keys): each queue in a window of 64 cells with 64-bit masks held in
  locals (no per-queue arrays), so that a sweep of the main queue finds its victim at once
  and moves only the keys it passes, and a request's keys are pinned without a branch;
  its indices are unsigned (``_index.cell``: numba skips its negative-index wraparound);
* list (any number of keys): the hooks' linked queues in flat arrays.
"""

import numpy as np
from numba import njit, uint64

from ._index import cell
from ._queues import move_to_tail, oldest_unpinned, queue_head, queues_new, sized_move, sized_remove
from ._state import bit_index, list_append, list_unlink, no_room, popcount
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
            np.zeros(QUEUES, np.int64), share, np.full(num_keys, -1, np.int64), misc, keys, offsets, sizes,
            np.zeros(1, np.int64))


@njit(cache=True)
def resume(state, keys, offsets, scores, params, first, first_entry, total, future):
    """The hooks read the current request's keys: those of the span, from request ``first``."""
    a, b, c, d, e, f, g, h, _, _, sizes, _ = state
    return a, b, c, d, e, f, g, h, keys, offsets, sizes, np.full(1, first, np.int64)


@njit(cache=True)
def enqueue(state, key, queue):
    where, _, prev, nxt, used, _, _, _, _, _, sizes, _ = state
    sized_move(where, prev, nxt, used, sizes, QUEUES, key, queue)


@njit(cache=True)
def dequeue(state, key):
    where, _, prev, nxt, used, _, _, _, _, _, sizes, _ = state
    sized_remove(where, prev, nxt, used, sizes, key)


@njit(cache=True)
def arrive(state, now):
    """Request ``now``'s experts that the ghost remembers leave it (once per request)."""
    where, _, _, _, _, _, left, misc, keys, offsets, _, first = state
    if misc[ARRIVED] == now:
        return
    misc[ARRIVED] = now
    for j in range(offsets[now - first[0]], offsets[now + 1 - first[0]]):
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
    where, counter, _, _, used, share, left, misc, _, _, _, _ = state
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
    _, counter, prev, nxt, _, _, _, misc, _, _, _, _ = state
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
    _, counter, prev, nxt, _, _, _, _, _, _, _, _ = state
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
    where, _, prev, nxt, used, share, _, _, _, _, sizes, _ = state
    small = where[key] == SMALL
    dequeue(state, key)
    if small and sizes[key] <= share[GHOST]:
        ghost = queue_head(prev, QUEUES, GHOST)
        while used[GHOST] + sizes[key] > share[GHOST]:
            dequeue(state, nxt[ghost])
        enqueue(state, key, GHOST)


@njit(cache=True, nogil=True)
def simulate(keys, offsets, sizes, capacity, params, seed):
    small_share, ghost_share = np.int64(capacity * params[0]), np.int64(capacity * params[1])
    threshold = np.int64(params[2])
    if sizes.shape[0] <= 64:
        return simulate_masks(keys, offsets, capacity, small_share, ghost_share, threshold)
    return simulate_list(keys, offsets, sizes.shape[0], capacity, small_share, ghost_share, threshold)


# Both kernels serve request r as the driver runs the hooks, sizes being 1. A first pass
# raises the counters of its hits (nothing reads them before ``access``), lists its misses
# and counts (``held``) or marks (``pin``) its keys on each queue: those are never victims
# and the sweeps pass them without moving them. The ghost forgets the request's keys
# before any eviction (``arrive``); they keep ``where == GHOST`` until admitted, which
# sends them to the main queue. ``where`` is ABSENT for a key on no queue.

ABSENT = 3


@njit(cache=True, nogil=True)
def simulate_list(keys, offsets, num_keys, capacity, small_share, ghost_share, threshold):
    """The hooks' linked queues; request r's keys carry ``current[key] == r``."""
    main_share = capacity - small_share
    prev, nxt = queues_new(num_keys, QUEUES)
    small_head = queue_head(prev, QUEUES, SMALL)
    main_head = queue_head(prev, QUEUES, MAIN)
    ghost_head = queue_head(prev, QUEUES, GHOST)
    where = np.full(num_keys, ABSENT, np.int64)
    counter = np.zeros(num_keys, np.int64)
    used = np.zeros(QUEUES, np.int64)
    held = np.zeros(QUEUES + 1, np.int64)  # the request's keys per queue (held[ABSENT]: scratch)
    current = np.full(num_keys, -1, np.int64)
    missed = np.empty(num_keys, np.int64)
    hits = np.zeros(offsets.shape[0] - 1, np.int32)
    evicted = False
    for r in range(hits.shape[0]):
        lo, hi = offsets[r], offsets[r + 1]
        if hi - lo > capacity:
            no_room()
        held[SMALL] = 0
        held[MAIN] = 0
        num_missed = 0
        for j in range(lo, hi):
            key = keys[j]
            current[key] = r
            held[where[key]] += 1
            hit = where[key] <= MAIN
            counter[key] += hit
            missed[num_missed] = key
            num_missed += 1 - hit
        hits[r] = hi - lo - num_missed
        for i in range(num_missed):  # arrive
            if where[missed[i]] == GHOST:
                list_unlink(prev, nxt, missed[i])
                used[GHOST] -= 1
        for i in range(num_missed):
            key = missed[i]
            if used[SMALL] + used[MAIN] == capacity:  # victim and evict
                evicted = True
                out = -1
                while out < 0:
                    if (used[MAIN] > main_share or used[SMALL] == held[SMALL]) and used[MAIN] > held[MAIN]:
                        out = nxt[main_head]  # sweep the main queue, round and round
                        while current[out] == r or counter[out] > 0:
                            after = nxt[out]
                            if current[out] != r:
                                counter[out] = min(counter[out], 3) - 1
                                move_to_tail(prev, nxt, main_head, out)
                            out = nxt[main_head] if after == main_head else after
                    else:
                        first = nxt[small_head]  # sweep the small queue
                        while first != small_head and out < 0:
                            after = nxt[first]
                            if current[first] != r:
                                if counter[first] < threshold:
                                    out = first
                                else:
                                    counter[first] = 0
                                    move_to_tail(prev, nxt, main_head, first)
                                    where[first] = MAIN
                                    used[SMALL] -= 1
                                    used[MAIN] += 1
                            first = after
                list_unlink(prev, nxt, out)
                used[where[out]] -= 1
                if where[out] == SMALL and ghost_share >= 1:
                    if used[GHOST] == ghost_share:  # forget the oldest
                        where[nxt[ghost_head]] = ABSENT
                        list_unlink(prev, nxt, nxt[ghost_head])
                        used[GHOST] -= 1
                    list_append(prev, nxt, ghost_head, out)
                    where[out] = GHOST
                    used[GHOST] += 1
                else:
                    where[out] = ABSENT
            counter[key] = 0  # admit
            queue = SMALL
            if where[key] == GHOST or (not evicted and used[SMALL] >= small_share):
                queue = MAIN
            move_to_tail(prev, nxt, queue_head(prev, QUEUES, queue), key)
            where[key] = queue
            used[queue] += 1
            held[queue] += 1
    return hits


# The mask kernel keeps queue q (SMALL, MAIN, GHOST) in a window of 64 cells, key_at[64 q +
# c], in queue order: the oldest key in the lowest occupied cell, a new one in the queue's
# cell ``end``; when a window is used up its keys move down to cells 0..n-1 in order
# (``compact``). ``pos[key]`` is 64 q + c (64 ABSENT: on no queue). Per queue, 64-bit masks
# over its cells hold the occupied ones (``occ``: the queue's size is their popcount), those
# of the request's keys (``pin``) and, in the main queue, those whose key's counter is 0
# (``zero``). The masks and window ends are locals, kept in registers; the request's keys
# are pinned by one store per key, so that no queue test branches per key.

ONE, NIL = uint64(1), uint64(0)


@njit(cache=True, inline="always")
def lowest(mask):
    return mask & (~mask + ONE)


@njit(cache=True, inline="always")
def compact(pos, key_at, base, occ, zero, pin):
    """Move the keys of the window at ``base`` down to cells 0..n-1 in order, with their
    bits; returns the new (occ, zero, pin, end)."""
    new_occ, new_zero, new_pin = NIL, NIL, NIL
    n = 0
    while occ:
        low = lowest(occ)
        occ ^= low
        key = key_at[cell(base + bit_index(low))]
        key_at[cell(base + n)] = key
        pos[cell(key)] = base + n
        bit = ONE << uint64(n)
        new_occ |= bit
        new_zero |= bit * uint64(zero & low != 0)
        new_pin |= bit * uint64(pin & low != 0)
        n += 1
    return new_occ, new_zero, new_pin, n


@njit(cache=True, inline="always")
def place(pos, key_at, base, end, key):
    """Put ``key`` in cell ``end`` (< 64) of the window at ``base``; returns the cell's bit."""
    key_at[cell(base + end)] = key
    pos[cell(key)] = base + end
    return ONE << uint64(end)


@njit(cache=True, inline="always")
def append(pos, key_at, base, occ, zero, pin, end, key):
    """Make ``key`` the newest of the window at ``base`` (compacting it when used up);
    returns the new (occ, zero, pin, end) and the key's bit."""
    if end == 64:
        occ, zero, pin, end = compact(pos, key_at, base, occ, zero, pin)
    bit = place(pos, key_at, base, end, key)
    return occ | bit, zero, pin, end + 1, bit


@njit(cache=True, nogil=True)
def simulate_masks(keys, offsets, capacity, small_share, ghost_share, threshold):
    """At most 64 keys. The small queue's sweep passes its oldest keys one by one; the main
    queue's victim is its first unpinned cell with counter 0, and its sweep moves the
    unpinned keys of the cells below to the newest end (all of them when there is none,
    then looks again)."""
    main_share = capacity - small_share
    small, main, ghost, absent = SMALL * 64, MAIN * 64, GHOST * 64, ABSENT * 64
    pos = np.full(64, absent, np.int64)
    key_at = np.zeros(absent, np.int64)
    counter = np.zeros(64, np.int64)
    missed = np.empty(64, np.int64)
    pin = np.zeros(QUEUES + 1, np.uint64)  # pin[ABSENT]: scratch
    hits = np.zeros(offsets.shape[0] - 1, np.int32)
    occ_s, occ_m, occ_g, zero_m = NIL, NIL, NIL, NIL
    end_s, end_m, end_g = 0, 0, 0
    evicted = False
    for r in range(hits.shape[0]):
        lo, hi = offsets[cell(r)], offsets[cell(r + 1)]
        if hi - lo > capacity:
            no_room()
        pin[cell(SMALL)], pin[cell(MAIN)], pin[cell(GHOST)] = NIL, NIL, NIL
        num_missed = 0
        for j in range(lo, hi):
            key = np.intp(keys[cell(j)]) & 63
            p = pos[cell(key)]
            pin[cell(p >> 6)] |= ONE << uint64(p & 63)
            hit = p < ghost
            counter[cell(key)] += hit
            missed[cell(num_missed)] = key
            num_missed += 1 - hit
        hits[cell(r)] = hi - lo - num_missed
        pin_s, pin_m = pin[cell(SMALL)], pin[cell(MAIN)]
        zero_m &= ~pin_m  # the hits' counters are positive
        occ_g &= ~pin[cell(GHOST)]  # arrive
        for i in range(num_missed):
            key = missed[cell(i)]
            if popcount(occ_s) + popcount(occ_m) == capacity:  # victim and evict
                evicted = True
                out = -1
                free_s = occ_s & ~pin_s
                if (popcount(occ_m) <= main_share and free_s) or occ_m & ~pin_m == 0:
                    while free_s:  # sweep the small queue
                        low = lowest(free_s)
                        free_s ^= low
                        first = key_at[cell(small + bit_index(low))]
                        occ_s ^= low
                        if counter[cell(first)] < threshold:
                            out = first
                            break
                        counter[cell(first)] = 0
                        occ_m, zero_m, pin_m, end_m, bit = append(pos, key_at, main, occ_m, zero_m, pin_m,
                                                                  end_m, first)
                        zero_m |= bit
                    if out >= 0 and ghost_share >= 1:
                        if popcount(occ_g) == ghost_share:  # forget the oldest
                            oldest = lowest(occ_g)
                            occ_g ^= oldest
                            pos[cell(key_at[cell(ghost + bit_index(oldest))])] = absent
                        occ_g, _, _, end_g, _ = append(pos, key_at, ghost, occ_g, NIL, NIL, end_g, out)
                    elif out >= 0:
                        pos[cell(out)] = absent
                while out < 0:  # sweep the main queue
                    free = occ_m & ~pin_m
                    stop = lowest(free & zero_m)
                    passed = free & (stop - ONE)  # all of them if stop is 0
                    while passed and end_m < 64:
                        low = lowest(passed)
                        passed ^= low
                        moved = key_at[cell(main + bit_index(low))]
                        count = min(counter[cell(moved)], 3) - 1
                        counter[cell(moved)] = count
                        bit = place(pos, key_at, main, end_m, moved)
                        occ_m = (occ_m ^ low) | bit
                        zero_m |= bit * uint64(count == 0)
                        end_m += 1
                    if passed:  # the window is used up: compact, look again
                        occ_m, zero_m, pin_m, end_m = compact(pos, key_at, main, occ_m, zero_m, pin_m)
                    elif stop:
                        out = key_at[cell(main + bit_index(stop))]
                        occ_m ^= stop
                        pos[cell(out)] = absent
            counter[cell(key)] = 0  # admit
            if pos[cell(key)] >> 6 == GHOST or (not evicted and popcount(occ_s) >= small_share):
                occ_m, zero_m, pin_m, end_m, bit = append(pos, key_at, main, occ_m, zero_m, pin_m, end_m, key)
                zero_m |= bit
                pin_m |= bit
            else:
                occ_s, _, pin_s, end_s, bit = append(pos, key_at, small, occ_s, NIL, pin_s, end_s, key)
                pin_s |= bit
    return hits


POLICY = Policy(
    name="s3fifo", description="S3-FIFO: new experts wait in a small FIFO; those hit there move to a "
    "main FIFO with reinsertion (2-bit counter); a ghost of the small queue's evictions admits "
    "returning experts to the main queue",
    hooks=Hooks(init, access, admit, victim, evict, always_keep), resume=resume, kernel=simulate,
    unit_kernel=True,
    params=(Param("small", 0.1, 0.0, 1.0, "the small queue's share of the capacity"),
            Param("ghost", 0.9, 0.0, 4.0, "the ghost's size as a share of the capacity (ids only)"),
            Param("threshold", 2, 1, 16, "hits in the small queue that move an expert to the main queue",
                  integer=True)),
    style={"linestyle": (0, (4, 1, 1, 1)), "marker": "X"}, rank=54,
    source="Yang et al., FIFO queues are all you need for cache eviction, SOSP 2023; "
    "libCacheSim, cache/eviction/S3FIFO.c")
