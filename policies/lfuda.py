"""LFUDA: LFU with dynamic aging (Arlitt, Cherkasova, Dilley, Friedrich, Jin, Evaluating
content management techniques for Web proxy caches, ACM SIGMETRICS PER 2000), with unit
cost and size as in libCacheSim's LFUDA (libCacheSim/cache/eviction/LFUDA.c).

The cache has an age L, 0 at first. An expert's key is K = F + L, set when it is
inserted (F = 1) and at each hit (F counts its uses since it was inserted, L is the
current age); the victim is the expert of lowest K, and L becomes the victim's K. Ties
(libCacheSim: the expert that reached its key first): least recently set, then smallest
id. Under set steps (docs/semantics.md) the victim is the lowest outside the current
request; hits of a request are counted after its admissions (at the age they left).

libCacheSim difference (tests/test_libcachesim_a.py): libCacheSim's LFUDA.c adds its
current minimum key to a hit expert's key (K += min, min = 0 before the first eviction)
instead of setting K = F + L, and then takes as its age the lowest key still cached.
Shortest case, capacity 2, ids 0 0 1 2 0: here the hit raises 0's key to 2, 2 evicts 1
(key 1) and the last 0 hits; in libCacheSim the hit leaves 0 at key 1, 2 evicts 0 (the
earlier of the two at key 1) and the last 0 misses. libcachesim 0.3.5 also crashes at
capacity 1 on ids 0 1 2 (its age then names an empty key, so it finds no victim), and
loops forever on some longer traces.

Hooks: state = (K, F and the request of K's last setting, per key; [L]); the victim
scan compares (K, last setting), the smallest id first among equals.

Fast kernel (``simulate``, unit sizes): the residents in ``_state``'s slots, each ranked
by one integer K x M + j (M entries in the stream, j the entry of the key's last setting):
entries run in request order and, within a request, in ascending id, so the rank orders
as (K, last setting, id). K never exceeds the entries served so far (L is the K of the
last victim, whose uses since insertion plus the age it saw count distinct earlier
entries, recursively), so the rank stays below M x (M + 1), within int64 up to 3e9
entries.
"""

import numpy as np
from numba import njit

from ._state import PINNED, lowest_slot, no_room, slots_add, slots_new, slots_remove
from .registry import Hooks, Policy, always_keep


@njit(cache=True)
def init(keys, offsets, sizes, capacity, params, seed, scores):
    num_keys = sizes.shape[0]
    return (np.zeros(num_keys, np.int64), np.zeros(num_keys, np.int64), np.full(num_keys, -1, np.int64),
            np.zeros(1, np.int64))


@njit(cache=True)
def admit(state, key, now):
    value, uses, last, age = state
    uses[key] = 1
    value[key] = 1 + age[0]
    last[key] = now


@njit(cache=True)
def access(state, key, now, hit):
    value, uses, last, age = state
    if hit:
        uses[key] += 1
        value[key] = uses[key] + age[0]
        last[key] = now


@njit(cache=True)
def victim(state, resident, pinned, mark):
    value, _, last, _ = state
    best = -1
    for key in range(value.shape[0]):
        if resident[key] and pinned[key] != mark and (best < 0 or value[key] < value[best] or (
                value[key] == value[best] and last[key] < last[best])):
            best = key
    return best


@njit(cache=True)
def evict(state, key):
    state[3][0] = state[0][key]


@njit(cache=True, nogil=True)
def simulate(keys, offsets, sizes, capacity, params, seed):
    """The hooks with their victim scan replaced by the lowest rank of a slot array; the
    request's residents hold rank PINNED from its first pass to its last (``access``),
    which ranks them (hits and admissions alike) at their new K and entry."""
    num_keys = sizes.shape[0]
    entries = keys.shape[0]
    slots, where, rank = slots_new(num_keys)
    value = np.zeros(num_keys, np.int64)
    uses = np.zeros(num_keys, np.int64)
    missed = np.empty(num_keys, np.int64)
    hits = np.zeros(offsets.shape[0] - 1, np.int32)
    age = 0
    count = 0
    for r in range(hits.shape[0]):
        lo, hi = offsets[r], offsets[r + 1]
        if hi - lo > capacity:
            no_room()
        num_missed = 0
        for j in range(lo, hi):
            key = keys[j]
            if where[key] >= 0:
                rank[where[key]] = PINNED
                uses[key] += 1
            else:
                missed[num_missed] = key
                num_missed += 1
        hits[r] = hi - lo - num_missed
        for i in range(num_missed):  # ascending ids
            if count == capacity:
                out = slots[lowest_slot(rank, count)]
                age = value[out]
                count = slots_remove(slots, where, rank, count, where[out])
            key = missed[i]
            uses[key] = 1
            value[key] = 1 + age
            count = slots_add(slots, where, rank, count, key, PINNED)
        for j in range(lo, hi):  # access: a hit's K at the age the admissions left
            key = keys[j]
            if uses[key] > 1:  # a hit (an admission has one use)
                value[key] = uses[key] + age
            rank[where[key]] = value[key] * entries + j
    return hits


POLICY = Policy(
    name="lfuda", description="LFU with dynamic aging: evicts the lowest key K = uses since insertion + "
    "age, the age being the last victim's K; ties: least recently set, then smallest id",
    hooks=Hooks(init, access, admit, victim, evict, always_keep), kernel=simulate, unit_kernel=True,
    style={"linestyle": (0, (1, 2)), "marker": "<"}, rank=25,
    source="Arlitt et al., ACM SIGMETRICS PER 2000; libCacheSim, cache/eviction/LFUDA.c (LFUDA)")
