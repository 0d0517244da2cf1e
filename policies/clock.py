"""CLOCK (second chance): FIFO that gives referenced experts another round.

As libCacheSim's Clock (libCacheSim/cache/eviction/Clock.c, n-bit-counter=1): residents
sit in a ring in insertion order, each with a counter of ``bits`` bits (at most
2**(bits-1)); an expert enters just behind the hand with counter 0, a hit raises its
counter by one up to the maximum, and the hand, starting where it stopped, evicts the
first expert with counter 0, decrementing the counters it passes. Under set steps
(docs/semantics.md) the hand passes the current request's experts without touching
them.

Fast kernel (``simulate``, unit sizes): the ring is an array of ``min(capacity, keys)``
slots. Until it is full, experts fill the slots in order and no victim is needed, so the
hand rests on slot 0; once full, every miss evicts one expert and takes its slot, and the
hand moves past it. Invariant: read from ``hand`` onwards, the slots are the hooks' ring
from its head. The hand skips the current request's keys, so a hit may raise its counter
before the request's admissions. Two exact implementations of it:

* masks (``bits`` = 1, at most 64 keys): 64-bit masks over slots hold the counters
  (``ref``) and the slots of the current request (``pin``); ``slot_bit[key]`` is the bit
  of a resident key's slot, 0 for others. The hand (``_state.hand_sweep``) stops at the
  first slot outside ``pin`` and ``ref``, clearing the bits of ``ref`` outside ``pin``
  that it passes.
* ring (any ``bits``, any number of keys): the hand walks the slots one by one; the
  request's keys carry the stamp ``current[key] == r``.

Hooks: state = (counter per key, ring as a linked list whose head side is the hand,
[maximum counter]); passing an expert moves it to the ring's tail.
"""

import numpy as np
from numba import njit, uint64

from ._state import below, bit_index, hand_sweep, list_append, list_new, list_unlink, no_room, popcount
from .registry import Hooks, Param, Policy, always_keep

ONES = np.uint64(0xFFFFFFFFFFFFFFFF)


@njit(cache=True, nogil=True)
def simulate(keys, offsets, sizes, capacity, params, seed):
    num_keys = sizes.shape[0]
    if params[0] == 1 and num_keys <= 64:
        return simulate_masks(keys, offsets, min(capacity, num_keys), capacity)
    return simulate_ring(keys, offsets, num_keys, capacity, 1 << (int(params[0]) - 1))


@njit(cache=True, nogil=True)
def simulate_masks(keys, offsets, slots, capacity):
    key_of = np.zeros(slots, np.int64)
    slot_bit = np.zeros(64, np.uint64)
    full = ONES if slots == 64 else below(slots)
    hits = np.zeros(offsets.shape[0] - 1, np.int32)
    resident = uint64(0)
    ref = uint64(0)
    count = 0
    hand = 0
    for r in range(hits.shape[0]):
        lo, hi = offsets[r], offsets[r + 1]
        if hi - lo > capacity:
            no_room()
        step = uint64(0)
        pin = uint64(0)
        for j in range(lo, hi):
            step |= uint64(1) << uint64(keys[j])
            pin |= slot_bit[keys[j]]
        hits[r] = popcount(step & resident)
        ref |= pin
        missing = step & ~resident
        resident |= step
        while missing:  # ascending ids
            bit = missing & (~missing + uint64(1))
            missing ^= bit
            key = bit_index(bit)
            if count < slots:
                slot = count
                count += 1
            else:
                slot, ref = hand_sweep(full & ~pin, ref, hand)
                out = key_of[slot]
                resident ^= uint64(1) << uint64(out)
                slot_bit[out] = 0
                hand = slot + 1 if slot + 1 < slots else 0
            key_of[slot] = key
            slot_bit[key] = uint64(1) << uint64(slot)
            pin |= slot_bit[key]
    return hits


@njit(cache=True, nogil=True)
def simulate_ring(keys, offsets, num_keys, capacity, top):
    ring = np.empty(min(capacity, num_keys), np.int32)
    counter = np.zeros(num_keys, np.int32)
    resident = np.zeros(num_keys, np.bool_)
    current = np.full(num_keys, -1, np.int64)
    hits = np.zeros(offsets.shape[0] - 1, np.int32)
    count = 0
    hand = 0
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
                counter[key] = min(counter[key] + 1, top)
        hits[r] = found
        if found == hi - lo:
            continue
        for j in range(lo, hi):
            key = keys[j]
            if resident[key]:
                continue
            if count < ring.shape[0]:
                ring[count] = key
                count += 1
            else:
                while True:
                    out = ring[hand]
                    if current[out] != r:
                        if counter[out] == 0:
                            break
                        counter[out] -= 1
                    hand = hand + 1 if hand + 1 < count else 0
                resident[out] = False
                ring[hand] = key
                hand = hand + 1 if hand + 1 < count else 0
            resident[key] = True
            counter[key] = 0
    return hits


@njit(cache=True)
def init(keys, offsets, sizes, capacity, params, seed, scores):
    prev, nxt, _ = list_new(sizes.shape[0])
    top = np.full(1, 1 << (int(params[0]) - 1), np.int64)
    return np.zeros(sizes.shape[0], np.int64), prev, nxt, top


@njit(cache=True)
def access(state, key, now, hit):
    counter, _, _, top = state
    if hit and counter[key] < top[0]:
        counter[key] += 1


@njit(cache=True)
def admit(state, key, now):
    counter, prev, nxt, _ = state
    counter[key] = 0
    list_append(prev, nxt, prev.shape[0] - 2, key)


@njit(cache=True)
def victim(state, resident, pinned, mark):
    counter, prev, nxt, _ = state
    head = prev.shape[0] - 2
    while True:
        key = nxt[head]
        if pinned[key] != mark:
            if counter[key] == 0:
                return key
            counter[key] -= 1
        list_unlink(prev, nxt, key)
        list_append(prev, nxt, head, key)


@njit(cache=True)
def evict(state, key):
    list_unlink(state[1], state[2], key)


POLICY = Policy(
    name="clock", description="CLOCK (second chance): the hand evicts the first expert whose reference "
    "counter is 0, decrementing those it passes; hits raise the counter, new experts enter with 0",
    hooks=Hooks(init, access, admit, victim, evict, always_keep), kernel=simulate, unit_kernel=True,
    params=(Param("bits", 1, 1, 8, "bits of the reference counter (1: second chance)", integer=True),),
    style={"linestyle": (0, (1, 1)), "marker": "v"}, rank=50,
    source="libCacheSim, cache/eviction/Clock.c (Clock, n-bit-counter=1)")
