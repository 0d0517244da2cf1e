"""The one driver that runs any policy's hooks over a request stream, with optional
prefetch insertions and a per-request event record. Its contract (hooks, marks,
accounting) is the "Kernel contract" section of docs/semantics.md.

numba compiles ``serve`` once per set of hook functions passed to it, once per process:
it is not cached on disk, because numba's cache index keys it on the hook functions and
fails to load (ReferenceError) once a hook it recorded was renamed or moved, which
writing a new policy does. ``serve.py_func`` runs the same source with plain Python
hooks (``moecache.PythonPolicy``). A stream can be served in spans (``new_cache``,
``serve`` per span, ``finish``): the streaming replay does so.
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


def drive(init, access, admit, victim, evict, keep, keys, offsets, sizes, capacity, params, seed,
          scores, prefetch_keys, prefetch_offsets, record, outcomes):
    """Serve every request; returns (hits per request, events, per-key prefetch counts).
    A non-empty ``outcomes`` (int8, zeros, one per entry of ``keys`` then of
    ``prefetch_keys``) receives each entry's outcome: MISS, HIT or PREFETCH_HIT (the first
    demand use of a prefetched key) for a demand entry, 1 for a prefetch entry inserted.
    Compiled hooks run in ``serve``, plain Python ones (``PythonPolicy``) in its Python source.
    """
    state = init(keys, offsets, sizes, capacity, params, seed, scores)
    cache = new_cache(sizes.shape[0])
    run = serve if hasattr(access, "py_func") else serve.py_func
    hits, events = run(access, admit, victim, evict, keep, state, cache, 0, keys, offsets, sizes,
                       capacity, prefetch_keys, prefetch_offsets, record, outcomes)
    return hits, events, finish(cache)


@njit(cache=True, nogil=True)
def new_cache(num_keys):
    """The driver's own state of an empty cache: (resident, pinned, found, pending, counts,
    [count, used]); ``serve`` carries it from one span of requests to the next."""
    return (np.zeros(num_keys, np.bool_), np.full(num_keys, -1, np.int64), np.zeros(num_keys, np.bool_),
            np.zeros(num_keys, np.bool_), np.zeros((4, num_keys), np.int64), np.zeros(2, np.int64))


@njit(cache=True, nogil=True)
def finish(cache):
    """The per-key prefetch counts once the stream ends (a pending prefetch was wasted)."""
    pending, counts = cache[3], cache[4]
    for key in range(pending.shape[0]):
        if pending[key]:
            counts[WASTED, key] += 1
            pending[key] = False
    return counts


@njit(nogil=True)
def serve(access, admit, victim, evict, keep, state, cache, first, keys, offsets, sizes, capacity,
          prefetch_keys, prefetch_offsets, record, outcomes):
    """Serve one span of the stream: its requests are numbered from ``first`` on (``now``
    and the marks use these numbers), ``offsets`` index this span's ``keys``. Returns (hits
    per request, events) of the span; ``state`` and ``cache`` carry over to the next span.

    Invariants: ``used`` is the size of the residents; before request r's prefetch batch
    (phase 0, mark 2r) and its demand set (phase 1, mark 2r + 1), every key of the batch
    or set gets ``pinned[key] = mark`` and ``held`` / ``held_count`` count the residents so
    marked, so ``count > held_count`` means a victim exists. ``pending[k]`` is true while k
    is resident from a prefetch that no demand request has used yet.
    """
    resident, pinned, found, pending, counts, totals = cache
    num_keys = sizes.shape[0]
    num_requests = offsets.shape[0] - 1
    hits = np.zeros(num_requests, np.int32)
    events = np.zeros((num_requests if record else 0, 5), np.int32)
    prefetching = prefetch_offsets.shape[0] > 0
    tracing = outcomes.shape[0] > 0
    batch_base = keys.shape[0]  # where the prefetch entries' outcomes start
    count = totals[0]
    used = totals[1]
    for r in range(num_requests):
        for phase in range(2):
            if phase == 0:
                if not prefetching:
                    continue
                batch, lo, hi = prefetch_keys, prefetch_offsets[r], prefetch_offsets[r + 1]
            else:
                batch, lo, hi = keys, offsets[r], offsets[r + 1]
            now = first + r
            mark = 2 * now + phase
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
                    if phase == 1 and not keep(state, key, now, resident, pinned, mark):
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
                admit(state, key, now)
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
            access(state, key, first + r, found[key])
            found[key] = False
        if record:
            events[r, HITS] = hits[r]
            events[r, MISSES] = hi - lo - hits[r]
    totals[0] = count
    totals[1] = used
    return hits, events
