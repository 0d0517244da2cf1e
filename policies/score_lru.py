"""Score-LRU: recency in which a use the router ranked higher counts as a later use.

BigRig's gaterank (bigrig 0.9.1, bigrig_engine/policies/gaterank.py, Apache-2.0; the
router-score aware recency the issue names beside CECAR): serve the requests one expert
at a time, a step's experts in router-rank order (rank 0 = the largest gate weight), and
number them 1, 2, ... across the whole stream (the tick). A use at tick t with rank r
gives its expert the key ``t + boost * w(r)``, with ``w(r) = (k - 1 - r) / (k - 1)``
(``w = 1`` when k = 1) for a request of k experts, so a rank-0 use counts as ``boost``
requests later than it happened. With ``monotone`` (BigRig's default) the key is
``max(old key, new)``: a use never lowers a resident's standing. The victim is the
resident with the lowest key, ties the smallest id (BigRig's heap of (key, id)). boost
= 0 is LRU over ticks; BigRig's reported setting is boost = 16, linear weights,
monotone, which are the defaults here.

Under set steps (docs/semantics.md) a step's experts are looked up together; each
expert's tick is the number of requests before the step plus its rank position in the
step (1-based), as if the step had been serialized in rank order. The rank comes from
the trace's router weights (the largest weight the expert got from the step's tokens;
ties: the smaller id first; a missing (NaN) weight ranks below every weight); a trace
without weights is refused. A prefetched expert enters with the key of the step's start
(no rank: it was not requested).

Fast kernel (unit sizes), two variants chosen by ``simulate``; both rank a request's
references by counting, for each, the references ahead of it (8 at a time, one vector
compare each: ``rank_step``; a request of exactly 8 in registers: ``ranks_of_8``):

* masks (at most 64 keys): the residents sit in slots ``0..min(capacity, keys) - 1`` with
  their keys in ``key[slot]``; a free slot is a bit of ``free``, a resident a bit of
  ``resident``. The victim search is one vector pass over the slots (``least_of``: the
  candidates holding the least key), candidates = occupied slots not of the request;
  a new key takes the lowest free slot, so no resident ever moves.
* scan (more keys): ``slots[:count]`` lists the residents; the request's keys hold +inf
  while it is served and the victim is found by a scan of the count slots.

The hooks' state = (key per key, value of each reference, cursor, params, offsets): both
compute every reference's ``t + boost * w(r)`` up front, and ``access``, called for every
key of every request in stream order, walks them with the cursor.
"""

import numpy as np
from llvmlite import ir
from numba import njit, types, uint64
from numba.extending import intrinsic

from ._simd import _block_pointer, _splat
from ._state import bit_index, fits_masks, lowest_rank_victim, no_room, popcount, request_mask
from .registry import Hooks, Param, Policy, always_keep, no_evict

_RANK_LANES = 8


@intrinsic
def rank_step(typingctx, weights, start, j, rank):
    """``rank[start + i] += 1`` where reference j goes before reference ``start + i``
    (weights[j] larger, or equal and j smaller), for i < 8 (float32 weights, int32 ranks)."""
    sig = types.void(weights, types.int64, types.int64, rank)

    def codegen(context, builder, signature, args):
        weights_v, start_v, j_v, rank_v = args
        lanes = ir.VectorType(ir.IntType(32), _RANK_LANES)
        block = builder.load(_block_pointer(context, builder, signature.args[0], weights_v, start_v,
                                            _RANK_LANES), align=4)
        data = context.make_array(signature.args[0])(context, builder, weights_v).data
        other = _splat(builder, builder.load(builder.gep(data, [j_v])), _RANK_LANES)
        position = builder.add(_splat(builder, builder.trunc(start_v, ir.IntType(32)), _RANK_LANES),
                               ir.Constant(lanes, list(range(_RANK_LANES))))
        earlier = builder.icmp_signed("<", _splat(builder, builder.trunc(j_v, ir.IntType(32)), _RANK_LANES),
                                      position)
        ahead = builder.or_(builder.fcmp_ordered(">", other, block),
                            builder.and_(builder.fcmp_ordered("==", other, block), earlier))
        pointer = _block_pointer(context, builder, signature.args[3], rank_v, start_v, _RANK_LANES)
        builder.store(builder.add(builder.load(pointer, align=4), builder.zext(ahead, lanes)), pointer,
                      align=4)
        return context.get_dummy_value()
    return sig, codegen


