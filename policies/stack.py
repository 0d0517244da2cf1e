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

from .opt import next_request

LRU, LFU, OPT = 0, 1, 2
_PINNED = np.iinfo(np.int64).max


@njit(cache=True, inline="always")
def _lower(major, minor, a, b):
    """True if key ``a`` has lower priority (is evicted before) key ``b``."""
    return major[a] < major[b] or (major[a] == major[b] and minor[a] < minor[b])


@njit(cache=True, nogil=True)
def stack_depths(keys, offsets, num_keys, policy):
    """Stack depth (1-based) of every entry of ``keys`` when requested; 0 = never seen."""
    num_requests = offsets.shape[0] - 1
    stack = np.empty(num_keys, np.int64)
    depth_of = np.zeros(num_keys, np.int64)  # current 1-based position, 0 if absent
    size = 0
    major = np.zeros(num_keys, np.int64)
    minor = np.zeros(num_keys, np.int64)
    uses = np.zeros(num_keys, np.int64)
    following = next_request(keys, offsets, num_keys) if policy == OPT else np.zeros(0, np.int32)
    depths = np.zeros(keys.shape[0], np.int64)
    for r in range(num_requests):
        lo, hi = offsets[r], offsets[r + 1]
        for j in range(lo, hi):
            major[keys[j]] = _PINNED
        for j in range(lo, hi):
            x = keys[j]
            d = depth_of[x]
            depths[j] = d
            if d == 1:
                continue
            bottom = size if d == 0 else d - 1  # deepest level the carry passes
            carry = stack[0] if size > 0 else x
            for i in range(1, bottom):
                here = stack[i]
                if _lower(major, minor, here, carry):
                    stack[i] = carry
                    depth_of[carry] = i + 1
                    carry = here
            if d == 0:
                if size > 0:
                    stack[size] = carry
                    depth_of[carry] = size + 1
                size += 1
            else:
                stack[d - 1] = carry
                depth_of[carry] = d
            stack[0] = x
            depth_of[x] = 1
        for j in range(lo, hi):
            k = keys[j]
            uses[k] += 1
            if policy == LRU:
                major[k], minor[k] = r, k
            elif policy == LFU:
                major[k], minor[k] = uses[k], r * num_keys + k
            else:
                major[k], minor[k] = -following[j], k
    return depths
