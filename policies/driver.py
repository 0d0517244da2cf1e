"""The one driver that runs any policy's hooks over a request stream, with optional
prefetch insertions and a per-request event record. Its contract (hooks, marks,
accounting) is the "Kernel contract" section of docs/semantics.md.

numba compiles ``drive`` once per set of hook functions passed to it, once per process:
it is not cached on disk, because numba's cache index keys it on the hook functions and
fails to load (ReferenceError) once a hook it recorded was renamed or moved, which
writing a new policy does. ``drive.py_func`` runs the same source with plain Python
hooks (``moecache.PythonPolicy``).
"""

import numpy as np
from numba import njit

from ._state import no_room

# columns of ``events``
EVENT_COLUMNS = ("hits", "misses", "evictions", "prefetched", "prefetch_evictions")
HITS, MISSES, EVICTIONS, PREFETCHED, PREFETCH_EVICTIONS = range(len(EVENT_COLUMNS))
# rows of the per-key prefetch counts
PREFETCHED_KEYS, USED, WASTED, DROPPED = range(4)
# ``outcomes`` of a demand entry (a prefetch entry's is 1 when the batch inserted it, else 0)
MISS, HIT, PREFETCH_HIT = range(3)


@njit(cache=True)
def bad_victim():
    raise ValueError("the victim hook returned a key that is not resident or is pinned")


@njit(nogil=True)
def drive(init, access, admit, victim, evict, keep, keys, offsets, sizes, capacity, params, seed,
          scores, prefetch_keys, prefetch_offsets, record, outcomes):
    """Serve every request; returns (hits per request, events, per-key prefetch counts).
    A non-empty ``outcomes`` (int8, zeros, one per entry of ``keys`` then of
    ``prefetch_keys``) receives each entry's outcome: MISS, HIT or PREFETCH_HIT (the first
    demand use of a prefetched key) for a demand entry, 1 for a prefetch entry inserted.

    Invariants: ``used`` is the size of the residents; before request r's prefetch batch
    (phase 0, mark 2r) and its demand set (phase 1, mark 2r + 1), every key of the batch
    or set gets ``pinned[key] = mark`` and ``held`` / ``held_count`` count the residents so
    marked, so ``count > held_count`` means a victim exists. ``pending[k]`` is true while k
    is resident from a prefetch that no demand request has used yet.
    """
    num_keys = sizes.shape[0]
    num_requests = offsets.shape[0] - 1
    state = init(keys, offsets, sizes, capacity, params, seed, scores)
    resident = np.zeros(num_keys, np.bool_)
    pinned = np.full(num_keys, -1, np.int64)
    found = np.zeros(num_keys, np.bool_)  # hits of the current request, for ``access``
    pending = np.zeros(num_keys, np.bool_)
    counts = np.zeros((4, num_keys), np.int64)
    hits = np.zeros(num_requests, np.int32)
    events = np.zeros((num_requests if record else 0, 5), np.int32)
    prefetching = prefetch_offsets.shape[0] > 0
    tracing = outcomes.shape[0] > 0
    batch_base = keys.shape[0]  # where the prefetch entries' outcomes start
    count = 0
    used = 0
    for r in range(num_requests):
        for phase in range(2):
            if phase == 0:
                if not prefetching:
                    continue
                batch, lo, hi = prefetch_keys, prefetch_offsets[r], prefetch_offsets[r + 1]
            else:
                batch, lo, hi = keys, offsets[r], offsets[r + 1]
            mark = 2 * r + phase
            held = 0
            held_count = 0
            for j in range(lo, hi):
                key = batch[j]
                if pinned[key] != mark and resident[key]:
                    held += sizes[key]
                    held_count += 1
                    if phase == 1:
                        hits[r] += 1
                        found[key] = True
                        if tracing:
                            outcomes[j] = PREFETCH_HIT if pending[key] else HIT
                        if pending[key]:
                            counts[USED, key] += 1
                            pending[key] = False
                pinned[key] = mark
            for j in range(lo, hi):
                key = batch[j]
                size = sizes[key]
                if resident[key]:
                    continue
                if used + size > capacity:
                    if phase == 0 and held + size > capacity:
                        counts[DROPPED, key] += 1
                        continue
                    if phase == 1 and not keep(state, key, r, resident, pinned, mark):
                        continue  # streamed through: fetched, not cached
                    while used + size > capacity:
                        if count == held_count:
                            no_room()
                        out = victim(state, resident, pinned, mark)
                        if out < 0 or out >= num_keys or not resident[out] or pinned[out] == mark:
                            bad_victim()
                        evict(state, out)
                        resident[out] = False
                        count -= 1
                        used -= sizes[out]
                        if pending[out]:
                            counts[WASTED, out] += 1
                            pending[out] = False
                        if record:
                            events[r, PREFETCH_EVICTIONS if phase == 0 else EVICTIONS] += 1
                admit(state, key, r)
                resident[key] = True
                count += 1
                used += size
                held += size
                held_count += 1
                if phase == 0:
                    pending[key] = True
                    counts[PREFETCHED_KEYS, key] += 1
                    if tracing:
                        outcomes[batch_base + j] = 1
                    if record:
                        events[r, PREFETCHED] += 1
        lo, hi = offsets[r], offsets[r + 1]
        for j in range(lo, hi):
            key = keys[j]
            access(state, key, r, found[key])
            found[key] = False
        if record:
            events[r, HITS] = hits[r]
            events[r, MISSES] = hi - lo - hits[r]
    for key in range(num_keys):
        if pending[key]:
            counts[WASTED, key] += 1
    return hits, events, counts