@intrinsic
def ranks_of_8(typingctx, scores, lo, rank):
    """``request_ranks`` of a request of 8 references from ``lo`` (float32 weights, int32
    ranks) in registers: NaN as -inf, eight vector compares, one store of the 8 ranks."""
    sig = types.void(scores, types.int64, rank)

    def codegen(context, builder, signature, args):
        scores_v, lo_v, rank_v = args
        lanes = ir.VectorType(ir.IntType(32), _RANK_LANES)
        block = builder.load(_block_pointer(context, builder, signature.args[0], scores_v, lo_v, _RANK_LANES),
                             align=4)
        lowest = _splat(builder, ir.Constant(ir.FloatType(), float("-inf")), _RANK_LANES)
        block = builder.select(builder.fcmp_unordered("uno", block, block), lowest, block)
        count = ir.Constant(lanes, [0] * _RANK_LANES)
        for j in range(_RANK_LANES):
            other = builder.shuffle_vector(block, block, ir.Constant(lanes, [j] * _RANK_LANES))
            earlier = ir.Constant(ir.VectorType(ir.IntType(1), _RANK_LANES),
                                  [j < i for i in range(_RANK_LANES)])
            ahead = builder.or_(builder.fcmp_ordered(">", other, block),
                                builder.and_(builder.fcmp_ordered("==", other, block), earlier))
            count = builder.sub(count, builder.sext(ahead, lanes))
        start = ir.Constant(ir.IntType(64), 0)
        builder.store(count, _block_pointer(context, builder, signature.args[2], rank_v, start, _RANK_LANES),
                      align=4)
        return context.get_dummy_value()
    return sig, codegen


def _least(lanes):
    """Code for the mask of the ``candidates`` bits whose float64 value is the least among
    the candidates of values[0:lanes] (non-candidates count as +inf)."""
    def codegen(context, builder, signature, args):
        values_v, candidates_v = args
        start = ir.Constant(ir.IntType(64), 0)
        block = builder.load(_block_pointer(context, builder, signature.args[0], values_v, start, lanes),
                             align=8)
        chosen = builder.trunc(candidates_v, ir.IntType(lanes)) if lanes < 64 else candidates_v
        chosen = builder.bitcast(chosen, ir.VectorType(ir.IntType(1), lanes))
        block = builder.select(chosen, block, _splat(builder, ir.Constant(ir.DoubleType(), np.inf), lanes))
        least, width = block, lanes
        while width > 1:  # a tree of pairwise minima, halving the vector
            half = width // 2
            low = builder.shuffle_vector(least, least, ir.Constant(ir.VectorType(ir.IntType(32), half),
                                                                   list(range(half))))
            high = builder.shuffle_vector(least, least, ir.Constant(ir.VectorType(ir.IntType(32), half),
                                                                    list(range(half, width))))
            least = builder.select(builder.fcmp_ordered("<", low, high), low, high)
            width = half
        least = _splat(builder, builder.extract_element(least, ir.Constant(ir.IntType(32), 0)), lanes)
        equal = builder.bitcast(builder.fcmp_ordered("==", block, least), ir.IntType(lanes))
        equal = builder.zext(equal, ir.IntType(64)) if lanes < 64 else equal
        return builder.and_(equal, candidates_v)
    return codegen


@intrinsic
def least_of_16(typingctx, values, candidates):
    return types.uint64(values, types.uint64), _least(16)


@intrinsic
def least_of_32(typingctx, values, candidates):
    return types.uint64(values, types.uint64), _least(32)


@intrinsic
def least_of_64(typingctx, values, candidates):
    return types.uint64(values, types.uint64), _least(64)


@njit(cache=True, inline="always")
def least_of(values, candidates, lanes):
    """The candidates (bits < ``lanes``, lanes >= 1 and <= 64) holding the least value,
    as a mask; a pass over 16, 32 or 64 values."""
    if lanes <= 16:
        return least_of_16(values, candidates)
    if lanes <= 32:
        return least_of_32(values, candidates)
    return least_of_64(values, candidates)


@njit(cache=True, inline="always")
def request_ranks(scores, lo, width, weights, rank):
    """``rank[i]`` = the rank of reference ``lo + i`` in its request: how many of the
    request's references have a larger weight, or an equal one and a smaller position
    (NaN counted as -inf). ``weights`` and ``rank`` hold ``width`` rounded up to 8. A
    request of exactly 8 (the common top-k) is ranked in registers (a wider test, for any
    width up to 8, measured slower)."""
    if width == _RANK_LANES:
        ranks_of_8(scores, lo, rank)
        return
    for i in range(width):
        weight = scores[lo + i]
        weights[i] = weight if weight == weight else np.float32(-np.inf)
    for i in range(rank_room(width)):
        rank[i] = 0
    for start in range(0, width, _RANK_LANES):
        for j in range(width):
            rank_step(weights, start, j, rank)


