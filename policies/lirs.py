"""LIRS: low inter-reference recency set, a stack S of recency and a queue Q of resident HIR experts.

As Jiang and Zhang, "LIRS: An Efficient Low Inter-reference Recency Set Replacement Policy to
Improve Buffer Cache Performance", SIGMETRICS'02, with libCacheSim's share of the HIR set
(libCacheSim/cache/eviction/LIRS.c: ``hirs`` = 0.01). With capacity C the HIR limit is
H = max(1, floor(hirs x C)), the LIR limit C - H. Residents are LIR or resident HIR;
non-resident HIR experts are remembered in S (no cache capacity). S holds experts from the
most recent to the least, its bottom always an LIR one (pruning drops the HIR entries below
the lowest LIR); Q holds the resident HIR experts in FIFO order. A new expert not in S
becomes LIR while the LIR set has room, else a resident HIR on top of S and at Q's end. A
hit on an LIR expert moves it to the top of S. A hit on a resident HIR expert in S makes it
LIR on top of S (leaving Q) and the bottom LIR of S moves to Q's end as resident HIR; a hit
on one not in S puts it on top of S and at Q's end. The victim is Q's front; it stays in S,
non-resident, if it was there. A miss on a non-resident HIR expert in S makes it LIR on top
of S and demotes S's bottom LIR to Q's end. Every demotion repeats while the LIR set is
over its limit, then S is pruned. Sizes are in size units (experts at unit size).

Set steps (docs/semantics.md): libCacheSim's LIRS_evict evicts none or several objects per
call (it may demote an LIR object to Q and evict Q's front first); here ``victim`` returns
one expert at a time, the front of Q outside the request, and the demotions happen when the
expert is admitted (after the eviction), which on one expert per step is the same order of
events. With none of Q outside the request the victim is the lowest LIR expert of S outside
it, evicted without a non-resident entry. A prefetched expert is admitted as a miss.

Against libCacheSim (tests/test_libcachesim_b.py): different hits. libCacheSim's hit on a
resident HIR expert not in S (hit_RD_HIRinQ) demotes an LIR object to Q and evicts Q's
front, which is that expert, yet keeps it in S as resident without occupying capacity: on
0, 1, 0, 1, 2, 1 at C = 2 the last request hits there and misses here (the pinned trace).
libCacheSim also caches nothing at C = 1 (its LIR limit is 0) and bounds S to 2C by
dropping its oldest non-resident entries; S is unbounded here (as in the paper).

Fast kernels (``simulate``, unit sizes): the hooks' steps in one function; per request the
misses are admitted in ascending id, each evicting one expert first when the cache is
full, then the hits are used in ascending id. Invariant of both: S's bottom is LIR whenever
S holds an LIR expert (every operation that can change the bottom prunes).

* masks (at most 64 keys): LIR, resident HIR and S are 64-bit masks; S's order is a
  sequence of groups (masks), each request pushing its misses into one and its hits into
  the next, a group's keys in ascending id, so S's bottom is the lowest bit of its oldest
  group; Q's order is a tick per key. Two runs of steps go at once: the LIR hits below the
  request's first other hit (they only move up, so one pruning serves them all), and the
  misses from the first one that finds no HIR outside the request to evict (each then
  evicts S's lowest LIR expert outside the request and becomes LIR, no demotion and no
  HIR enqueued, so that holds for every later miss: together they evict the lowest ones).
* lists (more keys): S and Q as linked lists over the hooks' arrays (``lir`` the LIR count,
  ``count`` the residents'); ``current[key] == r`` marks request r's keys, which the
  victim search skips.

Hooks: state = (status of each key, whether in S, S and Q as linked lists, [LIR used, LIR
limit], sizes).
"""

import numpy as np
from numba import njit, uint64

from ._index import cell
from ._queues import move_to_tail, oldest_unpinned, queue_head, queues_new
from ._state import bit_index, fits_masks, list_unlink, lowest_bits, no_room, popcount, request_mask
from .registry import Hooks, Param, Policy, always_keep

NONE, LIR, HIR, GONE = range(4)  # GONE: non-resident HIR, remembered in S
LIR_USED, LIR_LIMIT = range(2)
GROUPS = 256  # S's groups in the masks kernel, squeezed when full (S holds at most 64)


@njit(cache=True)
def init(keys, offsets, sizes, capacity, params, seed, scores):
    num_keys = sizes.shape[0]
    s_prev, s_next = queues_new(num_keys, 1)
    q_prev, q_next = queues_new(num_keys, 1)
    hir_limit = max(1, np.int64(capacity * params[0]))
    return (np.full(num_keys, NONE, np.int64), np.zeros(num_keys, np.bool_), s_prev, s_next, q_prev, q_next,
            np.array([0, capacity - hir_limit], np.int64), sizes)


