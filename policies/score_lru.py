"""Score-LRU: recency in which a use the router ranked higher counts as a later use.

BigRig's gaterank (bigrig 0.9.1, bigrig_engine/policies/gaterank.py, Apache-2.0; the
router-score aware recency the issue names beside CECAR): serve the requests one expert
at a time, a step's experts in router-rank order (rank 0 = the largest gate weight), and
number them 1, 2, ... across the whole stream (the tick). A use at tick t with rank r
gives its expert the key ``t + boost * w(r)``, with ``w(r) = (k - 1 - r) / (k - 1)``
(``w = 1`` when k = 1) for a request of k experts, so a rank-0 use counts as ``boost``
requests later than it happened. With ``monotone`` (BigRig's default) the key is
``max(old key, new)``: a use never lowers a resident's standing. The victim is the
resident with the lowest key, ties the smallest id (BigRig's heap of (key, id)). boost
= 0 is LRU over ticks; BigRig's reported setting is boost = 16, linear weights,
monotone, which are the defaults here.

Under set steps (docs/semantics.md) a step's experts are looked up together; each
expert's tick is the number of requests before the step plus its rank position in the
step (1-based), as if the step had been serialized in rank order. The rank comes from
the trace's router weights (the largest weight the expert got from the step's tokens;
ties: the smaller id first); a trace without weights is refused. A prefetched expert
enters with the key of the step's start (no rank: it was not requested).

The kernel (unit sizes) keeps the residents' keys in a slot array and scans it for the
lowest; the hooks' state = (key per key, value of each reference, cursor, params,
offsets): both compute every reference's ``t + boost * w(r)`` up front, and ``access``,
called for every key of every request in stream order, walks them with the cursor.
"""

import numpy as np
from numba import njit

from ._state import lowest_rank_victim, no_room
from .registry import Hooks, Param, Policy, always_keep, no_evict


@njit(cache=True, inline="always")
def request_values(scores, lo, hi, boost, order, value):
    """``value[i]`` = ``t + boost * w(r)`` of reference ``lo + i``: its tick when the request
    is served in rank order (weight descending, ties keep the smaller id first: an
    insertion sort of the request's positions in ``order``) plus its rank bonus."""
    width = hi - lo
    for i in range(width):
        j = i
        while j > 0 and scores[lo + order[j - 1]] < scores[lo + i]:
            order[j] = order[j - 1]
            j -= 1
        order[j] = i
    for rank in range(width):
        weight = 1.0 if width == 1 else (width - 1 - rank) / (width - 1)
        value[order[rank]] = lo + rank + 1 + boost * weight


@njit(cache=True)
def use_values(offsets, scores, boost):
    """``request_values`` of every request, one array over the stream (for the hooks)."""
    value = np.empty(scores.shape[0], np.float64)
    order = np.empty(scores.shape[0], np.int64)
    for r in range(offsets.shape[0] - 1):
        lo, hi = offsets[r], offsets[r + 1]
        request_values(scores, lo, hi, boost, order[lo:hi], value[lo:hi])
    return value


@njit(cache=True)
def simulate(keys, offsets, sizes, capacity, params, seed, scores):
    """Unit sizes. Invariant: ``slots[:count]`` holds the residents and ``key[s]`` the key of
    the resident in slot s, except that during request r the slots of its keys hold +inf
    (never the lowest, so never victims) and ``held`` their own keys, restored by the uses."""
    boost, monotone = params[0], params[1] != 0.0
    num_keys, num_requests = sizes.shape[0], offsets.shape[0] - 1
    order = np.empty(num_keys, np.int64)
    value = np.empty(num_keys, np.float64)
    slots = np.empty(num_keys, np.int64)
    key = np.empty(num_keys, np.float64)
    held = np.empty(num_keys, np.float64)
    where = np.full(num_keys, -1, np.int64)
    hits = np.zeros(num_requests, np.int32)
    count = 0
    for r in range(num_requests):
        lo, hi = offsets[r], offsets[r + 1]
        for j in range(lo, hi):
            s = where[keys[j]]
            if s >= 0:
                hits[r] += 1
                held[j - lo] = key[s]
                key[s] = np.inf
        for j in range(lo, hi):
            k = keys[j]
            if where[k] >= 0:
                continue
            if count >= capacity:
                lowest = np.inf
                for s in range(count):  # a reduction the compiler vectorizes
                    lowest = min(lowest, key[s])
                if lowest == np.inf:
                    no_room()
                out = -1
                for s in range(count):  # the smallest id among the lowest keys
                    if key[s] == lowest and (out < 0 or slots[s] < slots[out]):
                        out = s
                count -= 1  # swap-remove: the last slot moves into the victim's
                victim = slots[out]
                slots[out], key[out] = slots[count], key[count]
                where[slots[out]] = out
                where[victim] = -1
            slots[count], key[count], where[k] = k, np.inf, count
            held[j - lo] = offsets[r]  # a new resident's key: the tick before the request
            count += 1
        request_values(scores, lo, hi, boost, order, value)
        for j in range(lo, hi):
            key[where[keys[j]]] = max(held[j - lo], value[j - lo]) if monotone else value[j - lo]
    return hits


@njit(cache=True)
def init(keys, offsets, sizes, capacity, params, seed, scores):
    return (np.zeros(sizes.shape[0], np.float64), use_values(offsets, scores, params[0]),
            np.zeros(1, np.int64), params, offsets)


@njit(cache=True)
def access(state, key, now, hit):
    priority, value, cursor, params, _ = state
    j = cursor[0]
    cursor[0] = j + 1
    if params[1] != 0.0:
        priority[key] = max(priority[key], value[j])
    else:
        priority[key] = value[j]


@njit(cache=True)
def admit(state, key, now):
    """A new resident's key: the tick before request ``now`` (below any use in it)."""
    priority, _, _, _, offsets = state
    priority[key] = offsets[now]


POLICY = Policy(
    name="score-lru", description="recency in which a use the router ranked higher counts as later: key "
    "t + boost x (k-1-rank)/(k-1), never lowered while resident (BigRig's gaterank); needs router weights",
    hooks=Hooks(init, access, admit, lowest_rank_victim, no_evict, always_keep), needs_scores=True,
    kernel=simulate, unit_kernel=True,
    params=(Param("boost", 16, 0, 1e9, "requests a rank-0 use counts later than it happened"),
            Param("monotone", 1, 0, 1, "1: a use never lowers a key (BigRig's default); "
                  "0: the last use sets it", integer=True)),
    style={"linestyle": "-", "marker": "p"}, rank=45,
    source="bigrig 0.9.1, bigrig_engine/policies/gaterank.py (gaterank: boost=16, linear, monotone)")