@njit(cache=True, inline="always")
def rank_bonus(width, boost, bonus):
    """``bonus[r] = boost * w(r)`` for the ranks r of a request of ``width`` references."""
    for rank in range(width):
        weight = 1.0 if width == 1 else (width - 1 - rank) / (width - 1)
        bonus[rank] = boost * weight


@njit(cache=True, inline="always")
def rank_room(width):
    """Room for ``request_ranks`` over requests of up to ``width`` references."""
    return (width + _RANK_LANES - 1) // _RANK_LANES * _RANK_LANES


@njit(cache=True, inline="always")
def request_values(scores, lo, hi, boost, weights, rank, bonus, value):
    """``value[i]`` = ``t + boost * w(r)`` of reference ``lo + i``: its tick when the request
    is served in rank order plus its rank bonus."""
    width = hi - lo
    request_ranks(scores, lo, width, weights, rank)
    rank_bonus(width, boost, bonus)
    for i in range(width):
        value[i] = lo + rank[i] + 1 + bonus[rank[i]]


@njit(cache=True)
def use_values(offsets, scores, boost):
    """``request_values`` of every request, one array over the stream (for the hooks)."""
    value = np.empty(scores.shape[0], np.float64)
    widest = np.max(np.diff(offsets)) if offsets.shape[0] > 1 else 0
    room = rank_room(widest)
    weights, rank, bonus = np.empty(room, np.float32), np.empty(room, np.int32), np.empty(room)
    for r in range(offsets.shape[0] - 1):
        lo, hi = offsets[r], offsets[r + 1]
        request_values(scores, lo, hi, boost, weights, rank, bonus, value[lo:hi])
    return value


@njit(cache=True, nogil=True)
def simulate(keys, offsets, sizes, capacity, params, seed, scores):
    if fits_masks(sizes):
        return simulate_masks(keys, offsets, sizes.shape[0], capacity, params, scores)
    return simulate_scan(keys, offsets, sizes.shape[0], capacity, params, scores)


@njit(cache=True, nogil=True)
def simulate_masks(keys, offsets, num_keys, capacity, params, scores):
    """At most 64 keys. Invariant: ``resident`` holds the residents; resident k sits in
    slot ``where[k]`` (``owner`` its inverse) with its key in ``key[where[k]]``; ``free``
    holds the slots below ``slots`` that no resident sits in. Victims are searched before
    the request's keys change, among the occupied slots not holding a key of the request."""
    boost, monotone = params[0], params[1] != 0.0
    one = uint64(1)
    slots = min(capacity, num_keys)
    free = ~uint64(0) if slots >= 64 else (one << uint64(slots)) - one
    key = np.full(64, np.inf)
    owner = np.zeros(64, np.int64)
    where = np.zeros(64, np.int64)
    weights, rank = np.empty(64, np.float32), np.empty(64, np.int32)
    bonus, bonus_width = np.empty(64), -1
    hits = np.zeros(offsets.shape[0] - 1, np.int32)
    resident = uint64(0)
    for r in range(hits.shape[0]):
        lo, hi = offsets[r], offsets[r + 1]
        step = request_mask(keys, lo, hi)
        hit = step & resident
        found = popcount(hit)
        hits[r] = found
        evict = hi - lo - found - popcount(free)
        if evict > 0:
            held = uint64(0)  # the slots of the request's hits
            for j in range(lo, hi):
                k = keys[j]
                held |= ((hit >> uint64(k)) & one) << uint64(where[k])
            candidates = ~free & ~held
            for _ in range(evict):
                if candidates == 0:
                    no_room()
                least = least_of(key, candidates, slots)
                out = least & (~least + one)
                rest = least ^ out
                while rest:  # a tie: the smallest id goes
                    other = rest & (~rest + one)
                    if owner[bit_index(other)] < owner[bit_index(out)]:
                        out = other
                    rest ^= other
                candidates ^= out
                free |= out
                resident ^= one << uint64(owner[bit_index(out)])
        if hi - lo != bonus_width:
            bonus_width = hi - lo
            rank_bonus(bonus_width, boost, bonus)
        request_ranks(scores, lo, hi - lo, weights, rank)
        start = np.float64(lo)  # a new resident's key: the tick before the request
        for j in range(lo, hi):  # branch-free: a miss takes the lowest free slot
            k = keys[j]
            value = lo + rank[j - lo] + 1 + bonus[rank[j - lo]]
            was = (hit >> uint64(k)) & one
            placed, fresh = where[k], bit_index(free & (~free + one))
            s = placed if was else fresh
            free &= free - (one - was)
            current = key[s]
            before = current if was else start
            where[k], owner[s] = s, k
            key[s] = max(before, value) if monotone else value
        resident |= step
    return hits


