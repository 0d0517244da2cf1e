"""One pass for every capacity: Mattson's priority stack for ``lru``, ``lfu`` and ``opt``.

These policies evict the resident of lowest priority, and a key's priority changes only
when the key is requested (LRU: last use; LFU: uses, then last use; OPT: next use), so
they are stack algorithms: a cache of C experts always holds the top C entries of one
stack, and a request hits every capacity at least as deep as the key's stack position.

Invariant of the update (Mattson et al., 1970): when key ``x`` at depth ``d`` is
requested, ``carry`` is, at level i, the lowest-priority entry of ``stack[:i]``: the
victim of the cache of size i. It sinks until level ``d`` (or the bottom, for a key
never seen), each level keeping the higher-priority of ``carry`` and its own entry.

DESIGN's set requests are served key by key in ascending id order with every key of
the request pinned at top priority until the request ends, which reproduces "misses
are admitted in ascending id order and never evict a key of the current request" for
every capacity at least the largest set; smaller capacities are invalid and not
reported.
"""

import numpy as np
from numba import njit

from ._state import popcount
from .opt import next_request

LRU, LFU, OPT = 0, 1, 2
_PINNED = np.iinfo(np.int64).max


@njit(cache=True, nogil=True)
def depth_histogram(keys, offsets, num_keys, policy, groups):
    """Counts of stack depths, shape (num_keys + 1, groups): row d counts the requested
    entries found at depth d (1-based; 0 = never seen before), column ``r % groups`` of
    their request r (the MoE layer, in global scope)."""
    if policy == LRU and num_keys <= 64:
        return lru_depths_masks(keys, offsets, num_keys, groups)
    return priority_stack_depths(keys, offsets, num_keys, policy, groups)


@njit(cache=True, nogil=True)
def lru_depths_masks(keys, offsets, num_keys, groups):
    """LRU depths for at most 64 keys, without a stack.

    For LRU the priority stack at the start of a request is the order of (last use, id),
    and a key of the request keeps its position until served (pinned keys never move
    while the carry passes them), so its depth is one plus the keys ranked above it at
    the start: ``above[x]``, a 64-bit mask kept for every key. Invariant: between
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
def priority_stack_depths(keys, offsets, num_keys, policy, groups):
    """Mattson's update for any of the three policies (see the module docstring).

    The stack keeps each entry's priority (``major``, ``minor``) beside its key, so the
    carry loop reads contiguous memory; ``depth_of`` maps keys to positions.
    """
    num_requests = offsets.shape[0] - 1
    stack = np.empty(num_keys, np.int64)
    major = np.empty(num_keys, np.int64)
    minor = np.empty(num_keys, np.int64)
    depth_of = np.zeros(num_keys, np.int64)  # current 1-based position, 0 if absent
    size = 0
    uses = np.zeros(num_keys, np.int64)
    following = next_request(keys, offsets, num_keys) if policy == OPT else np.zeros(0, np.int32)
    hist = np.zeros((num_keys + 1, groups), np.int64)
    for r in range(num_requests):
        lo, hi = offsets[r], offsets[r + 1]
        for j in range(lo, hi):
            if depth_of[keys[j]] > 0:
                major[depth_of[keys[j]] - 1] = _PINNED
        for j in range(lo, hi):
            x = keys[j]
            d = depth_of[x]
            hist[d, r % groups] += 1
            if d == 1:
                continue
            bottom = size if d == 0 else d - 1  # deepest level the carry passes
            if size > 0:
                carry, carry_major, carry_minor = stack[0], major[0], minor[0]
                for i in range(1, bottom):
                    if major[i] < carry_major or (major[i] == carry_major and minor[i] < carry_minor):
                        here, here_major, here_minor = stack[i], major[i], minor[i]
                        stack[i], major[i], minor[i] = carry, carry_major, carry_minor
                        depth_of[carry] = i + 1
                        carry, carry_major, carry_minor = here, here_major, here_minor
                slot = size if d == 0 else d - 1
                stack[slot], major[slot], minor[slot] = carry, carry_major, carry_minor
                depth_of[carry] = slot + 1
            if d == 0:
                size += 1
            stack[0], major[0], minor[0] = x, _PINNED, 0
            depth_of[x] = 1
        for j in range(lo, hi):
            k = keys[j]
            uses[k] += 1
            at = depth_of[k] - 1
            if policy == LRU:
                major[at], minor[at] = r, k
            elif policy == LFU:
                major[at], minor[at] = uses[k], r * num_keys + k
            else:
                major[at], minor[at] = -following[j], k
    return hist