@njit(cache=True)
def unsigned(links):
    """A list's (prev, next) as uint32 views."""
    return links[0].view(np.uint32), links[1].view(np.uint32)


@njit(cache=True, nogil=True)
def simulate(keys, offsets, sizes, capacity, params, seed):
    lir_limit = capacity - max(1, np.int64(capacity * params[0]))
    if fits_masks(sizes):
        return simulate_masks(keys, offsets, capacity, lir_limit)
    return simulate_lists(keys, offsets, sizes.shape[0], capacity, lir_limit)


@njit(cache=True, nogil=True)
def simulate_masks(keys, offsets, capacity, lir_limit):
    """At most 64 keys. Invariant: ``lir`` and ``hir`` (LIR, resident HIR) partition the
    residents, ``in_s`` is S, a key in S and not resident its non-resident HIR entry. S is
    ``groups[oldest..newest]`` from the bottom up, a key in S in ``groups[where[key]]``,
    the keys of one group pushed in ascending id: each request pushes its misses into group
    ``top`` and its hits into ``top + 1``. Q's order is ``queued`` (the tick of a key's
    enqueueing), its front outside the request the least tick of ``hir & ~step``."""
    one = uint64(1)
    groups = np.zeros(GROUPS, np.uint64)
    where = np.zeros(64, np.int64)
    queued = np.zeros(64, np.int64)
    hits = np.zeros(offsets.shape[0] - 1, np.int32)
    lir, hir, in_s = uint64(0), uint64(0), uint64(0)
    lirs, count, oldest, top, tick = 0, 0, 0, 0, 0
    for r in range(hits.shape[0]):
        lo, hi = offsets[cell(r)], offsets[cell(r + 1)]
        if hi - lo > capacity:
            no_room()
        step = request_mask(keys, lo, hi)
        hit = step & (lir | hir)
        hits[cell(r)] = popcount(hit)
        if top + 2 > GROUPS:
            top = squeeze(groups, where, oldest, top)
            oldest = 0
        for phase in range(2):  # the misses' admissions, then the hits
            newest = top + phase
            todo = hit if phase else step ^ hit
            while todo:
                if phase:  # the LIR hits below the first other hit go on top of S together
                    moved = todo & lir
                    bit = todo ^ moved
                    bit &= ~bit + one
                    moved &= bit - one
                    todo ^= moved
                    if moved:
                        lift(groups, where, moved, newest)
                        in_s, oldest = prune_groups(groups, lir, in_s, oldest, newest)
                    if bit == 0:
                        break
                else:
                    bit = todo & (~todo + one)
                    if count == capacity and hir & ~step == 0:  # then each miss evicts S's lowest
                        out = lowest_lir(groups, lir & ~step, oldest, popcount(todo))  # LIR outside
                        lir ^= out | todo  # the request and becomes LIR (no demotion)
                        in_s ^= out
                        in_s |= todo
                        lift(groups, where, todo, newest)
                        in_s, oldest = prune_groups(groups, lir, in_s, oldest, newest)
                        break
                todo ^= bit
                key = cell(bit_index(bit))
                if phase == 0:
                    if count == capacity:  # Q's front outside the request
                        queue = hir & ~step
                        out = queue & (~queue + one)
                        queue ^= out
                        while queue:
                            other = queue & (~queue + one)
                            queue ^= other
                            if queued[cell(bit_index(other))] < queued[cell(bit_index(out))]:
                                out = other
                        hir ^= out
                    else:
                        count += 1
                    to_lir = (in_s & bit) != 0 or lirs < lir_limit
                else:
                    to_lir = (in_s & bit) != 0
                groups[cell(where[key])] &= ~bit  # on top of S
                groups[cell(newest)] |= bit
                where[key] = newest
                in_s |= bit
                if not to_lir:  # a resident HIR at Q's end
                    hir |= bit
                    queued[key] = tick
                    tick += 1
                    continue
                hir &= ~bit
                lir |= bit
                lirs += 1
                while True:  # S's lowest LIR experts move to Q while over the limit
                    in_s, oldest = prune_groups(groups, lir, in_s, oldest, newest)
                    if lirs <= lir_limit:
                        break
                    lowest = groups[cell(oldest)]
                    lowest &= ~lowest + one
                    lir ^= lowest
                    hir |= lowest
                    queued[cell(bit_index(lowest))] = tick
                    tick += 1
                    lirs -= 1
        top += 2
    return hits


