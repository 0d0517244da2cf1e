"""SLRU (segmented LRU, Karedla, Love and Wherry, Caching strategies to improve disk
system performance, IEEE Computer 1994), as libCacheSim's SLRU
(libCacheSim/cache/eviction/SLRU.c, n-seg=4).

The cache is split into ``segments`` LRU lists of ``capacity // segments`` each, 0 the
lowest. A new expert enters the lowest segment with room for it (segment 0 once all
are full), at its most recent end. A hit in the top segment makes the expert its most
recent; a hit below moves it up one segment, and a segment over its share passes its
least recent experts down to the one below until it fits, then that one does the same,
down to segment 0. The victim is the least recent expert of the lowest non-empty
segment; under set steps (docs/semantics.md), the first one outside the current request
in that order (segment 0 least recent first, then segment 1, ...).

libCacheSim equality (tests/test_libcachesim_a.py): exact on one-expert-per-step traces
when ``segments`` divides the capacity. Otherwise the segments hold less than the cache
and segment 0 is filled beyond its share; libCacheSim then evicts segment 0's least
recent expert when a hit's demotions reach it, so a hit empties a slot, while here
segment 0 keeps it (no expert leaves without a miss). Shortest case, capacity 3 with 2
segments: ids 0 1 2 0 2 (0 and 2 in segment 0, 1 in segment 1); the hit on 0 moves it
up and 1 down, and libCacheSim evicts 2, which misses next; here it hits.

Fast kernels (``simulate``, unit sizes), exact to the hooks:

* packed (at most 64 keys, at most 8 in segment 0 once steady, as at the capacities 16
  and 32 of the benchmark): segment ``s`` is one 64-bit word, its keys one byte each,
  least recent lowest, empty bytes 0xFF on top; ``segment[key]`` is a resident's
  segment. A key's byte is found by the zero-byte test of ``word ^ key * BYTES``;
  taking a byte out shifts the bytes above it down one. Until every segment above 0
  holds its share and the cache is full (``steady``), keys move between segments like
  the hooks' queues. Invariant once steady: it stays so, for a miss evicts the oldest
  unpinned of the lowest segment having one and the new key becomes the newest there
  (the segments below are full, so that segment is where libCacheSim admits it), and a
  hit trades the key with the oldest of the segment above (on top, with itself), each
  becoming the newest of its new segment. Per request: a few shifts per key, no scans,
  no stamps; unsigned indices (``_index.cell``).
* slots (at most 64 keys, more than 8 in segment 0): segment ``s`` owns a fixed window
  of ``stride`` cells of ``stamp``, each the placement time of its key shifted left 6
  bits plus the key (an empty cell holds NONE), so the oldest of a segment is the
  minimum of its window and names its key; ``slot[key]`` is a resident's cell; the
  same ``steady`` invariant, a hit on the top segment restamping its cell, a hit below
  trading cells with the oldest of the segment above. Per request: a few 4-wide minimum
  scans of one window, no list walks.
* lists (more keys): the hooks' queues over flat arrays, queue ``s``'s sentinel being
  node ``keys + s``. ``mark[key]`` is 2r + 1 for a hit of request r and 2r for its other
  keys (so ``mark >= 2r`` pins a key). Invariant (of the hooks too): every segment above
  0 holds at most its share between requests, so a hit's overflow passes at most one
  expert down per segment and stops at the first segment within its share.

Hooks: state = (segment per key, -1 when absent; the segments' LRU queues from
policies/_queues.py, oldest first; used and share per segment; sizes).
"""

import numpy as np
from numba import njit, uint64
from numba.cpython.unsafe.numbers import trailing_zeros

from ._index import cell
from ._queues import move_to_tail, oldest_unpinned, queue_head, queues_new, sized_move, sized_remove
from ._state import fits_masks, list_unlink, no_room, popcount, request_mask
from .registry import Hooks, Param, Policy, always_keep

ONE = uint64(1)
PIN = np.int64(1) << np.int64(62)  # added to the stamp of a key of the request: never the oldest
NONE = np.iinfo(np.int64).max  # an empty cell
BYTE = uint64(0xFF)  # a byte's bits; an empty byte of a packed segment
EMPTY = ~uint64(0)  # a packed segment without keys
BYTES = uint64(0x0101010101010101)  # 1 in every byte
HIGH_BITS = BYTES << uint64(7)


