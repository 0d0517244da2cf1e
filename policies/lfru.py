"""LFRU: evict the expert with the lowest uses per unit of age, freq / (clock - last + 1).

LFRU as proposed for llama.cpp's and vLLM's expert caches (e1n00r: llama.cpp PR #21609,
vLLM PR #37190, whose reference implementation is ``LFRUPolicy`` in tinyserve's
``tinyserve/cache_policy.py``): a clock advances by one at every access, a hit or an
insertion; an inserted expert starts with freq 1 and each hit adds 1 (the count leaves
with the expert); ``last`` is the clock at its latest access; the victim has the lowest
freq / (clock - last + 1) at the moment of the miss, ties going to the expert inserted
first. Scores are compared exactly (as fractions, by cross-multiplication), not as
floats. Set steps: the clock ticks for a request's admissions (ascending id), then for
its hits (ascending id), the driver's order; a prefetch insertion ticks as an insertion.
No parameters; no libCacheSim counterpart.
"""

import numpy as np
from numba import njit

from .registry import Hooks, Policy, always_keep, no_evict


@njit(cache=True)
def init(keys, offsets, sizes, capacity, params, seed, scores):
    """State: (freq, last, inserted, clock): the counters per key and the clock."""
    num_keys = sizes.shape[0]
    return (np.zeros(num_keys, np.int64), np.zeros(num_keys, np.int64), np.zeros(num_keys, np.int64),
            np.zeros(1, np.int64))


@njit(cache=True)
def admit(state, key, now):
    freq, last, inserted, clock = state
    clock[0] += 1
    freq[key] = 1
    last[key] = clock[0]
    inserted[key] = clock[0]


@njit(cache=True)
def access(state, key, now, hit):
    if hit:  # a miss was counted when it was admitted
        freq, last, _, clock = state
        clock[0] += 1
        freq[key] += 1
        last[key] = clock[0]


@njit(cache=True)
def victim(state, resident, pinned, mark):
    """The candidate of lowest freq / age; a lower score means f_a x age_b < f_b x age_a."""
    freq, last, inserted, clock = state
    best, best_freq, best_age = -1, 0, 1
    for key in range(freq.shape[0]):
        if resident[key] and pinned[key] != mark:
            age = clock[0] - last[key] + 1
            lower = freq[key] * best_age - best_freq * age
            if best < 0 or lower < 0 or (lower == 0 and inserted[key] < inserted[best]):
                best, best_freq, best_age = key, freq[key], age
    return best


POLICY = Policy(
    name="lfru",
    description="evicts the lowest uses / (clock - last use + 1), the clock ticking at each access",
    hooks=Hooks(init, access, admit, victim, no_evict, always_keep),
    style={"linestyle": (0, (3, 1, 1, 1)), "marker": "X"}, rank=55,
    source="e1n00r, llama.cpp PR #21609 and vLLM PR #37190 (tinyserve/cache_policy.py, LFRUPolicy)")
