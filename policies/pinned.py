"""Pinned: the ``n`` experts most routed in a training prefix stay resident; the rest under LRU.

A static hot-expert profile (pinning the most-used experts from a routing profile, as
fitz-tec and experts4bit do) made causal: the policy counts, for each key, the requests
holding it among the first T = ceil(``train`` x R) of the stream's R requests, and never
reads past them. Until request T it is plain LRU (it is still counting); from request T
on, the ``n`` keys with the highest counts (ties: smallest id; keys never requested in
the prefix are not pinned) are evicted only when no other key can go. Victims: the least
recently used unpinned key, ties smallest id; if every candidate is pinned (the cache is
too small for the profile), the least recently used pinned one. Pinned keys enter the
cache on their first miss like any other (the cache starts empty), then stay.

The profile is per request stream, i.e. per cache: each layer's own in layer scope, and
the pooled keys ``layer x E + expert`` in global scope, where ``n`` counts the keys
pinned in the whole pool (the hooks do not see the layer of a key). ``train`` must be
positive: a profile needs at least one training request. Hits before request T are
LRU's on the profile's own training requests; to score only requests the profile did
not see, count hits from request T on (``record_events=True`` gives them per step).
"""

import math

import numpy as np
from numba import njit

from ._state import lowest_candidate
from .registry import Hooks, Param, Policy, always_keep, no_evict


@njit(cache=True)
def init(keys, offsets, sizes, capacity, params, seed, scores):
    """State: (ranks, start, counts). ``ranks[0]`` is each key's last use (LRU), ``ranks[1]``
    the same plus R for a pinned key, so it ranks after every unpinned one; ``start[0]`` =
    T; ``counts`` the requests holding each key among the first T."""
    num_keys = sizes.shape[0]
    blank = (np.full((2, num_keys), -1, np.int64), np.zeros(1, np.int64), np.zeros(num_keys, np.int64))
    return resume(blank, keys, offsets, scores, params, 0, 0, offsets.shape[0] - 1, offsets[:0])


@njit(cache=True)
def resume(state, keys, offsets, scores, params, first, first_entry, total, future):
    """Counts the span's requests before T; the span that reaches T chooses the profile."""
    ranks, start, counts = state
    train, n = params[0], int(params[1])
    end = first + offsets.shape[0] - 1  # this span holds requests first .. end - 1
    start[0] = min(total, int(math.ceil(train * total)))
    if first < start[0]:
        for j in range(offsets[min(start[0], end) - first]):
            counts[keys[j]] += 1
        if start[0] <= end:
            order = np.argsort(-counts, kind="mergesort")  # stable: ties keep the smallest id first
            for i in range(min(n, counts.shape[0])):
                if counts[order[i]] > 0:
                    ranks[1, order[i]] = ranks[0, order[i]] + total
    return ranks, start, counts


@njit(cache=True)
def stamp(state, key, now):
    """A use (or an insertion): the last use, in both rankings."""
    ranks = state[0]
    ranks[1, key] += now - ranks[0, key]
    ranks[0, key] = now


@njit(cache=True)
def access(state, key, now, hit):
    stamp(state, key, now)


@njit(cache=True)
def victim(state, resident, pinned, mark):
    ranks, start, _ = state
    pinning = mark // 2 >= start[0]  # mark = 2 x request (+ 1 for the demand phase)
    return lowest_candidate(ranks[1] if pinning else ranks[0], resident, pinned, mark)


POLICY = Policy(
    name="pinned",
    description="the n experts most routed in a training prefix stay resident, the rest under LRU",
    hooks=Hooks(init, access, stamp, victim, no_evict, always_keep), resume=resume,
    params=(Param("train", 0.1, 1e-6, 1.0, "share of the requests counted before pinning (the training "
                  "prefix; LRU until its end)"),
            Param("n", 2, 0, 1 << 20, "experts pinned per cache: per layer in layer scope, over all "
                  "layers in global scope", integer=True)),
    style={"linestyle": (0, (5, 2)), "marker": "P"}, rank=60,
    source="hot-expert pinning from a routing profile (fitz-tec, experts4bit); LRU: Mattson et al. 1970")
