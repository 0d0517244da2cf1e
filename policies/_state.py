"""Small numba data structures shared by the policy kernels and hooks.

Every kernel sees the same input: ``keys`` (int32), the expert ids of all requests in
order, ``offsets`` (int64, one more than the requests) delimiting each request, whose
keys are distinct and ascending; ``sizes`` (int64 per key) and ``capacity`` in the same
units. It returns the hits of every request (int32). Keys of the current request are
never eviction candidates (docs/semantics.md).

All of a request's misses are admitted together after its victims are evicted. That
equals admitting them one by one in ascending id order: victims are never keys of the
request and their order does not change during it, so one miss after another evicts a
prefix of the same victim order, and together they evict its shortest prefix that
makes room for all of them.
"""

import numpy as np
from numba import njit

from ._index import cell


@njit(cache=True)
def no_room():
    raise ValueError("capacity is below the size of one request")


# -- doubly linked list over keys ----------------------------------------------------
# Nodes 0..N-1 are keys, N is the list's sentinel ``head`` and N+1 a ``sink``: a key
# that is not on the list points to the sink, so unlinking it is a harmless no-op and
# the hot loops need no branch.


@njit(cache=True, inline="always")
def list_new(num_keys):
    """(prev, next, head): an empty list; every key points to the sink."""
    prev = np.full(num_keys + 2, num_keys + 1, np.int32)
    nxt = np.full(num_keys + 2, num_keys + 1, np.int32)
    head = num_keys
    prev[head] = head
    nxt[head] = head
    return prev, nxt, head


@njit(cache=True, inline="always")
def list_unlink(prev, nxt, key):
    """Take ``key`` off the list (a no-op for a key that is not on it)."""
    before, after = prev[key], nxt[key]
    nxt[before] = after
    prev[after] = before
    sink = prev.shape[0] - 1
    prev[key] = sink
    nxt[key] = sink


@njit(cache=True, inline="always")
def list_append(prev, nxt, head, key):
    """Insert ``key`` just before the sentinel, i.e. at the newest end."""
    last = prev[head]
    nxt[last] = key
    prev[key] = last
    nxt[key] = head
    prev[head] = key


# -- resident slots with a dense priority per slot -----------------------------------
# ``slots[:count]`` lists the residents, ``where[key]`` is a key's slot (-1 if absent) and
# ``rank[s]`` the eviction rank of the key in slot ``s``: the kernel evicts the lowest.
# Keeping ranks in slot order makes the victim search one contiguous scan.


@njit(cache=True, inline="always")
def slots_new(num_keys):
    return (np.empty(num_keys, np.int64), np.full(num_keys, -1, np.int64),
            np.empty(num_keys, np.int64))


@njit(cache=True, inline="always")
def slots_remove(slots, where, rank, count, index):
    """Swap-remove the key in slot ``index``; returns the new count."""
    last = count - 1
    key = slots[index]
    moved = slots[last]
    slots[index] = moved
    rank[index] = rank[last]
    where[moved] = index
    where[key] = -1
    return last


@njit(cache=True, inline="always")
def slots_add(slots, where, rank, count, key, value):
    slots[count] = key
    where[key] = count
    rank[count] = value
    return count + 1


PINNED = np.iinfo(np.int64).max  # rank of a key of the current request: never a victim


@njit(cache=True, inline="always")
def lowest_slot(rank, count):
    """Slot holding the lowest rank (the first of equals); fails if every resident is pinned."""
    lowest = PINNED
    for s in range(count):  # a branch-free reduction the compiler vectorizes
        lowest = min(lowest, rank[s])
    if lowest == PINNED:
        no_room()
    best = 0
    while rank[best] != lowest:
        best += 1
    return best


@njit(cache=True, inline="always")
def lowest_candidate(priority, resident, pinned, mark):
    """The resident key with ``pinned[key] != mark`` of lowest ``priority``, the smallest id
    among equals; -1 if there is none. One scan over all keys (the hooks' victim search)."""
    best = -1
    for key in range(priority.shape[0]):
        if resident[key] and pinned[key] != mark and (best < 0 or priority[key] < priority[best]):
            best = key
    return best


@njit(cache=True)
def lowest_rank_victim(state, resident, pinned, mark):
    """The ``victim`` hook of policies whose ``state[0]`` ranks every key, lowest evicted
    first (LRU: last use; LFU: uses, then last use; OPT: minus the next request)."""
    return lowest_candidate(state[0], resident, pinned, mark)


# -- 64-bit expert masks, for caches over at most 64 keys of unit size ----------------

MASK_KEYS = 64


@njit(cache=True)
def fits_masks(sizes):
    """True when the mask kernels apply: at most 64 keys, all of size 1."""
    if sizes.shape[0] > MASK_KEYS:
        return False
    for size in sizes:
        if size != 1:
            return False
    return True


@njit(cache=True, inline="always")
def request_mask(keys, lo, hi):
    mask = np.uint64(0)
    for j in range(lo, hi):
        mask |= np.uint64(1) << np.uint64(keys[cell(j)])
    return mask


@njit(cache=True, inline="always")
def popcount(mask):
    """Set bits of a uint64, by SWAR: sums of 2, 4, 8 bits, then of the 8 bytes at once."""
    mask = mask - ((mask >> np.uint64(1)) & np.uint64(0x5555555555555555))
    mask = (mask & np.uint64(0x3333333333333333)) + ((mask >> np.uint64(2)) & np.uint64(0x3333333333333333))
    mask = (mask + (mask >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return np.int64((mask * np.uint64(0x0101010101010101)) >> np.uint64(56))


@njit(cache=True, inline="always")
def lowest_bits(mask, n):
    """The ``n`` lowest set bits of a uint64 (all of them if it has at most ``n``)."""
    if popcount(mask) <= n:
        return mask
    kept = mask
    for _ in range(n):
        kept &= kept - np.uint64(1)  # drop the lowest set bit
    return mask ^ kept


# index of a one-bit mask by de Bruijn multiplication: bit i -> table slot -> i
_DE_BRUIJN = np.uint64(0x03F79D71B4CB0A89)
_BIT_INDEX = np.zeros(64, np.int64)
for _i in range(64):
    _BIT_INDEX[((1 << _i) * int(_DE_BRUIJN) % 2**64) >> 58] = _i


@njit(cache=True, inline="always")
def bit_index(one_bit):
    """i for the mask ``1 << i``."""
    return _BIT_INDEX[(one_bit * _DE_BRUIJN) >> np.uint64(58)]


@njit(cache=True, inline="always")
def below(i):
    """The mask of bits 0..i-1 (i < 64)."""
    return (np.uint64(1) << np.uint64(i)) - np.uint64(1)


@njit(cache=True, inline="always")
def hand_sweep(free, ref, hand):
    """A CLOCK hand over a ring of 64-bit mask positions (clock, sieve): starting at bit
    ``hand`` and going up, wrapping to bit 0, it passes the bits of ``free`` that are in
    ``ref`` (a reference bit), clearing them, and stops at the first one that is not; if
    every bit of ``free`` is in ``ref``, a whole turn clears them all first. Returns (the
    bit it stops at, the new ``ref``); ``free`` must not be empty."""
    zero = free & ~ref
    if zero == 0:
        ref &= ~free
        zero = free
    ahead = zero & ~below(hand)
    first = ahead if ahead else zero
    stop = bit_index(first & (~first + np.uint64(1)))
    passed = below(stop) ^ below(hand)  # [hand, stop) read cyclically
    if stop < hand:
        passed = ~passed
    return stop, ref & ~(passed & free)
