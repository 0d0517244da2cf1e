"""LRU: evict the least recently used expert; ties (same request) -> smallest id.

Two exact implementations of the same order, chosen by ``simulate``:

* masks (at most 64 keys, unit sizes): ``groups[t]`` holds, as a 64-bit mask, the
  residents whose last use is request ``t`` (a key leaves its group when it is used
  again). Invariant: the groups partition the residents by last use, so victims are
  whole oldest groups and then the lowest bits (smallest ids) of the next; keys of the
  current request are only in the newest group, never reached by eviction. Its indices
  are unsigned (``_index.cell``): numba then skips its negative-index wraparound.
* stream (any size): the request stream itself is the recency list, its entries being
  in (request, ascending id) order, which is LRU's eviction order. Invariant: entry
  ``j`` is a live resident iff ``latest[keys[j]] == j`` and it lies at or after the
  eviction ``pointer``, before which every entry is dead; evicting advances the pointer
  to the next live entry, so each entry is passed once.
"""

import numpy as np
from numba import njit, uint64

from ._index import cell
from ._state import (
    fits_masks,
    lowest_bits,
    lowest_rank_victim,
    no_room,
    popcount,
)
from .registry import Hooks, Policy, SpanKernel, always_keep, no_evict


@njit(cache=True, nogil=True)
def simulate(keys, offsets, sizes, capacity, params, seed):
    if fits_masks(sizes):
        return simulate_masks(keys, offsets, capacity)
    return simulate_stream(keys, offsets, sizes, capacity)


@njit(cache=True, nogil=True)
def simulate_masks(keys, offsets, capacity):
    num_requests = offsets.shape[0] - 1
    groups = np.zeros(num_requests + 1, np.uint64)  # the last one: keys never used yet
    latest = np.full(64, num_requests, np.int32)
    hits = np.zeros(num_requests, np.int32)
    resident = uint64(0)
    count = 0
    oldest = 0
    for r in range(num_requests):
        lo, hi = offsets[cell(r)], offsets[cell(r + 1)]
        step = uint64(0)
        for j in range(lo, hi):
            key = cell(keys[cell(j)])
            bit = uint64(1) << key
            step |= bit
            groups[cell(latest[key])] &= ~bit  # the key leaves the group of its last use
            latest[key] = r
        found = popcount(step & resident)
        hits[cell(r)] = found
        misses = hi - lo - found
        evict = count + misses - capacity
        if evict > 0:
            if evict > count - found:
                no_room()
            count -= evict
            while evict > 0:  # whole groups at once, then the lowest bits of the last
                group = groups[cell(oldest)]
                take = lowest_bits(group, evict)
                evict -= popcount(take)
                groups[cell(oldest)] = group ^ take
                resident ^= take
                if group == take:
                    oldest += 1
        count += misses
        resident |= step
        groups[cell(r)] = step
    return hits


@njit(cache=True, nogil=True)
def simulate_stream(keys, offsets, sizes, capacity):
    num_keys = sizes.shape[0]
    latest = np.full(num_keys, -1, np.int64)  # the last entry of ``keys`` holding each key
    resident = np.zeros(num_keys, np.int64)
    hits = np.zeros(offsets.shape[0] - 1, np.int32)
    pointer = 0
    used = 0
    for r in range(hits.shape[0]):
        lo, hi = offsets[r], offsets[r + 1]
        found = 0
        need = 0
        for j in range(lo, hi):
            key = keys[j]
            here = resident[key]
            found += here
            need += (1 - here) * sizes[key]
            latest[key] = j
            resident[key] = 1
        hits[r] = found
        while used + need > capacity:
            while latest[keys[pointer]] != pointer:
                pointer += 1
            if pointer >= lo:
                no_room()
            resident[keys[pointer]] = 0
            used -= sizes[keys[pointer]]
            pointer += 1
        used += need
    return hits


# -- spans (the streaming replay): the stream algorithm above, over a span's entries
# preceded by the entries carried from the spans before: those still live (latest use of
# a resident key), in their order, at most one per key. Positions count from the first
# carried entry; the invariant of the stream algorithm holds over that joined sequence.


@njit(cache=True, nogil=True)
def span_state(num_keys):
    """(latest position per key, resident per key, carried keys, [bytes used, carried])."""
    return (np.full(num_keys, -1, np.int64), np.zeros(num_keys, np.int64), np.empty(num_keys, np.int32),
            np.zeros(2, np.int64))


@njit(cache=True, nogil=True)
def serve_span(state, keys, offsets, sizes, capacity, first, future):
    latest, resident, carry, scalars = state
    used, carried = scalars[0], scalars[1]
    hits = np.zeros(offsets.shape[0] - 1, np.int32)
    pointer = 0
    for r in range(hits.shape[0]):
        lo, hi = offsets[r], offsets[r + 1]
        found = 0
        need = 0
        for j in range(lo, hi):
            key = keys[j]
            here = resident[key]
            found += here
            need += (1 - here) * sizes[key]
            latest[key] = carried + j
            resident[key] = 1
        hits[r] = found
        while used + need > capacity:
            while pointer < carried and latest[carry[pointer]] != pointer:
                pointer += 1
            if pointer >= carried:  # past the carried entries: the span's own
                while latest[keys[pointer - carried]] != pointer:
                    pointer += 1
                if pointer >= carried + lo:
                    no_room()
                key = keys[pointer - carried]
            else:
                key = carry[pointer]
            resident[key] = 0
            used -= sizes[key]
            pointer += 1
        used += need
    live = 0  # compacted in place: position ``live`` <= ``position`` was already read
    for position in range(pointer, carried):
        if latest[carry[position]] == position:
            carry[live] = carry[position]
            latest[carry[live]] = live
            live += 1
    for position in range(max(pointer, carried), carried + keys.shape[0]):
        key = keys[position - carried]
        if latest[key] == position:
            carry[live] = key
            latest[key] = live
            live += 1
    scalars[0], scalars[1] = used, live
    return hits


# -- hooks (docs/semantics.md, "Kernel contract"): state = (a request stamp per key,),
# the last use; a prefetched key counts as used when it is inserted. FIFO shares them.


@njit(cache=True)
def new_stamps(keys, offsets, sizes, capacity, params, seed, scores):
    return (np.full(sizes.shape[0], -1, np.int64),)


@njit(cache=True)
def stamp(state, key, now):
    state[0][key] = now


@njit(cache=True)
def access(state, key, now, hit):
    stamp(state, key, now)


POLICY = Policy(
    name="lru", description="evicts the least recently used expert; ties: smallest id",
    hooks=Hooks(new_stamps, access, stamp, lowest_rank_victim, no_evict, always_keep),
    kernel=simulate, stack="lru", spans=SpanKernel(span_state, serve_span),
    style={"linestyle": "-", "marker": "o"}, rank=10,
    source="Mattson et al., Evaluation techniques for storage hierarchies, IBM Systems Journal 1970")
