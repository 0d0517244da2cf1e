"""SIEVE: a FIFO queue swept by a hand that evicts the first unvisited expert.

As Zhang et al., "SIEVE is Simpler than LRU", NSDI'24, and libCacheSim's Sieve
(libCacheSim/cache/eviction/Sieve.c): residents stay in insertion order; a hit sets a
visited bit; new experts join the newest end unvisited. To evict, the hand, starting
where it stopped (at the oldest expert the first time and after it passed the newest),
moves from older to newer, clears the visited bits it meets and evicts the first expert
without one; it then rests on that expert's newer neighbour. Under set steps
(docs/semantics.md) the hand passes the current request's experts without clearing
their bits. On one expert per step it equals libCacheSim's hit count
(tests/test_libcachesim_b.py).

Fast kernel (``simulate``, unit sizes), two exact implementations:

* masks (at most 64 keys): the queue lives in the 64 cells of a window, oldest in the
  lowest occupied cell; a new expert takes cell ``end``, after every other, and when the
  window is used up the residents move down to cells 0..n-1 in order (n <= capacity, so
  once per 64 - capacity admissions at most). 64-bit masks over cells hold the occupied cells (``occ``),
  the visited bits (``seen``) and the cells of the current request (``pin``);
  ``cell_bit[key]`` is the bit of a resident key's cell, 0 for others. The hand is a
  cell: the hooks' hand key is the first occupied cell from ``hand`` on, and its
  sentinel ("start at the oldest") is ``hand`` = 0. It sweeps as ``_state.hand_sweep``.
* list (any number of keys): the hooks' linked list, the request's keys stamped with
  ``current[key] == r``, which the hand passes.

Hooks: state = (visited bit per key, the queue as a linked list from oldest to
newest, [the hand: a key, or the list's sentinel for "start at the oldest"]).
"""

import numpy as np
from numba import njit, uint64

from ._state import (
    below,
    bit_index,
    hand_sweep,
    list_append,
    list_new,
    list_unlink,
    no_room,
    popcount,
)
from .registry import Hooks, Policy, always_keep


@njit(cache=True, nogil=True)
def simulate(keys, offsets, sizes, capacity, params, seed):
    if sizes.shape[0] <= 64:
        return simulate_masks(keys, offsets, capacity)
    return simulate_list(keys, offsets, sizes.shape[0], capacity)


@njit(cache=True, nogil=True)
def simulate_masks(keys, offsets, capacity):
    key_of = np.zeros(64, np.int64)
    cell_bit = np.zeros(64, np.uint64)
    hits = np.zeros(offsets.shape[0] - 1, np.int32)
    resident = uint64(0)
    occ = uint64(0)
    seen = uint64(0)
    count = 0
    end = 0
    hand = 0
    for r in range(hits.shape[0]):
        lo, hi = offsets[r], offsets[r + 1]
        if hi - lo > capacity:
            no_room()
        step = uint64(0)
        pin = uint64(0)
        for j in range(lo, hi):
            step |= uint64(1) << uint64(keys[j])
            pin |= cell_bit[keys[j]]
        hits[r] = popcount(step & resident)
        seen |= pin  # the hand passes them untouched, so hits may be marked before admissions
        missing = step & ~resident
        resident |= step
        while missing:  # ascending ids
            bit = missing & (~missing + uint64(1))
            missing ^= bit
            key = bit_index(bit)
            if count == capacity:
                cell, seen = hand_sweep(occ & ~pin, seen, hand)
                occ ^= uint64(1) << uint64(cell)
                out = key_of[cell]
                resident ^= uint64(1) << uint64(out)
                cell_bit[out] = 0
                hand = cell + 1 if occ & ~below(cell) else 0  # past the newest: the oldest
            else:
                count += 1
            if end == 64:  # move the residents down to cells 0..n-1
                moved_seen = uint64(0)
                moved_pin = uint64(0)
                hand = popcount(occ & below(hand))
                end = 0
                while occ:
                    old = occ & (~occ + uint64(1))
                    occ ^= old
                    cell = bit_index(old)
                    moved = uint64(1) << uint64(end)
                    if seen & old:
                        moved_seen |= moved
                    if pin & old:
                        moved_pin |= moved
                    key_of[end] = key_of[cell]
                    cell_bit[key_of[end]] = moved
                    end += 1
                occ = below(end)
                seen = moved_seen
                pin = moved_pin
            cell_bit[key] = uint64(1) << uint64(end)
            key_of[end] = key
            occ |= cell_bit[key]
            pin |= cell_bit[key]
            end += 1
    return hits


@njit(cache=True, nogil=True)
def simulate_list(keys, offsets, num_keys, capacity):
    prev, nxt, head = list_new(num_keys)
    visited = np.zeros(num_keys, np.bool_)
    resident = np.zeros(num_keys, np.bool_)
    current = np.full(num_keys, -1, np.int64)
    hits = np.zeros(offsets.shape[0] - 1, np.int32)
    count = 0
    hand = head
    for r in range(hits.shape[0]):
        lo, hi = offsets[r], offsets[r + 1]
        if hi - lo > capacity:
            no_room()
        found = 0
        for j in range(lo, hi):
            key = keys[j]
            current[key] = r
            if resident[key]:
                found += 1
                visited[key] = True
        hits[r] = found
        if found == hi - lo:
            continue
        for j in range(lo, hi):
            key = keys[j]
            if resident[key]:
                continue
            if count == capacity:
                while True:
                    if hand == head:
                        hand = nxt[head]
                    if current[hand] != r:
                        if not visited[hand]:
                            break
                        visited[hand] = False
                    hand = nxt[hand]
                out = hand
                hand = nxt[out]
                list_unlink(prev, nxt, out)
                resident[out] = False
            else:
                count += 1
            list_append(prev, nxt, head, key)
            resident[key] = True
            visited[key] = False
    return hits


@njit(cache=True)
def init(keys, offsets, sizes, capacity, params, seed, scores):
    prev, nxt, head = list_new(sizes.shape[0])
    return np.zeros(sizes.shape[0], np.bool_), prev, nxt, np.full(1, head, np.int64)


@njit(cache=True)
def access(state, key, now, hit):
    if hit:
        state[0][key] = True


@njit(cache=True)
def admit(state, key, now):
    visited, prev, nxt, _ = state
    visited[key] = False
    list_append(prev, nxt, prev.shape[0] - 2, key)


@njit(cache=True)
def victim(state, resident, pinned, mark):
    visited, prev, nxt, hand = state
    head = prev.shape[0] - 2
    key = hand[0]
    while True:
        if key == head:  # past the newest: back to the oldest
            key = nxt[head]
        if pinned[key] != mark:
            if not visited[key]:
                return key
            visited[key] = False
        key = nxt[key]


@njit(cache=True)
def evict(state, key):
    _, prev, nxt, hand = state
    hand[0] = nxt[key]
    list_unlink(prev, nxt, key)


POLICY = Policy(
    name="sieve", description="SIEVE: a hand sweeping the insertion-ordered queue from oldest to newest "
    "evicts the first expert not hit since the hand last passed it",
    hooks=Hooks(init, access, admit, victim, evict, always_keep), kernel=simulate, unit_kernel=True,
    style={"linestyle": (0, (2, 1)), "marker": "P"}, rank=52,
    source="Zhang et al., SIEVE is Simpler than LRU, NSDI 2024; libCacheSim, cache/eviction/Sieve.c")
