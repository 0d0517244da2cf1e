"""One pass for every capacity: Mattson's priority stack for ``lru``, ``lfu`` and ``opt``.

These policies evict the resident of lowest priority, and a key's priority changes only
when the key is requested (LRU: last use; LFU: uses, then last use; OPT: next use), so
they are stack algorithms: a cache of C experts always holds the top C entries of one
stack, and a request hits every capacity at least as deep as the key's stack position.

the set requests of docs/semantics.md (misses admitted together, never evicting a key of the current
request) make the whole request one update: a request R of n keys leaves the cache of
size C >= n holding R and the C - n highest-priority other entries it held before. So
the new stack is R on top, and one walk down the old stack rebuilds the rest. It keeps
the *candidates*, the entries passed that are not in R and not yet placed again; with
``need`` the keys of R not yet passed (new keys included), the cache as large as the
current level has evicted exactly the ``need`` lowest candidates. From level n on, a
level holding a key of R takes the highest candidate (``need`` drops), and any other
level the highest of its entry and the candidates. The walk ends below the deepest
key of R, or, if R has new keys, at the bottom, where the last candidates extend the
stack. Cost: one walk to the deepest key of each request, not one carry per key; only
the levels whose entry is below the highest candidate change, and one vector compare
finds them 16 levels at a time.

LRU needs no walk: its stack is the order of last use (then id), so a key's depth is
one plus the keys used since; two kernels count those directly. Neither does OPT when
all requests have one size: opt_stack.py finds its depths from the past alone.

Capacities below a request's size are invalid and not reported; depths shallower than
the largest set are counted but carry no meaning.
"""

import numpy as np
from numba import njit
from numba.cpython.unsafe.numbers import trailing_zeros

from ._simd import LANES, below_mask
from ._state import bit_index, popcount
from .opt import next_request
from .opt_stack import TIME_LIMIT, opt_marker_depths, uniform_size

LRU, LFU, OPT = 0, 1, 2
_PINNED = np.iinfo(np.int64).min  # below every priority, so the walk stops at it


@njit(cache=True, nogil=True)
def depth_histogram(keys, offsets, num_keys, policy, groups):
    """Counts of stack depths, shape (num_keys + 1, groups): row d counts the requested
    entries found at depth d (1-based; 0 = never seen before), column ``r % groups`` of
    their request r (the MoE layer, in global scope). Rows up to the largest request
    size are only meaningful summed (OPT's marker kernel puts them all in row 1)."""
    if policy == LRU:
        if num_keys <= 64:
            return lru_depths_masks(keys, offsets, num_keys, groups)
        return lru_depths_stamps(keys, offsets, num_keys, groups)
    if policy == OPT and offsets.shape[0] <= TIME_LIMIT and uniform_size(offsets):
        return opt_marker_depths(keys, offsets, num_keys, groups)
    return priority_stack_depths(keys, offsets, num_keys, policy, groups)


@njit(cache=True, nogil=True)
def lru_depths_masks(keys, offsets, num_keys, groups):
    """LRU depths for at most 64 keys, without a stack.

    For LRU the caches of every valid capacity hold the most recent keys by (last use,
    id), so a key's depth is one plus the keys ranked above it at the start of the
    request: ``above[x]``, a 64-bit mask kept for every key. Invariant: between
    requests, ``above[x]`` holds the keys whose (last use, id) is greater than x's.
    """
    above = np.zeros(64, np.uint64)
    seen = np.uint64(0)
    hist = np.zeros((num_keys + 1, groups), np.int64)
    one = np.uint64(1)
    for r in range(offsets.shape[0] - 1):
        lo, hi = offsets[r], offsets[r + 1]
        served = np.uint64(0)
        for j in range(lo, hi):
            x = keys[j]
            bit = one << np.uint64(x)
            hist[1 + popcount(above[x]) if seen & bit else 0, r % groups] += 1
            served |= bit
        seen |= served
        for y in range(64):
            above[y] |= served
        for j in range(lo, hi):
            x = keys[j]
            # keys of the same request rank above x iff their id is larger
            above[x] = served & ~((one << np.uint64(x)) | ((one << np.uint64(x)) - one))
    return hist


