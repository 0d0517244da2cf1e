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

Two exact fast kernels of unit sizes, chosen by ``simulate``, both the hooks' steps in one
function. Per request: (1) count the hits, and let the misses found in a ghost adapt p, in
ascending id, and leave it; (2) admit the misses in ascending id, each evicting one expert
first when the cache is full, skipping the request's keys; (3) move the hits to T2's most
recent end, in ascending id.

* masks (at most 64 keys): each list is a 64-bit mask, and ``groups[i]`` holds the keys
  that entered T1 or T2 at ``i`` = 2r (admissions of request r) or 2r + 1 (its hits),
  and are still in that list or its ghost, so each list is ordered by group, then id
  (an eviction to a ghost keeps the group). Invariant: T1 and T2 evict in that order
  (an expert skipped because it is in the request leaves the list or is the newest), so
  every ghost precedes every member of its list; no group before ``oldest[X]`` holds a
  member of list X (outside the current request, for T1 and T2).
* lists (any number of keys): the lists as linked lists in flat arrays (``_queues``),
  their sizes in ``size``; ``current[key] == r`` marks request r's keys; ``where`` is
  ``LEFT_B1`` or ``LEFT_B2`` for a miss that left a ghost, until it is admitted.

Hooks: state = (list of each key, the four lists as linked lists, their sizes, [p],
request at which each key left a ghost on arrival, whether from B2, [last request
arrived, capacity, key to evict without a ghost entry], the request stream, sizes).
"""

import numpy as np
from numba import njit, uint64
from numba.cpython.unsafe.numbers import trailing_zeros

from ._queues import move_to_tail, oldest_unpinned, queue_head, queues_new, sized_move, sized_remove
from ._state import fits_masks, list_append, list_unlink, no_room, popcount
from .registry import Hooks, Policy, always_keep

T1, T2, B1, B2, LISTS = 0, 1, 2, 3, 4
NONE = -1
LEFT_B1, LEFT_B2 = 5, 6  # the kernel's keys that left B1 or B2 at the current request
ARRIVED, CAPACITY, GHOSTLESS = range(3)
WINDOW = 4  # groups the masks kernel tests at once for a list's oldest member


@njit(cache=True, nogil=True)
def simulate(keys, offsets, sizes, capacity, params, seed):
    if fits_masks(sizes):
        return simulate_masks(keys, offsets, capacity)
    return simulate_lists(keys, offsets, sizes.shape[0], capacity)


@njit(cache=True, inline="always")
def lowest_bit(mask):
    return mask & (~mask + uint64(1))


@njit(cache=True)  # not inline="always": numba would count references to the arrays at each call
def oldest_of(groups, oldest, which, members):
    """The oldest of ``members`` (list ``which``, or its part outside the request; not
    empty) as a one-bit mask; ``oldest[which]`` moves to its group. The groups are read
    ``WINDOW`` at a time (``groups`` has as many more at its end), without a branch per group."""
    g = oldest[which]
    while True:
        near = uint64(0)  # bit i: groups[g + i] holds one of members
        for i in range(WINDOW):
            near |= uint64(groups[g + uint64(i)] & members != 0) << uint64(i)
        if near:
            break
        g += uint64(WINDOW)
    g += trailing_zeros(near)
    oldest[which] = g
    return lowest_bit(groups[g] & members)


@njit(cache=True, nogil=True)
def simulate_masks(keys, offsets, capacity):
    num_requests = offsets.shape[0] - 1
    groups = np.zeros(2 * num_requests + WINDOW, np.uint64)
    # group indices are uint64: numba leaves out the wraparound of negative indices
    group = np.zeros(64, np.uint64)  # the group of each key in a list
    oldest = np.zeros(LISTS, np.uint64)
    hits = np.zeros(num_requests, np.int32)
    t1 = t2 = b1 = b2 = uint64(0)
    p = 0.0
    for r in range(num_requests):
        lo, hi = offsets[r], offsets[r + 1]
        if hi - lo > capacity:
            no_room()
        step = uint64(0)
        for j in range(uint64(lo), uint64(hi)):
            step |= uint64(1) << uint64(keys[j])
            if step == ~uint64(0):  # all 64 keys (this exit also keeps LLVM from vectorizing
                break  # a loop this short, which is slower)
        found = step & (t1 | t2)  # (1)
        hits[r] = popcount(found)
        ghosted = step & (b1 | b2)
        from_b2 = step & b2
        left = ghosted
        while left:
            bit = lowest_bit(left)
            left ^= bit
            if bit & b1:
                p = min(p + max(popcount(b2) / popcount(b1), 1.0), capacity)
                b1 ^= bit
            else:
                p = max(p - max(popcount(b1) / popcount(b2), 1.0), 0.0)
                b2 ^= bit
            groups[group[trailing_zeros(bit)]] ^= bit
        missed = step ^ found
        while missed:  # (2)
            bit = lowest_bit(missed)
            missed ^= bit
            if popcount(t1 | t2) >= capacity:
                out = uint64(0)  # an eviction without a ghost entry, if found
                if not ghosted & bit:
                    if popcount(t1) + popcount(b1) >= capacity:
                        if b1:
                            drop = oldest_of(groups, oldest, B1, b1)
                            b1 ^= drop
                            groups[oldest[B1]] ^= drop
                        elif t1 & ~step:
                            out = oldest_of(groups, oldest, T1, t1 & ~step)
                    elif popcount(t1 | t2 | b1 | b2) >= 2 * capacity and b2:
                        drop = oldest_of(groups, oldest, B2, b2)
                        b2 ^= drop
                        groups[oldest[B2]] ^= drop
                ghost = out == 0
                if ghost:  # REPLACE
                    n1 = popcount(t1)
                    if t1 & ~step and (n1 > p or (n1 == p and from_b2 & bit)) or not t2 & ~step:
                        out = oldest_of(groups, oldest, T1, t1 & ~step)
                    else:
                        out = oldest_of(groups, oldest, T2, t2 & ~step)
                if out & t1:
                    t1 ^= out
                    if ghost:
                        b1 |= out
                    else:
                        groups[group[trailing_zeros(out)]] ^= out
                else:
                    t2 ^= out
                    b2 |= out
            if ghosted & bit:
                t2 |= bit
            else:
                t1 |= bit
            groups[2 * r] |= bit
            group[trailing_zeros(bit)] = uint64(2 * r)
        moved = found
        while moved:  # (3)
            bit = lowest_bit(moved)
            moved ^= bit
            key = trailing_zeros(bit)
            groups[group[key]] ^= bit
            group[key] = uint64(2 * r + 1)
        groups[2 * r + 1] = found
        t1 &= ~found
        t2 |= found
    return hits


@njit(cache=True)
def drop_oldest(prev, nxt, where, size, ghost):
    """Forget the oldest key of ghost list ``ghost`` (lists as in ``simulate_lists``)."""
    key = nxt[where.shape[0] + ghost]
    list_unlink(prev, nxt, key)
    where[key] = NONE
    size[ghost] -= 1


@njit(cache=True, inline="always")
def oldest_outside(prev, nxt, head, current, r):
    """The oldest key of the list with sentinel ``head`` not of request r; -1 if none."""
    key = nxt[head]
    while key != head and current[key] == r:
        key = nxt[key]
    return key if key != head else -1


@njit(cache=True, nogil=True)
def simulate_lists(keys, offsets, num_keys, capacity):
    prev, nxt = queues_new(num_keys, LISTS)  # list q's sentinel: num_keys + q
    where = np.full(num_keys, NONE, np.int64)
    current = np.full(num_keys, -1, np.int64)
    found_keys = np.empty(num_keys, np.int64)
    missed = np.empty(num_keys, np.int64)
    size = np.zeros(LISTS, np.int64)
    hits = np.zeros(offsets.shape[0] - 1, np.int32)
    p = 0.0
    for r in range(hits.shape[0]):
        lo, hi = offsets[r], offsets[r + 1]
        if hi - lo > capacity:
            no_room()
        found = 0
        missing = 0
        for j in range(lo, hi):
            key = keys[j]
            current[key] = r
            w = where[key]
            if w == T1 or w == T2:
                found_keys[found] = key
                found += 1
                continue
            missed[missing] = key
            missing += 1
            if w == B1:
                p = min(p + max(size[B2] / size[B1], 1.0), capacity)
                where[key] = LEFT_B1
            elif w == B2:
                p = max(p - max(size[B1] / size[B2], 1.0), 0.0)
                where[key] = LEFT_B2
            else:
                continue
            list_unlink(prev, nxt, key)
            size[w] -= 1
        hits[r] = found
        for i in range(missing):
            key = missed[i]
            w = where[key]
            if size[T1] + size[T2] >= capacity:
                in_b2 = w == LEFT_B2
                out = -1  # an eviction without a ghost entry, if found
                if w == NONE:
                    if size[T1] + size[B1] >= capacity:
                        if size[B1] > 0:
                            drop_oldest(prev, nxt, where, size, B1)
                        else:
                            out = oldest_outside(prev, nxt, num_keys + T1, current, r)
                    elif size.sum() >= 2 * capacity and size[B2] > 0:
                        drop_oldest(prev, nxt, where, size, B2)
                ghost = out < 0
                if ghost:  # REPLACE
                    out = oldest_outside(prev, nxt, num_keys + T1, current, r)
                    if out < 0 or not (size[T1] > p or (size[T1] == p and in_b2)):
                        t2 = oldest_outside(prev, nxt, num_keys + T2, current, r)
                        if t2 >= 0:
                            out = t2
                q = where[out]
                list_unlink(prev, nxt, out)
                size[q] -= 1
                where[out] = q + B1 if ghost else NONE
                if ghost:
                    list_append(prev, nxt, num_keys + q + B1, out)
                    size[q + B1] += 1
            q = T1 if w == NONE else T2
            list_append(prev, nxt, num_keys + q, key)
            where[key] = q
            size[q] += 1
        for i in range(found):
            key = found_keys[i]
            size[where[key]] -= 1
            move_to_tail(prev, nxt, num_keys + T2, key)
            where[key] = T2
            size[T2] += 1
    return hits


@njit(cache=True)
def init(keys, offsets, sizes, capacity, params, seed, scores):
    num_keys = sizes.shape[0]
    prev, nxt = queues_new(num_keys, LISTS)
    return (np.full(num_keys, NONE, np.int64), prev, nxt, np.zeros(LISTS, np.int64), np.zeros(1),
            np.full(num_keys, -1, np.int64), np.zeros(num_keys, np.bool_),
            np.array([-1, capacity, NONE], np.int64), keys, offsets, sizes, np.zeros(1, np.int64))


@njit(cache=True)
def resume(state, keys, offsets, scores, params, first, first_entry, total, future):
    """The hooks read the current request's keys: those of the span, from request ``first``."""
    a, b, c, d, e, f, g, h, _, _, sizes, _ = state
    return a, b, c, d, e, f, g, h, keys, offsets, sizes, np.full(1, first, np.int64)