@njit(cache=True, nogil=True)
def simulate(keys, offsets, sizes, capacity, params, seed):
    count = int(params[0])
    if fits_masks(sizes):
        if steady_sizes(capacity, count)[2] <= 8:
            return simulate_packed(keys, offsets, capacity, count)
        return simulate_slots(keys, offsets, capacity, count)
    return simulate_lists(keys, offsets, sizes, capacity, count)


@njit(cache=True, inline="always")
def steady_sizes(capacity, count):
    """(share, top, full0): a segment's share, the top segment (0 without a share: every
    expert then stays in segment 0) and segment 0's size once steady, the largest."""
    share = capacity // count
    top = count - 1 if share > 0 else 0
    return share, top, capacity - top * share


@njit(cache=True, inline="always")
def entry_segment(n, share, top):
    """The lowest segment holding fewer than ``share`` experts, 0 when none does."""
    s = 0
    while s < top and n[cell(s)] >= share:
        s += 1
    return s if n[cell(s)] < share else 0


@njit(cache=True, inline="always")
def byte_find(word, key):
    """The byte of ``word`` holding ``key`` (the lowest zero byte of ``word ^ key * BYTES``)."""
    x = word ^ (uint64(key) * BYTES)
    return trailing_zeros((x - BYTES) & ~x & HIGH_BITS) >> 3


@njit(cache=True, inline="always")
def byte_remove(word, at):
    """``word`` without byte ``at``: the bytes above move down one, EMPTY enters on top."""
    low = (ONE << uint64(8 * at)) - ONE
    return (word & low) | ((word >> uint64(8)) & ~low) | (BYTE << uint64(56))


@njit(cache=True, inline="always")
def byte_put(word, at, key):
    """``word`` with ``key`` in its empty byte ``at``."""
    return word ^ ((BYTE ^ uint64(key)) << uint64(8 * at))


@njit(cache=True, nogil=True)
def simulate_packed(keys, offsets, capacity, count):
    share, top, full0 = steady_sizes(capacity, count)
    words = np.full(count, EMPTY, np.uint64)
    segment = np.zeros(64, np.int64)
    n = np.zeros(count, np.int64)
    hits = np.zeros(offsets.shape[0] - 1, np.int32)
    resident = uint64(0)
    total = 0
    steady = False
    for r in range(hits.shape[0]):
        lo, hi = offsets[cell(r)], offsets[cell(r + 1)]
        if hi - lo > capacity:
            no_room()
        step = request_mask(keys, lo, hi)
        hitm = step & resident
        hits[cell(r)] = popcount(hitm)
        m = step & ~resident
        resident |= m
        while m:  # admissions, ascending
            key = trailing_zeros(m)
            m &= m - ONE
            if total == capacity:  # the oldest unpinned, from segment 0 up
                s = 0
                at = 0
                word = words[0]
                while True:
                    out = (word >> uint64(8 * at)) & BYTE
                    if at < n[cell(s)] and not (step >> out) & ONE:
                        break
                    at += 1
                    if at >= n[cell(s)]:
                        s += 1
                        at = 0
                        word = words[cell(s)]
                resident ^= ONE << out
                word = byte_remove(word, at)
                if steady:  # the segments below s are full: the new key enters s
                    words[cell(s)] = byte_put(word, n[cell(s)] - 1, key)
                    segment[cell(key)] = s
                    continue
                words[cell(s)] = word
                n[cell(s)] -= 1
            else:
                total += 1
            s = entry_segment(n, share, top)
            words[cell(s)] = byte_put(words[cell(s)], n[cell(s)], key)
            segment[cell(key)] = s
            n[cell(s)] += 1
            steady = total == capacity and n[0] == full0
        m = hitm
        while m:  # accesses, ascending
            key = trailing_zeros(m)
            m &= m - ONE
            s = segment[cell(key)]
            word = words[cell(s)]
            at = byte_find(word, key)
            t = min(s + 1, top)
            if steady or s == top or n[cell(t)] >= share:  # trade with t's oldest (on top: the key itself)
                up = words[cell(t)]
                up_at = at if s == top else 0
                down = (up >> uint64(8 * up_at)) & BYTE
                words[cell(s)] = byte_put(byte_remove(word, at), n[cell(s)] - 1, down)
                words[cell(t)] = byte_put(byte_remove(up, up_at), n[cell(t)] - 1, key)
                segment[cell(key)] = t
                segment[cell(down)] = s
            else:
                words[cell(s)] = byte_remove(word, at)
                n[cell(s)] -= 1
                words[cell(t)] = byte_put(words[cell(t)], n[cell(t)], key)
                n[cell(t)] += 1
                segment[cell(key)] = t
                steady = total == capacity and n[0] == full0
    return hits