@njit(cache=True, inline="always")
def lift(groups, where, moved, newest):
    """The keys of ``moved`` on top of S, into group ``newest``."""
    one = uint64(1)
    rest = moved
    while rest:
        bit = rest & (~rest + one)
        rest ^= bit
        key = cell(bit_index(bit))
        groups[cell(where[key])] &= ~bit
        where[key] = newest
    groups[cell(newest)] |= moved


@njit(cache=True, inline="always")
def lowest_lir(groups, candidates, oldest, count):
    """Take the ``count`` lowest of the ``candidates`` (LIR experts, S holding at least
    ``count`` of them) off S's groups; returns them."""
    taken = uint64(0)
    group = oldest
    while count > 0:
        take = lowest_bits(groups[cell(group)] & candidates, count)
        groups[cell(group)] ^= take
        taken |= take
        count -= popcount(take)
        group += 1
    return taken


@njit(cache=True, inline="always")
def prune_groups(groups, lir, in_s, oldest, newest):
    """S's non-LIR entries below its lowest LIR leave it (all of S if it holds no LIR,
    ``oldest`` then stopping at ``newest``): the new (in_s, oldest)."""
    one = uint64(1)
    while True:
        group = groups[cell(oldest)]
        low = group & lir
        if low:
            below = group & ((low & (~low + one)) - one)
            groups[cell(oldest)] = group ^ below
            return in_s & ~below, oldest
        groups[cell(oldest)] = 0
        in_s &= ~group
        if oldest == newest:
            return in_s, oldest
        oldest += 1


@njit(cache=True)
def squeeze(groups, where, oldest, top):
    """Move S's non-empty groups of ``groups[oldest:top]`` to the front, in order, keeping
    ``where``; returns their number (the new ``top``, ``oldest`` becoming 0)."""
    one = uint64(1)
    kept = 0
    for i in range(oldest, top):
        group = groups[i]
        groups[i] = 0
        if group:
            groups[kept] = group
            rest = group
            while rest:
                bit = rest & (~rest + one)
                rest ^= bit
                where[bit_index(bit)] = kept
            kept += 1
    return kept


@njit(cache=True, nogil=True)
def simulate_lists(keys, offsets, num_keys, capacity, lir_limit):
    """Any keys: S and Q as linked lists, ``current[key] == r`` marking request r's keys."""
    status = np.full(num_keys, NONE, np.int64)
    in_s = np.zeros(num_keys, np.bool_)
    # keys and links are unsigned: numba leaves out the wraparound of negative indices
    s_prev, s_next = unsigned(queues_new(num_keys, 1))
    q_prev, q_next = unsigned(queues_new(num_keys, 1))
    head = num_keys  # the sentinel of S and of Q
    current = np.full(num_keys, -1, np.int64)
    missed = np.empty(num_keys, np.uint32)
    found_keys = np.empty(num_keys, np.uint32)
    hits = np.zeros(offsets.shape[0] - 1, np.int32)
    lir = 0
    count = 0
    for r in range(hits.shape[0]):
        lo, hi = offsets[r], offsets[r + 1]
        if hi - lo > capacity:
            no_room()
        found = 0
        missing = 0
        for j in range(lo, hi):
            key = np.uint32(keys[j])
            current[key] = r
            if status[key] == LIR or status[key] == HIR:
                found_keys[found] = key
                found += 1
            else:
                missed[missing] = key
                missing += 1
        hits[r] = found
        for i in range(missing + found):  # the misses' admissions, then the hits
            if i < missing:
                key = missed[i]
                if count == capacity:
                    out = q_next[head]  # Q's front outside the request, else S's lowest LIR outside it
                    while out != head and current[out] == r:
                        out = q_next[out]
                    if out == head:
                        out = s_next[head]
                        while status[out] != LIR or current[out] == r:
                            out = s_next[out]
                    if status[out] == HIR:
                        list_unlink(q_prev, q_next, out)
                        status[out] = GONE if in_s[out] else NONE
                    else:
                        lir -= 1
                        list_unlink(s_prev, s_next, out)
                        in_s[out] = False
                        status[out] = NONE
                        prune_s(status, in_s, s_prev, s_next)
                else:
                    count += 1
                to_lir = status[key] == GONE or lir < lir_limit
            else:
                key = found_keys[i - missing]
                if status[key] == LIR:
                    move_to_tail(s_prev, s_next, head, key)
                    prune_s(status, in_s, s_prev, s_next)
                    continue
                to_lir = in_s[key]
            if not to_lir:  # a resident HIR on top of S and at Q's end
                move_to_tail(s_prev, s_next, head, key)
                in_s[key] = True
                move_to_tail(q_prev, q_next, head, key)
                status[key] = HIR
                continue
            if status[key] == HIR:  # make_lir
                list_unlink(q_prev, q_next, key)
            move_to_tail(s_prev, s_next, head, key)
            in_s[key] = True
            status[key] = LIR
            lir += 1
            while lir > lir_limit:
                prune_s(status, in_s, s_prev, s_next)
                lowest = s_next[head]
                lir -= 1
                move_to_tail(q_prev, q_next, head, lowest)
                status[lowest] = HIR
            prune_s(status, in_s, s_prev, s_next)
    return hits