@njit(cache=True)
def enqueue(state, key, where_to):
    where, prev, nxt, used, _, _, _, _, _, _, sizes, _ = state
    sized_move(where, prev, nxt, used, sizes, LISTS, key, where_to)


@njit(cache=True)
def dequeue(state, key):
    where, prev, nxt, used, _, _, _, _, _, _, sizes, _ = state
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
    where, _, _, _, _, left, from_b2, misc, keys, offsets, _, first = state
    if misc[ARRIVED] == now:
        return
    misc[ARRIVED] = now
    for j in range(offsets[now - first[0]], offsets[now + 1 - first[0]]):
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
    _, prev, nxt, used, _, left, from_b2, misc, keys, offsets, sizes, first = state
    now = mark >> 1
    arrive(state, now)
    size = 0
    for j in range(offsets[now - first[0]], offsets[now + 1 - first[0]]):
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
    hooks=Hooks(init, access, admit, victim, evict, always_keep), resume=resume, kernel=simulate,
    unit_kernel=True,
    style={"linestyle": (0, (5, 1, 1, 1, 1, 1)), "marker": "d"}, rank=56,
    source="Megiddo and Modha, ARC: A Self-Tuning, Low Overhead Replacement Cache, FAST 2003; "
    "libCacheSim, cache/eviction/ARC.c")