@njit(cache=True, inline="always")
def pinned(stamp, step):
    """``stamp`` plus PIN when its key is in ``step``."""
    return stamp | np.int64((step >> uint64(stamp & 63)) & ONE) << 62


@njit(cache=True, inline="always")
def window_oldest(stamp, first, width, step):
    """The smallest of ``stamp[first:first + width]`` (width a multiple of 4), keys of ``step``
    pinned: four running minimums."""
    a = b = c = d = NONE
    for i in range(first, first + width, 4):
        a = min(a, pinned(stamp[cell(i)], step))
        b = min(b, pinned(stamp[cell(i + 1)], step))
        c = min(c, pinned(stamp[cell(i + 2)], step))
        d = min(d, pinned(stamp[cell(i + 3)], step))
    return min(min(a, b), min(c, d))


@njit(cache=True, inline="always")
def put(stamp, slot, at, value):
    """Put the stamp ``value`` into cell ``at``."""
    stamp[cell(at)] = value
    slot[cell(value & 63)] = at


@njit(cache=True, nogil=True)
def simulate_slots(keys, offsets, capacity, count):
    share, top, full0 = steady_sizes(capacity, count)
    shift = 2
    while (1 << shift) < full0:
        shift += 1
    stride = 1 << shift
    stamp = np.full(count * stride, NONE, np.int64)
    slot = np.zeros(64, np.int64)
    n = np.zeros(count, np.int64)
    hits = np.zeros(offsets.shape[0] - 1, np.int32)
    resident = uint64(0)
    total = 0
    clock = 0
    steady = False
    for r in range(hits.shape[0]):
        lo, hi = offsets[r], offsets[r + 1]
        if hi - lo > capacity:
            no_room()
        step = request_mask(keys, lo, hi)
        hitm = step & resident
        hits[r] = popcount(hitm)
        m = step & ~resident
        resident |= m
        while m:  # admissions, ascending
            key = int(trailing_zeros(m))
            m &= m - ONE
            clock += 1
            if total == capacity:  # the oldest unpinned, from segment 0 up
                s = 0
                low = window_oldest(stamp, 0, stride, step)
                while low >= PIN:
                    s += 1
                    low = window_oldest(stamp, s * stride, stride, step)
                resident ^= ONE << uint64(low & 63)
                f = slot[cell(low & 63)]
                if steady:  # the segments below s are full: the new key takes the cell
                    put(stamp, slot, f, (clock << 6) | key)
                    continue
                n[cell(s)] -= 1
                last = s * stride + n[cell(s)]
                put(stamp, slot, f, stamp[cell(last)])  # the segment's last cell fills the hole
                stamp[cell(last)] = NONE
            else:
                total += 1
            s = entry_segment(n, share, top)
            put(stamp, slot, s * stride + n[cell(s)], (clock << 6) | key)
            n[cell(s)] += 1
            steady = total == capacity and n[0] == full0
        m = hitm
        while m:  # accesses, ascending
            key = int(trailing_zeros(m))
            m &= m - ONE
            clock += 1
            f = slot[cell(key)]
            s = f >> shift
            if s == top:
                stamp[cell(f)] = (clock << 6) | key
            elif steady or n[cell(s + 1)] >= share:  # trade cells with the oldest of s + 1
                down = window_oldest(stamp, (s + 1) * stride, stride, uint64(0)) & 63
                put(stamp, slot, slot[cell(down)], (clock << 6) | key)
                clock += 1
                put(stamp, slot, f, (clock << 6) | down)
            else:
                n[cell(s)] -= 1
                last = s * stride + n[cell(s)]
                put(stamp, slot, f, stamp[cell(last)])
                stamp[cell(last)] = NONE
                put(stamp, slot, (s + 1) * stride + n[cell(s + 1)], (clock << 6) | key)
                n[cell(s + 1)] += 1
                steady = total == capacity and n[0] == full0
    return hits