@njit(cache=True, nogil=True)
def simulate_scan(keys, offsets, num_keys, capacity, params, scores):
    """Invariant: ``slots[:count]`` holds the residents and ``key[s]`` the key of the
    resident in slot s, except that during request r the slots of its keys hold +inf
    (never the lowest, so never victims) and ``held`` their own keys, restored by the uses."""
    boost, monotone = params[0], params[1] != 0.0
    room = rank_room(num_keys)
    weights, rank, bonus = np.empty(room, np.float32), np.empty(room, np.int32), np.empty(room)
    value = np.empty(num_keys, np.float64)
    slots = np.empty(num_keys, np.int64)
    key = np.empty(num_keys, np.float64)
    held = np.empty(num_keys, np.float64)
    where = np.full(num_keys, -1, np.int64)
    hits = np.zeros(offsets.shape[0] - 1, np.int32)
    count = 0
    for r in range(hits.shape[0]):
        lo, hi = offsets[r], offsets[r + 1]
        for j in range(lo, hi):
            s = where[keys[j]]
            if s >= 0:
                hits[r] += 1
                held[j - lo] = key[s]
                key[s] = np.inf
        for j in range(lo, hi):
            k = keys[j]
            if where[k] >= 0:
                continue
            if count >= capacity:
                lowest = np.inf
                for s in range(count):  # a reduction the compiler vectorizes
                    lowest = min(lowest, key[s])
                if lowest == np.inf:
                    no_room()
                out = -1
                for s in range(count):  # the smallest id among the lowest keys
                    if key[s] == lowest and (out < 0 or slots[s] < slots[out]):
                        out = s
                count -= 1  # swap-remove: the last slot moves into the victim's
                victim = slots[out]
                slots[out], key[out] = slots[count], key[count]
                where[slots[out]] = out
                where[victim] = -1
            slots[count], key[count], where[k] = k, np.inf, count
            held[j - lo] = offsets[r]  # a new resident's key: the tick before the request
            count += 1
        request_values(scores, lo, hi, boost, weights, rank, bonus, value)
        for j in range(lo, hi):
            key[where[keys[j]]] = max(held[j - lo], value[j - lo]) if monotone else value[j - lo]
    return hits


@njit(cache=True)
def init(keys, offsets, sizes, capacity, params, seed, scores):
    """State: (priority per key, value per entry of the span, [next entry], params, the
    span's offsets counted from the stream's first entry, [the span's first request])."""
    blank = (np.zeros(sizes.shape[0], np.float64), np.zeros(0, np.float64), np.zeros(1, np.int64), params,
             np.zeros(1, np.int64), np.zeros(1, np.int64))
    return resume(blank, keys, offsets, scores, params, 0, 0, offsets.shape[0] - 1, offsets[:0])


@njit(cache=True)
def resume(state, keys, offsets, scores, params, first, first_entry, total, future):
    """The values of the span's entries, and its ticks (counted from the stream's first entry)."""
    priority = state[0]
    return (priority, use_values(offsets, scores, params[0]) + first_entry, np.zeros(1, np.int64), params,
            offsets + first_entry, np.full(1, first, np.int64))


@njit(cache=True)
def access(state, key, now, hit):
    priority, value, cursor, params, _, _ = state
    j = cursor[0]
    cursor[0] = j + 1
    if params[1] != 0.0:
        priority[key] = max(priority[key], value[j])
    else:
        priority[key] = value[j]


@njit(cache=True)
def admit(state, key, now):
    """A new resident's key: the tick before request ``now`` (below any use in it)."""
    priority, _, _, _, ticks, first = state
    priority[key] = ticks[now - first[0]]


POLICY = Policy(
    name="score-lru", description="recency in which a use the router ranked higher counts as later: key "
    "t + boost x (k-1-rank)/(k-1), never lowered while resident (BigRig's gaterank); needs router weights",
    hooks=Hooks(init, access, admit, lowest_rank_victim, no_evict, always_keep), needs_scores=True,
    resume=resume,
    kernel=simulate, unit_kernel=True,
    params=(Param("boost", 16, 0, 1e9, "requests a rank-0 use counts later than it happened"),
            Param("monotone", 1, 0, 1, "1: a use never lowers a key (BigRig's default); "
                  "0: the last use sets it", integer=True)),
    style={"linestyle": "-", "marker": "p"}, rank=45,
    source="bigrig 0.9.1, bigrig_engine/policies/gaterank.py (gaterank: boost=16, linear, monotone)")