@njit(cache=True)
def push(state, key):
    """Put ``key`` on top of S."""
    in_s, s_prev, s_next = state[1], state[2], state[3]
    move_to_tail(s_prev, s_next, queue_head(s_prev, 1, 0), key)
    in_s[key] = True


@njit(cache=True)
def enqueue(state, key):
    """Make ``key`` a resident HIR at Q's end."""
    status, q_prev, q_next = state[0], state[4], state[5]
    move_to_tail(q_prev, q_next, queue_head(q_prev, 1, 0), key)
    status[key] = HIR


@njit(cache=True)
def prune(state):
    prune_s(state[0], state[1], state[2], state[3])


@njit(cache=True)
def prune_s(status, in_s, s_prev, s_next):
    """Drop S's HIR entries below its lowest LIR expert."""
    head = queue_head(s_prev, 1, 0)
    key = s_next[head]
    while key != head and status[key] != LIR:
        after = s_next[key]
        list_unlink(s_prev, s_next, key)
        in_s[key] = False
        if status[key] == GONE:
            status[key] = NONE
        key = after


@njit(cache=True)
def make_lir(state, key):
    """``key`` becomes LIR on top of S; S's lowest LIR experts move to Q while over the limit."""
    status, _, s_prev, s_next, q_prev, q_next, misc, sizes = state
    if status[key] == HIR:
        list_unlink(q_prev, q_next, key)
    push(state, key)
    status[key] = LIR
    misc[LIR_USED] += sizes[key]
    while misc[LIR_USED] > misc[LIR_LIMIT]:
        prune(state)
        lowest = s_next[queue_head(s_prev, 1, 0)]
        misc[LIR_USED] -= sizes[lowest]
        enqueue(state, lowest)
    prune(state)


@njit(cache=True)
def access(state, key, now, hit):
    status, in_s = state[0], state[1]
    if not hit:
        return
    if status[key] == LIR:
        push(state, key)
        prune(state)
    elif in_s[key]:
        make_lir(state, key)
    else:
        push(state, key)
        enqueue(state, key)


@njit(cache=True)
def admit(state, key, now):
    status, misc, sizes = state[0], state[6], state[7]
    if status[key] == GONE or misc[LIR_USED] + sizes[key] <= misc[LIR_LIMIT]:
        make_lir(state, key)
    else:
        push(state, key)
        enqueue(state, key)


@njit(cache=True)
def victim(state, resident, pinned, mark):
    status, _, s_prev, s_next, q_prev, q_next, _, _ = state
    key = oldest_unpinned(q_prev, q_next, 1, 0, pinned, mark)
    if key >= 0:
        return key
    head = queue_head(s_prev, 1, 0)
    key = s_next[head]
    while status[key] != LIR or pinned[key] == mark:
        key = s_next[key]
    return key


@njit(cache=True)
def evict(state, key):
    status, in_s, s_prev, s_next, q_prev, q_next, misc, sizes = state
    if status[key] == HIR:
        list_unlink(q_prev, q_next, key)
        status[key] = GONE if in_s[key] else NONE
        return
    misc[LIR_USED] -= sizes[key]
    list_unlink(s_prev, s_next, key)
    in_s[key] = False
    status[key] = NONE
    prune(state)


POLICY = Policy(
    name="lirs", description="LIRS: experts whose reuse distance is short (LIR) stay; the others (HIR) "
    "pass through a small FIFO and become LIR when hit again while still in the recency stack",
    hooks=Hooks(init, access, admit, victim, evict, always_keep), kernel=simulate, unit_kernel=True,
    params=(Param("hirs", 0.01, 0.0, 1.0, "the HIR set's share of the capacity (at least one expert)"),),
    style={"linestyle": (0, (2, 1, 2, 3)), "marker": ">"}, rank=57,
    source="Jiang and Zhang, LIRS: An Efficient Low Inter-reference Recency Set Replacement Policy to "
    "Improve Buffer Cache Performance, SIGMETRICS 2002; libCacheSim, cache/eviction/LIRS.c")