@njit(cache=True, nogil=True)
def simulate_lists(keys, offsets, sizes, capacity, count):
    num_keys = sizes.shape[0]
    share = capacity // count
    prev, nxt = queues_new(num_keys, count)
    segment = np.full(num_keys, -1, np.int64)
    used = np.zeros(count, np.int64)
    mark = np.full(num_keys, -1, np.int64)
    hits = np.zeros(offsets.shape[0] - 1, np.int32)
    total = 0
    for r in range(hits.shape[0]):
        lo, hi = offsets[r], offsets[r + 1]
        if hi - lo > capacity:
            no_room()
        found = 0
        for j in range(lo, hi):
            key = keys[j]
            hit = segment[key] >= 0
            mark[key] = 2 * r + hit
            found += hit
        hits[r] = found
        if found < hi - lo:
            for j in range(lo, hi):  # admissions
                key = keys[j]
                if segment[key] >= 0:
                    continue
                if total == capacity:  # the oldest unpinned, from segment 0 up
                    out = nxt[num_keys]
                    while out >= num_keys or mark[out] >= 2 * r:
                        out = nxt[out + 1] if out >= num_keys else nxt[out]
                    list_unlink(prev, nxt, out)
                    used[segment[out]] -= 1
                    segment[out] = -1
                else:
                    total += 1
                s = 0
                while s < count and used[s] >= share:
                    s += 1
                s = s if s < count else 0
                move_to_tail(prev, nxt, num_keys + s, key)
                used[s] += 1
                segment[key] = s
        if found:
            for j in range(lo, hi):  # accesses
                key = keys[j]
                if mark[key] != 2 * r + 1:
                    continue
                s = min(segment[key] + 1, count - 1)
                used[segment[key]] -= 1
                used[s] += 1
                segment[key] = s
                move_to_tail(prev, nxt, num_keys + s, key)
                while s > 0 and used[s] > share:
                    down = nxt[num_keys + s]
                    used[s] -= 1
                    used[s - 1] += 1
                    segment[down] = s - 1
                    move_to_tail(prev, nxt, num_keys + s - 1, down)
                    s -= 1
    return hits


@njit(cache=True)
def init(keys, offsets, sizes, capacity, params, seed, scores):
    count = int(params[0])
    prev, nxt = queues_new(sizes.shape[0], count)
    share = np.full(count, capacity // count, np.int64)
    return np.full(sizes.shape[0], -1, np.int64), prev, nxt, np.zeros(count, np.int64), share, sizes


@njit(cache=True)
def place(state, key, segment):
    """Make ``key`` the most recent expert of ``segment``."""
    where, prev, nxt, used, share, sizes = state
    sized_move(where, prev, nxt, used, sizes, share.shape[0], key, segment)


@njit(cache=True)
def admit(state, key, now):
    _, _, _, used, share, sizes = state
    segment = 0
    for s in range(share.shape[0]):
        if used[s] + sizes[key] <= share[s]:
            segment = s
            break
    place(state, key, segment)


@njit(cache=True)
def access(state, key, now, hit):
    where, prev, nxt, used, share, _ = state
    top = share.shape[0] - 1
    if not hit:
        return
    segment = min(where[key] + 1, top)
    place(state, key, segment)
    while segment > 0:  # demote the least recent of each segment over its share
        head = queue_head(prev, share.shape[0], segment)
        while used[segment] > share[segment]:
            place(state, nxt[head], segment - 1)
        segment -= 1


@njit(cache=True)
def victim(state, resident, pinned, mark):
    _, prev, nxt, _, share, _ = state
    for segment in range(share.shape[0]):
        key = oldest_unpinned(prev, nxt, share.shape[0], segment, pinned, mark)
        if key >= 0:
            return key
    return -1


@njit(cache=True)
def evict(state, key):
    where, prev, nxt, used, _, sizes = state
    sized_remove(where, prev, nxt, used, sizes, key)


POLICY = Policy(
    name="slru", description="segmented LRU: new experts enter the lowest segment, a hit moves an expert up "
    "one segment and overflow moves down; evicts the least recent of the lowest segment",
    hooks=Hooks(init, access, admit, victim, evict, always_keep), kernel=simulate, unit_kernel=True,
    params=(Param("segments", 4, 1, 16, "LRU segments, each capacity // segments", integer=True),),
    style={"linestyle": (0, (5, 1, 1, 1)), "marker": "*"}, rank=47,
    source="Karedla, Love, Wherry, IEEE Computer 1994; libCacheSim, cache/eviction/SLRU.c (SLRU, n-seg=4)")