@njit(cache=True, nogil=True)
def lru_depths_stamps(keys, offsets, num_keys, groups):
    """LRU depths for any number of keys: per reuse, a masked sum of up to 64 word counts
    plus one chunk count per 4,096 stamps since the key's last use.

    Every use takes the next stamp, so a key's depth is one plus the keys whose last
    stamp is later than its own. Invariant: bit t of ``current`` is set iff stamp t is
    some key's last use (``key_at[t]``), ``per_word`` counts the set bits of each
    64-stamp word and ``per_chunk`` those of each 64-word chunk; the keys above stamp t
    are the set bits above t in its word plus the counts of the later words of its chunk
    and of the later chunks. When the stamps run out, the current ones are renumbered
    0..live-1 in the same order.
    """
    words = (2 * num_keys + 63) // 64 + 1  # >= N stamps free after a renumbering
    chunks = (words + 63) // 64  # counted only past 64 words (one chunk has nothing to add)
    chunked = chunks > 1
    current = np.zeros(words, np.uint64)
    per_word = np.zeros(64 * chunks, np.int64)
    per_chunk = np.zeros(chunks, np.int64)
    key_at = np.empty(64 * words, np.int64)
    stamp = np.full(num_keys, -1, np.int64)  # last stamp, -1 if never used
    hist = np.zeros((num_keys + 1, groups), np.int64)
    one = np.uint64(1)
    now = 0  # the next stamp
    for r in range(offsets.shape[0] - 1):
        lo, hi = offsets[r], offsets[r + 1]
        group = r % groups
        last_chunk = (now - 1) >> 12
        for j in range(lo, hi):
            t = stamp[keys[j]]
            if t < 0:
                hist[0, group] += 1
                continue
            above = popcount(current[t >> 6] >> np.uint64(t & 63) >> one)
            if not chunked:  # a masked sum over all words vectorizes, beating a short loop
                for word in range(words):
                    above += per_word[word] if word > t >> 6 else 0
            else:  # the same over t's chunk, then the later chunks
                first = (t >> 12) << 6
                for word in range(first, first + 64):
                    above += per_word[word] if word > t >> 6 else 0
                for chunk in range((t >> 12) + 1, last_chunk + 1):
                    above += per_chunk[chunk]
            hist[1 + above, group] += 1
        if now + hi - lo > 64 * words:
            live = 0
            for word in range(words):
                bits = current[word]
                while bits:
                    lowest = bits & (~bits + one)
                    key = key_at[64 * word + bit_index(lowest)]
                    key_at[live], stamp[key] = key, live
                    live += 1
                    bits ^= lowest
            current[:] = 0
            per_word[:] = 0
            per_chunk[:] = 0
            for t in range(live):
                current[t >> 6] |= one << np.uint64(t & 63)
                per_word[t >> 6] += 1
                per_chunk[t >> 12] += 1
            now = live
        for j in range(lo, hi):  # ascending ids: a later stamp for a larger id
            key = keys[j]
            t = stamp[key]
            if t >= 0:
                current[t >> 6] &= ~(one << np.uint64(t & 63))
                per_word[t >> 6] -= 1
                if chunked:
                    per_chunk[t >> 12] -= 1
            stamp[key], key_at[now] = now, key
            current[now >> 6] |= one << np.uint64(now & 63)
            per_word[now >> 6] += 1
            if chunked:
                per_chunk[now >> 12] += 1
            now += 1
    return hist


@njit(cache=True, nogil=True, inline="always")
def insert_sorted(keys, priorities, count, key, priority):
    """Insert into the first ``count`` entries, kept in ascending priority; returns the new count."""
    at = count
    while at > 0 and priorities[at - 1] > priority:
        keys[at], priorities[at] = keys[at - 1], priorities[at - 1]
        at -= 1
    keys[at], priorities[at] = key, priority
    return count + 1


@njit(cache=True, nogil=True)
def priority_stack_depths(keys, offsets, num_keys, policy, groups):
    """The request-at-once update of the module docstring, for LFU and OPT.

    Priorities are single int64 values, unique, so no tie is left to break: with j the
    entry's index (requests in order, keys ascending within one), LFU ``uses * (J + 1)
    + j`` (uses, then last use, then id) and OPT ``-(next request * N + N - 1 - key)``.
    The stack keeps each entry's priority beside its key (the walk reads contiguous
    memory), a pinned value marks the keys of the current request, and ``depth_of``
    maps keys to levels.
    The caller guarantees LFU's priority fits: (R + 1) * (J + 1) < 2**63.
    """
    num_requests = offsets.shape[0] - 1
    entries = keys.shape[0]
    stack = np.empty(num_keys, np.int64)
    priority = np.full(num_keys + LANES, np.iinfo(np.int64).max, np.int64)  # padded for block reads
    depth_of = np.zeros(num_keys, np.int64)  # 1-based level, 0 if never requested
    size = 0
    candidate = np.empty(num_keys, np.int64)  # ascending priority
    candidate_priority = np.empty(num_keys, np.int64)
    uses = np.zeros(num_keys, np.int64)
    following = next_request(keys, offsets, num_keys) if policy == OPT else np.zeros(0, np.int32)
    hist = np.zeros((num_keys + 1, groups), np.int64)
    for r in range(num_requests):
        lo, hi = offsets[r], offsets[r + 1]
        n = hi - lo
        group = r % groups
        deepest = 0
        new = 0
        for j in range(lo, hi):
            d = depth_of[keys[j]]
            hist[d, group] += 1
            if d > 0:
                priority[d - 1] = _PINNED
                deepest = max(deepest, d)
            else:
                new += 1
        stop = size if new > 0 else max(deepest, n)
        count = 0
        for level in range(min(n, stop)):  # the top n levels go to the request
            if priority[level] != _PINNED:
                count = insert_sorted(candidate, candidate_priority, count, stack[level], priority[level])
        # below, each level keeps the highest of its entry and the candidates (count >= 1,
        # as a key of the request still lies below): only levels whose entry is below the
        # highest candidate change (pinned ones included), found 16 levels at a time
        level = n
        while level < stop:
            below = below_mask(priority, level, candidate_priority[count - 1])
            if below == 0:
                level += LANES
                continue
            level += trailing_zeros(below)
            if level >= stop:
                break
            key, value = stack[level], priority[level]
            count -= 1
            placed = candidate[count]
            stack[level], priority[level] = placed, candidate_priority[count]
            depth_of[placed] = level + 1
            if value != _PINNED:
                count = insert_sorted(candidate, candidate_priority, count, key, value)
            level += 1
        level = max(stop, n)
        while count > 0:  # the stack grows by the new keys
            count -= 1
            stack[level], priority[level] = candidate[count], candidate_priority[count]
            depth_of[candidate[count]] = level + 1
            level += 1
        size += new
        for j in range(lo, hi):
            key = keys[j]
            level = j - lo
            stack[level] = key
            depth_of[key] = level + 1
            uses[key] += 1
            if policy == LFU:
                priority[level] = uses[key] * (entries + 1) + j
            else:
                priority[level] = -(np.int64(following[j]) * num_keys + (num_keys - 1 - key))
    return hist
