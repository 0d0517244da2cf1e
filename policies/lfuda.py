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

Hooks only: state = (K, F and the request of K's last setting, per key; [L]); the
victim scan compares (K, last setting), the smallest id first among equals.
"""

import numpy as np
from numba import njit

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


POLICY = Policy(
    name="lfuda", description="LFU with dynamic aging: evicts the lowest key K = uses since insertion + "
    "age, the age being the last victim's K; ties: least recently set, then smallest id",
    hooks=Hooks(init, access, admit, victim, evict, always_keep),
    style={"linestyle": (0, (1, 2)), "marker": "<"}, rank=25,
    source="Arlitt et al., ACM SIGMETRICS PER 2000; libCacheSim, cache/eviction/LFUDA.c (LFUDA)")
