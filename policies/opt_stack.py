"""OPT's stack depths at every capacity from the past alone, for requests of one size K.

Belady with set requests (docs/semantics.md) keeps, at each capacity C, exactly the reuses that a
greedy pass in order of reuse time accepts (ties within a request: larger ids first, as
Belady evicts the smallest id first): the reuse of a key last requested at p, now at t,
hits iff at every request strictly between there is a slot left beside that request's K
keys and the reuses kept so far. A depth therefore depends only on the past (Bilardi,
Ekanadham and Pattnaik, "Optimal on-line computation of stack distances for MIN and
OPT", CF 2017, show the same for single requests).

Let slack_C(q) be the fewest free slots at capacity C over the requests after time q.
It counts a multiset L_C of past times, slack_C(q) = #{e in L_C : e <= q}, and the
multisets nest: L_C is L_K (the latest time, K times) plus one *marker* time for each
capacity K+1..C. So, for the reuse of a key last requested at p < t - 1:

- its depth d is the first capacity whose marker is <= p (a reuse from t - 1 hits at K);
- keeping it takes, from every L_C with C >= d, the largest time <= p and adds t - 1:
  marker d becomes t - 1 and the old values move one step along the *records* (the
  later markers whose value is a new maximum <= p); the largest marker <= p drops out.

Per reuse that is a search for d, a few blocks of record shifting (16 markers per
vector step, see _simd.py; records hold values between d's old one and p, so on long
marker arrays the blocks without such a value are skipped, 64 markers per test) and a
predecessor lookup in a bitset over times, instead of a walk down the stack. Equal to
the priority-stack walk of stack.py (tested).
"""

import numpy as np
from numba import njit
from numba.cpython.unsafe.numbers import leading_zeros, trailing_zeros

from ._simd import LANES, minimum_after_shift, shift_records, window_mask, window_mask64

_FAR = np.int32(np.iinfo(np.int32).max)  # pads the marker blocks: never <= a time
_LOWEST = np.int32(np.iinfo(np.int32).min)
_BEFORE = np.int32(-2)  # below every time (times start at -1, "before the trace")
TIME_LIMIT = 2**31 - 2  # times are int32
# From this many blocks of markers on (about 3,600 keys), the record shift skips blocks
# that cannot hold a record, 64 markers per test; below it, shifting every block is
# faster (synthetic traces: the two cross between 3,000 and 4,000 keys).
SKIP_FROM_BLOCKS = 224


@njit(cache=True, nogil=True)
def uniform_size(offsets):
    """Whether every request has the same number of keys."""
    for r in range(1, offsets.shape[0] - 1):
        if offsets[r + 1] - offsets[r] != offsets[1] - offsets[0]:
            return False
    return True


@njit(cache=True)
def lost():
    raise AssertionError("OPT marker kernel: a marker it relies on is missing (a bug)")


@njit(cache=True, nogil=True)
def opt_marker_depths(keys, offsets, num_keys, groups):
    """Depth counts as in ``stack.depth_histogram`` for OPT, requests of one size K < 2**31 - 2
    in number. Rows 1..K are not separated (any reuse from the previous request is row 1).

    Invariant between reuses: marker[i] is the marker time of capacity K + 1 + i (then
    _FAR padding), block_min[b] the least of marker[16b:16b + 16], and the multiset of
    marker values is ``holders`` (the count of value v at v + 1) with ``present`` (bit
    v + 1 set iff that count is not 0). One flat loop: helpers cost ~10% here.
    """
    num_requests = offsets.shape[0] - 1
    size = offsets[1] - offsets[0] if num_requests else 0
    markers = num_keys - size
    blocks = (markers + LANES - 1) // LANES
    marker = np.full((blocks + 4) * LANES, _FAR, np.int32)  # whole skip windows past the end
    marker[:markers] = -1  # before the trace every capacity has room
    block_min = np.full(blocks + 3 * LANES, _FAR, np.int32)  # whole windows past the end
    block_min[:blocks] = -1
    skip = blocks >= SKIP_FROM_BLOCKS
    holders = np.zeros(num_requests + 2, np.int32)
    present = np.zeros((num_requests + 2 + 63) // 64, np.uint64)
    holders[0] = markers
    present[0] = np.uint64(markers > 0)
    last = np.full(num_keys, -1, np.int32)  # the last request of each key
    hist = np.zeros((num_keys + 1, groups), np.int64)
    one = np.uint64(1)
    for t in range(num_requests):
        lo, hi = offsets[t], offsets[t + 1]
        group = t % groups
        now = np.int32(t - 1)
        for j in range(hi - 1, lo - 1, -1):  # larger ids first
            key = keys[j]
            p = last[key]
            if p < 0:
                hist[0, group] += 1
                continue
            if p == now:
                hist[1, group] += 1
                continue
            # top: the largest marker value <= p
            bit = p + 1
            word = bit >> 6
            bits = present[word] & ((one << np.uint64(bit & 63)) | ((one << np.uint64(bit & 63)) - one))
            while bits == 0:
                word -= 1
                bits = present[word]
            top = np.int32((word << 6) + 62 - leading_zeros(bits))
            # d: the first marker <= p, found by block minimum: the first 16 blocks by
            # scalar loads (a vector load of values just stored one by one would wait for
            # those stores to retire), then 32 blocks at a time
            found = np.uint32(0)
            for b in range(LANES):
                found |= np.uint32(block_min[b] <= p) << np.uint32(b)
            block = np.int64(trailing_zeros(found))
            if found == 0:
                block = np.int64(LANES)
                while True:
                    if block >= blocks:
                        lost()
                    found = window_mask(block_min, block, _BEFORE, p) | (
                        window_mask(block_min, block + LANES, _BEFORE, p) << np.uint32(LANES))
                    if found:
                        block += np.int64(trailing_zeros(found))
                        break
                    block += 2 * LANES
            start = block * LANES
            lane = trailing_zeros(window_mask(marker, start, _BEFORE, p))
            if lane >= LANES:  # the block minimum promised a marker <= p
                lost()
            hist[size + 1 + start + lane, group] += 1
            # the shift ends at the first marker from d holding top; testing for it on the
            # values before the shift lets the loop exit resolve without waiting for them
            ends = window_mask(marker, start, top - 1, top)  # (lanes before d are > p)
            lowest = marker[start + lane]  # records after d hold values in (lowest, p]
            block_min[block] = minimum_after_shift(marker, start, lane, p, now)
            carried = shift_records(marker, start, _LOWEST, p, now)  # lanes before d are > p
            while ends == 0:
                start += LANES
                if skip:  # to the next block with a value in (lowest, p]
                    ahead = window_mask64(marker, start, lowest, p)
                    while ahead == 0:
                        start += 4 * LANES
                        if start >= markers:
                            lost()
                        ahead = window_mask64(marker, start, lowest, p)
                    start += trailing_zeros(ahead) & ~(LANES - 1)
                if start >= markers:
                    lost()
                block = start // LANES
                ends = window_mask(marker, start, top - 1, top)
                shifted = shift_records(marker, start, carried, p, now)
                # records took carried and larger values, so the least new value is carried
                block_min[block] = min(block_min[block], carried if shifted > carried else _FAR)
                carried = shifted
            # the multiset loses top and gains now (bit t)
            left = holders[top + 1] - 1
            holders[top + 1] = left
            present[(top + 1) >> 6] &= ~(np.uint64(left == 0) << np.uint64((top + 1) & 63))
            holders[t] += 1
            present[t >> 6] |= one << np.uint64(t & 63)
        for j in range(lo, hi):
            last[keys[j]] = t
    return hist
