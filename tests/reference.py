"""A slow, obviously-correct replay written straight from docs/semantics.md.

It shares no code with moecache's kernels or hooks: sets are Python sets, the cache is a
set, and each policy's reference (``REFERENCES``, one small class per registered policy,
found by name) picks its victim with ``min`` over the candidates with the policy's full
sort key. A new policy adds its class here with ``@reference("name")``.
"""

from __future__ import annotations

import math
from collections import Counter
from fractions import Fraction

import numpy as np

REFERENCES: dict[str, type[Reference]] = {}


def reference(name: str):
    """Register a reference policy under the registered policy's name."""
    def register(cls):
        REFERENCES[name] = cls
        return cls
    return register


class Reference:
    """Hooks of the slow simulator; ``requests`` is the whole stream (for OPT). ``simulate``
    sets ``capacity``, ``size`` (a key's size) and ``scores`` after construction, before any hook."""

    bypass = False
    capacity = 0
    size = staticmethod(lambda key: 1)
    scores: list[dict] | None = None  # per request, {key: router weight}, when the trace has weights

    def __init__(self, requests: list[set], params: dict, seed: int):
        self.requests = requests

    def access(self, key, now: int, hit: bool) -> None:
        """Each key of demand request ``now``, after its admissions."""

    def admit(self, key, now: int) -> None:
        """Every insertion, demand or prefetch."""

    def victim(self, candidates: list, now: int):
        raise NotImplementedError

    def evict(self, key) -> None:
        """``key`` leaves the cache."""

    def keep(self, key, candidates: list, now: int) -> bool:
        return True


@reference("lru")
class LRU(Reference):
    def __init__(self, requests, params, seed):
        super().__init__(requests, params, seed)
        self.last: dict = {}

    def access(self, key, now, hit):
        self.last[key] = now

    def admit(self, key, now):  # a prefetched expert counts as used when inserted
        self.last[key] = now

    def victim(self, candidates, now):
        return min(candidates, key=lambda k: (self.last[k], k))


@reference("fifo")
class FIFO(Reference):
    def __init__(self, requests, params, seed):
        super().__init__(requests, params, seed)
        self.inserted: dict = {}

    def admit(self, key, now):
        self.inserted[key] = now

    def victim(self, candidates, now):
        return min(candidates, key=lambda k: (self.inserted[k], k))


@reference("lfu")
class LFU(Reference):
    def __init__(self, requests, params, seed):
        super().__init__(requests, params, seed)
        self.uses: Counter = Counter()
        self.last: dict = {}

    def access(self, key, now, hit):
        self.uses[key] += 1
        self.last[key] = now

    def victim(self, candidates, now):
        return min(candidates, key=lambda k: (self.uses[k], self.last.get(k, -1), k))


@reference("opt")
class OPT(Reference):
    def following(self, key, start: int) -> float:
        """The first request at or after ``start`` holding ``key`` (inf if none)."""
        for later in range(start, len(self.requests)):
            if key in self.requests[later]:
                return later
        return float("inf")

    def victim(self, candidates, now):
        # candidates are not in request ``now``; during a prefetch ``now`` is still ahead
        return min(candidates, key=lambda k: (-self.following(k, now), k))


@reference("opt-bypass")
class OPTBypass(OPT):
    bypass = True

    def keep(self, key, candidates, now):
        """Cache ``key`` unless it is the farthest of itself and the candidates."""
        farthest = min(candidates + [key], key=lambda k: (-self.following(k, now + 1), k))
        return farthest != key


def splitmix64(state: int) -> tuple[int, int]:
    mask = (1 << 64) - 1
    state = (state + 0x9E3779B97F4A7C15) & mask
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return state, z ^ (z >> 31)


@reference("random")
class Random(Reference):
    """The documented slot array: append on admission, swap-remove on eviction."""

    def __init__(self, requests, params, seed):
        super().__init__(requests, params, seed)
        self.slots: list = []
        self.rng = seed

    def admit(self, key, now):
        self.slots.append(key)

    def victim(self, candidates, now):
        while True:
            self.rng, draw = splitmix64(self.rng)
            key = self.slots[draw % len(self.slots)]
            if key in candidates:
                return key

    def evict(self, key):
        index = self.slots.index(key)
        self.slots[index] = self.slots[-1]
        self.slots.pop()


@reference("clock")
class Clock(Reference):
    """libCacheSim's Clock: a ring in insertion order read from the hand (index 0)."""

    def __init__(self, requests, params, seed):
        super().__init__(requests, params, seed)
        self.ring: list = []
        self.counter: dict = {}
        self.top = 2 ** (int(params.get("bits", 1)) - 1)

    def access(self, key, now, hit):
        if hit:
            self.counter[key] = min(self.counter[key] + 1, self.top)

    def admit(self, key, now):
        self.ring.append(key)
        self.counter[key] = 0

    def victim(self, candidates, now):
        while True:
            key = self.ring[0]
            if key in candidates:
                if self.counter[key] == 0:
                    return key
                self.counter[key] -= 1
            self.ring.append(self.ring.pop(0))  # the hand moves past it

    def evict(self, key):
        self.ring.remove(key)


@reference("sieve")
class Sieve(Reference):
    """SIEVE (NSDI'24): a queue oldest first; the hand (an index) moves towards the newest,
    wraps to the oldest, clears visited bits and evicts the first unvisited expert."""

    def __init__(self, requests, params, seed):
        super().__init__(requests, params, seed)
        self.queue: list = []
        self.visited: dict = {}
        self.hand = 0

    def access(self, key, now, hit):
        if hit:
            self.visited[key] = True

    def admit(self, key, now):
        self.queue.append(key)
        self.visited[key] = False

    def victim(self, candidates, now):
        while True:
            self.hand %= len(self.queue)
            key = self.queue[self.hand]
            if key in candidates:
                if not self.visited[key]:
                    return key
                self.visited[key] = False
            self.hand += 1

    def evict(self, key):
        self.queue.remove(key)  # the hand now points at its newer neighbour
        if self.hand == len(self.queue):
            self.hand = 0  # past the newest: the next sweep starts at the oldest


@reference("pinned")
class Pinned(Reference):
    """LRU until request T = ceil(train x R); from T on, the n keys held by the most of the
    first T requests (ties: smallest key; only keys seen there) are evicted last."""

    def __init__(self, requests, params, seed):
        super().__init__(requests, params, seed)
        self.start = min(len(requests), math.ceil(params.get("train", 0.1) * len(requests)))
        counts = Counter(key for request in requests[:self.start] for key in request)
        self.profile = set(sorted(counts, key=lambda k: (-counts[k], k))[:int(params.get("n", 2))])
        self.last: dict = {}

    def access(self, key, now, hit):
        self.last[key] = now

    def admit(self, key, now):
        self.last[key] = now

    def victim(self, candidates, now):
        return min(candidates, key=lambda k: (now >= self.start and k in self.profile, self.last[k], k))


@reference("lfru")
class LFRU(Reference):
    """Lowest freq / (clock - last + 1) as an exact fraction, ties: inserted first; the clock
    ticks at each insertion and each hit."""

    def __init__(self, requests, params, seed):
        super().__init__(requests, params, seed)
        self.clock = 0
        self.freq: dict = {}
        self.last: dict = {}
        self.inserted: dict = {}

    def admit(self, key, now):
        self.clock += 1
        self.freq[key], self.last[key], self.inserted[key] = 1, self.clock, self.clock

    def access(self, key, now, hit):
        if hit:
            self.clock += 1
            self.freq[key] += 1
            self.last[key] = self.clock

    def victim(self, candidates, now):
        return min(candidates, key=lambda k: (Fraction(self.freq[k], self.clock - self.last[k] + 1),
                                              self.inserted[k]))


@reference("score-lru")
class ScoreLRU(Reference):
    """Each use's key: its tick (requests before the step + its 1-based position when the
    step's experts are sorted by weight, largest first, ties smaller id) plus boost times
    (k - 1 - rank) / (k - 1); kept as the maximum while resident when monotone."""

    def __init__(self, requests, params, seed):
        super().__init__(requests, params, seed)
        self.boost = params.get("boost", 16)
        self.monotone = params.get("monotone", 1)
        self.start = [0]
        for request in requests:
            self.start.append(self.start[-1] + len(request))
        self.key: dict = {}

    def admit(self, key, now):
        self.key[key] = self.start[now]

    def access(self, key, now, hit):
        weights = self.scores[now]
        order = sorted(weights, key=lambda k: (-weights[k], k))
        rank, width = order.index(key), len(order)
        weight = 1.0 if width == 1 else (width - 1 - rank) / (width - 1)
        value = self.start[now] + rank + 1 + self.boost * weight
        self.key[key] = max(self.key[key], value) if self.monotone else value

    def victim(self, candidates, now):
        return min(candidates, key=lambda k: (self.key[k], k))


@reference("least-stale")
class LeastStale(Reference):
    """Largest predicted next use: last use + max(smoothed reuse interval, 1)."""

    def __init__(self, requests, params, seed):
        super().__init__(requests, params, seed)
        self.alpha = params.get("alpha", 0.25)
        self.last: dict = {}
        self.interval: dict = {}

    def admit(self, key, now):
        self.last.setdefault(key, now)

    def access(self, key, now, hit):
        gap = now - self.last[key]
        if gap > 0:
            old = self.interval.get(key, 0.0)
            self.interval[key] = float(gap) if old == 0.0 else (1.0 - self.alpha) * old + self.alpha * gap
        self.last[key] = now

    def victim(self, candidates, now):
        def farthest(k):
            return (-(self.last[k] + max(self.interval.get(k, 0.0), 1.0)), -self.last[k], k)
        return min(candidates, key=farthest)


def size_unit(ref: Reference) -> int:
    """The greatest common divisor of the keys' sizes, the driver's unit of a memory budget
    (one expert when all sizes are equal)."""
    return math.gcd(*{ref.size(k) for request in ref.requests for k in request})


def in_units(ref: Reference, share: float) -> int:
    """floor(share x capacity) in size units, times the unit."""
    unit = size_unit(ref)
    return int(ref.capacity // unit * share) * unit


@reference("s3fifo")
class S3FIFO(Reference):
    """S3-FIFO (SOSP'23) as libCacheSim's S3FIFO: small, main and ghost FIFOs as lists, oldest
    first; a request's experts remembered by the ghost leave it when the request arrives."""

    def __init__(self, requests, params, seed):
        super().__init__(requests, params, seed)
        self.ratios = params.get("small", 0.1), params.get("ghost", 0.9)
        self.threshold = int(params.get("threshold", 2))
        self.small: list = []
        self.main: list = []
        self.ghost: list = []
        self.left: set = set()  # the current request's experts that left the ghost
        self.freq: dict = {}
        self.evicted = False
        self.arrived = -1

    def shares(self) -> tuple[int, int, int]:
        small = in_units(self, self.ratios[0])
        return small, self.capacity - small, in_units(self, self.ratios[1])

    def used(self, queue: list) -> int:
        return sum(self.size(k) for k in queue)

    def arrive(self, now):
        if now != self.arrived:
            self.arrived = now
            self.left = {k for k in self.ghost if k in self.requests[now]}
            self.ghost = [k for k in self.ghost if k not in self.left]

    def access(self, key, now, hit):
        if hit:
            self.freq[key] += 1

    def admit(self, key, now):
        self.arrive(now)
        self.freq[key] = 0
        if key in self.left or key in self.ghost:
            self.left.discard(key)
            if key in self.ghost:
                self.ghost.remove(key)
            self.main.append(key)
        elif not self.evicted and self.used(self.small) >= self.shares()[0]:
            self.main.append(key)
        else:
            self.small.append(key)

    def victim(self, candidates, now):
        self.arrive(now)
        self.evicted = True
        while True:
            small = [k for k in self.small if k in candidates]
            main = [k for k in self.main if k in candidates]
            if main and (self.used(self.main) > self.shares()[1] or not small):
                while True:
                    key = next(k for k in self.main if k in candidates)
                    if self.freq[key] == 0:
                        return key
                    self.freq[key] = min(self.freq[key], 3) - 1
                    self.main.remove(key)
                    self.main.append(key)
            for key in small:
                if self.freq[key] < self.threshold:
                    return key
                self.small.remove(key)
                self.main.append(key)
                self.freq[key] = 0

    def evict(self, key):
        if key in self.main:
            self.main.remove(key)
            return
        self.small.remove(key)
        share = self.shares()[2]
        if self.size(key) <= share:
            while self.used(self.ghost) + self.size(key) > share:
                self.ghost.pop(0)
            self.ghost.append(key)


@reference("arc")
class ARC(Reference):
    """ARC (FAST'03) as libCacheSim's ARC: T1, T2, B1, B2 as lists, least recent first; sizes
    and p in size units; a request's experts in a ghost adapt p and leave it on arrival."""

    def __init__(self, requests, params, seed):
        super().__init__(requests, params, seed)
        self.t1: list = []
        self.t2: list = []
        self.b1: list = []
        self.b2: list = []
        self.cache: set = set()
        self.p = 0.0
        self.left: dict = {}  # the current request's experts that left a ghost: from B2?
        self.arrived = -1
        self.ghostless = None

    def units(self, keys) -> int:
        return sum(self.size(k) for k in keys) // size_unit(self)

    def ghost_hit(self, key):
        c = self.capacity // size_unit(self)
        if key in self.b1:
            self.p = min(self.p + max(self.units(self.b2) / self.units(self.b1), 1), c)
            self.b1.remove(key)
        else:
            self.p = max(self.p - max(self.units(self.b1) / self.units(self.b2), 1), 0)
            self.b2.remove(key)

    def arrive(self, now):
        if now != self.arrived:
            self.arrived = now
            self.left = {}
            for key in sorted(self.requests[now]):
                if key in self.b1 or key in self.b2:
                    self.left[key] = key in self.b2
                    self.ghost_hit(key)

    def access(self, key, now, hit):
        if hit:
            (self.t1 if key in self.t1 else self.t2).remove(key)
            self.t2.append(key)

    def admit(self, key, now):
        self.arrive(now)
        self.cache.add(key)
        if key in self.left:
            del self.left[key]
            self.t2.append(key)
        elif key in self.b1 or key in self.b2:
            self.ghost_hit(key)
            self.t2.append(key)
        else:
            self.t1.append(key)

    def replace(self, candidates, in_b2: bool):
        t1 = [k for k in self.t1 if k in candidates]
        t2 = [k for k in self.t2 if k in candidates]
        size = self.units(self.t1)
        if (t1 and (size > self.p or (size == self.p and in_b2))) or not t2:
            return t1[0]
        return t2[0]

    def victim(self, candidates, now):
        self.arrive(now)
        incoming = min((k for k in self.requests[now] if k not in self.cache), default=None)
        if incoming in self.left:
            return self.replace(candidates, self.left[incoming])
        size = 0 if incoming is None else self.units([incoming])
        c = self.capacity // size_unit(self)
        if self.units(self.t1) + self.units(self.b1) + size > c:
            if self.b1:
                self.b1.pop(0)
            elif any(k in candidates for k in self.t1):
                self.ghostless = next(k for k in self.t1 if k in candidates)
                return self.ghostless
        elif self.units(self.t1 + self.t2 + self.b1 + self.b2) >= 2 * c and self.b2:
            self.b2.pop(0)
        return self.replace(candidates, False)

    def evict(self, key):
        self.cache.remove(key)
        if key in self.t1:
            self.t1.remove(key)
            if key != self.ghostless:
                self.b1.append(key)
        else:
            self.t2.remove(key)
            self.b2.append(key)
        self.ghostless = None


@reference("lru-k")
class LRUK(Reference):
    """Uses since insertion; fewer than K: FIFO first; else by K-th most recent use, then id."""

    def __init__(self, requests, params, seed):
        super().__init__(requests, params, seed)
        self.k = int(params.get("k", 2))
        self.uses: dict = {}
        self.order: list = []  # insertion order of the residents

    def access(self, key, now, hit):
        if hit:
            self.uses[key].append(now)

    def admit(self, key, now):
        self.uses[key] = [now]
        self.order.append(key)

    def victim(self, candidates, now):
        young = [k for k in self.order if k in candidates and len(self.uses[k]) < self.k]
        if young:
            return young[0]
        return min(candidates, key=lambda k: (self.uses[k][-self.k], k))

    def evict(self, key):
        self.order.remove(key)
        del self.uses[key]


@reference("slru")
class SLRU(Reference):
    """Segments as lists, least recent first; ``self.segment[key]`` is a key's segment."""

    def __init__(self, requests, params, seed):
        super().__init__(requests, params, seed)
        self.lists: list[list] = [[] for _ in range(int(params.get("segments", 4)))]
        self.segment: dict = {}

    def share(self) -> int:
        unit = size_unit(self)
        return self.capacity // unit // len(self.lists) * unit

    def held(self, s: int) -> int:
        return sum(self.size(k) for k in self.lists[s])

    def put(self, key, s: int) -> None:
        if key in self.segment:
            self.lists[self.segment[key]].remove(key)
        self.lists[s].append(key)
        self.segment[key] = s

    def admit(self, key, now):
        room = [s for s in range(len(self.lists)) if self.held(s) + self.size(key) <= self.share()]
        self.put(key, room[0] if room else 0)

    def access(self, key, now, hit):
        if hit:
            self.put(key, min(self.segment[key] + 1, len(self.lists) - 1))
            for s in range(len(self.lists) - 1, 0, -1):
                while self.held(s) > self.share():
                    self.put(self.lists[s][0], s - 1)

    def victim(self, candidates, now):
        return next(k for keys in self.lists for k in keys if k in candidates)

    def evict(self, key):
        self.lists[self.segment.pop(key)].remove(key)


@reference("2q")
class TwoQ(Reference):
    """A1in and A1out as FIFO lists, Am as an LRU list, oldest first."""

    def __init__(self, requests, params, seed):
        super().__init__(requests, params, seed)
        self.ratios = params.get("in", 0.25), params.get("out", 0.5)
        self.a1in: list = []
        self.am: list = []
        self.a1out: list = []

    def admit(self, key, now):
        if key in self.a1out:
            self.a1out.remove(key)
            self.am.append(key)
        else:
            self.a1in.append(key)
        while sum(self.size(k) for k in self.a1out) > in_units(self, self.ratios[1]):
            self.a1out.pop(0)

    def access(self, key, now, hit):
        if hit and key in self.am:
            self.am.remove(key)
            self.am.append(key)

    def victim(self, candidates, now):
        over = sum(self.size(k) for k in self.a1in) > in_units(self, self.ratios[0])
        order = self.a1in + self.am if over else self.am + self.a1in
        return next(k for k in order if k in candidates)

    def evict(self, key):
        if key in self.a1in:
            self.a1in.remove(key)
            self.a1out.append(key)
        else:
            self.am.remove(key)


@reference("lfuda")
class LFUDA(Reference):
    """Key = uses since insertion + age; the age is the last victim's key."""

    def __init__(self, requests, params, seed):
        super().__init__(requests, params, seed)
        self.age = 0
        self.uses: dict = {}
        self.key: dict = {}  # (K, request of its last setting)

    def admit(self, key, now):
        self.uses[key] = 1
        self.key[key] = (1 + self.age, now)

    def access(self, key, now, hit):
        if hit:
            self.uses[key] += 1
            self.key[key] = (self.uses[key] + self.age, now)

    def victim(self, candidates, now):
        return min(candidates, key=lambda k: (*self.key[k], k))

    def evict(self, key):
        self.age = self.key[key][0]


@reference("lirs")
class LIRS(Reference):
    """LIRS (SIGMETRICS'02), HIR limit max(1 unit, floor(hirs x C)): S as a list (bottom
    first) of LIR and HIR experts, Q as a list (front first) of resident HIR experts."""

    def __init__(self, requests, params, seed):
        super().__init__(requests, params, seed)
        self.hirs = params.get("hirs", 0.01)
        self.stack: list = []
        self.queue: list = []
        self.lir: set = set()
        self.cache: set = set()

    def lir_limit(self) -> int:
        return self.capacity - max(size_unit(self), in_units(self, self.hirs))

    def top(self, key):
        if key in self.stack:
            self.stack.remove(key)
        self.stack.append(key)

    def prune(self):
        while self.stack and self.stack[0] not in self.lir:
            self.stack.pop(0)

    def to_queue(self, key):
        if key in self.queue:
            self.queue.remove(key)
        self.queue.append(key)

    def make_lir(self, key):
        if key in self.queue:
            self.queue.remove(key)
        self.top(key)
        self.lir.add(key)
        while sum(self.size(k) for k in self.lir) > self.lir_limit():
            lowest = next(k for k in self.stack if k in self.lir)
            self.lir.remove(lowest)
            self.queue.append(lowest)
        self.prune()

    def access(self, key, now, hit):
        if not hit:
            return
        if key in self.lir:
            self.top(key)
            self.prune()
        elif key in self.stack:
            self.make_lir(key)
        else:
            self.top(key)
            self.to_queue(key)

    def admit(self, key, now):
        self.cache.add(key)
        if key in self.stack or sum(self.size(k) for k in self.lir) + self.size(key) <= self.lir_limit():
            self.make_lir(key)
        else:
            self.top(key)
            self.queue.append(key)

    def victim(self, candidates, now):
        queued = [k for k in self.queue if k in candidates]
        return queued[0] if queued else next(k for k in self.stack if k in self.lir and k in candidates)

    def evict(self, key):
        self.cache.remove(key)
        if key in self.lir:
            self.lir.remove(key)
            self.stack.remove(key)
            self.prune()
        else:
            self.queue.remove(key)


def step_groups(step: np.ndarray, per_token: bool = False) -> list[list[int]]:
    """The tokens of each step, steps in trace order."""
    groups: list[list[int]] = []
    for n in range(len(step)):
        if groups and not per_token and step[n] == step[n - 1]:
            groups[-1].append(n)
        else:
            groups.append([n])
    return groups


def step_sets(experts: np.ndarray, step: np.ndarray, per_token: bool = False) -> list[list[set]]:
    """E[t][l] as Python sets, steps in trace order."""
    layers = experts.shape[1]
    return [[{int(e) for n in tokens for e in experts[n, layer]} for layer in range(layers)]
            for tokens in step_groups(step, per_token)]


def step_weights(experts: np.ndarray, weights: np.ndarray, step: np.ndarray,
                 per_token: bool = False) -> list[list[dict]]:
    """{expert: largest router weight among the step's tokens} per step and layer."""
    out = []
    for tokens in step_groups(step, per_token):
        per_layer = []
        for layer in range(experts.shape[1]):
            best: dict = {}
            for n in tokens:
                for e, w in zip(experts[n, layer], weights[n, layer], strict=True):
                    best[int(e)] = max(best.get(int(e), -math.inf), float(w))
            per_layer.append(best)
        out.append(per_layer)
    return out


def simulate(requests: list[set], policy: str, capacity: int, size=lambda key: 1, seed: int = 0,
             params: dict | None = None, prefetch: list[list] | None = None,
             scores: list[dict] | None = None) -> tuple[list[int], Counter]:
    """(hits per request, prefetch counts). ``requests`` are sets of hashable, ordered keys;
    ``prefetch[r]`` lists the keys to insert before request r (docs/semantics.md);
    ``scores[r]`` maps each key of request r to its router weight."""
    ref = REFERENCES[policy](requests, params or {}, seed)
    ref.capacity, ref.size, ref.scores = capacity, size, scores
    cache: set = set()
    pending: set = set()  # resident from a prefetch not yet used
    counts: Counter = Counter()
    hits = []

    def used():
        return sum(size(k) for k in cache)

    def make_room(key, protected, now):
        while used() + size(key) > capacity:
            candidates = [k for k in cache if k not in protected]
            assert candidates, "capacity below one request"
            victim = ref.victim(candidates, now)
            assert victim in candidates
            cache.remove(victim)
            ref.evict(victim)
            if victim in pending:
                pending.remove(victim)
                counts["prefetch_wasted"] += 1

    for now, request in enumerate(requests):
        batch = prefetch[now] if prefetch else []
        for key in batch:
            if key in cache:
                continue
            if sum(size(k) for k in cache if k in batch) + size(key) > capacity:
                counts["prefetch_dropped"] += 1
                continue
            make_room(key, set(batch), now)
            cache.add(key)
            ref.admit(key, now)
            pending.add(key)
            counts["prefetched"] += 1
        found = request & cache
        hits.append(len(found))
        counts["prefetch_used"] += len(found & pending)
        pending -= found
        for key in sorted(request - cache):
            if used() + size(key) > capacity and ref.bypass and \
                    not ref.keep(key, [k for k in cache if k not in request], now):
                continue  # streamed through without being cached
            make_room(key, request, now)
            cache.add(key)
            ref.admit(key, now)
        for key in sorted(request):
            ref.access(key, now, key in found)
    counts["prefetch_wasted"] += len(pending)
    return hits, counts


def reference_replay(experts, step, policy, capacity, scope="layer", per_token=False,
                     expert_bytes=None, memory=None, seed=0, params=None, prefetch=None,
                     weights=None) -> dict:
    """Pooled and per-layer counts, as moecache.replay should report them; ``prefetch[t][l]``
    lists the experts to prefetch before step t of layer l (also reported, pooled);
    ``weights`` (the trace's router weights) feed policies that read scores."""
    sets = step_sets(np.asarray(experts), np.asarray(step), per_token)
    scored = None if weights is None else step_weights(np.asarray(experts), np.asarray(weights),
                                                       np.asarray(step), per_token)
    num_layers = experts.shape[1]
    hits = np.zeros(num_layers, np.int64)
    counts: Counter = Counter()
    if scope == "layer":
        for layer in range(num_layers):
            cap = capacity if memory is None else memory // num_layers // expert_bytes[layer]
            batches = None if prefetch is None else [p[layer] for p in prefetch]
            layer_hits, layer_counts = simulate([s[layer] for s in sets], policy, cap, seed=seed,
                                                params=params, prefetch=batches,
                                                scores=None if scored is None else [s[layer] for s in scored])
            hits[layer] = sum(layer_hits)
            counts += layer_counts
    else:
        pooled = [{(layer, e) for e in s[layer]} for s in sets for layer in range(num_layers)]
        batches = None if prefetch is None else \
            [[(layer, e) for e in p[layer]] for p in prefetch for layer in range(num_layers)]
        size = (lambda key: 1) if memory is None else (lambda key: expert_bytes[key[0]])
        pooled_scores = None if scored is None else \
            [{(layer, e): w for e, w in s[layer].items()} for s in scored for layer in range(num_layers)]
        per_request, counts = simulate(pooled, policy, capacity if memory is None else memory, size=size,
                                       seed=seed, params=params, prefetch=batches, scores=pooled_scores)
        for r, h in enumerate(per_request):
            hits[r % num_layers] += h
    requests = np.array([sum(len(s[layer]) for s in sets) for layer in range(num_layers)])
    seen: list[set] = [set() for _ in range(num_layers)]
    cold = np.zeros(num_layers, np.int64)
    for s in sets:
        for layer in range(num_layers):
            cold[layer] += len(s[layer] - seen[layer])
            seen[layer] |= s[layer]
    overlap = np.array([sum(len(sets[t][layer] & sets[t - 1][layer]) for t in range(1, len(sets)))
                        for layer in range(num_layers)])
    later = np.array([sum(len(sets[t][layer]) for t in range(1, len(sets)))
                      for layer in range(num_layers)])
    return {"hits": hits, "requests": requests, "cold_misses": cold,
            "reuse_hits": overlap, "reuse_requests": later,
            "max_set": max((len(x) for s in sets for x in s), default=0),
            "steps": len(sets), **{k: counts[k] for k in
                                   ("prefetched", "prefetch_used", "prefetch_wasted", "prefetch_dropped")}}


def assert_matches(result, expected: dict) -> None:
    """A ReplayResult agrees with ``reference_replay``'s counts, layer by layer."""
    frame = result.per_layer
    np.testing.assert_array_equal(frame["hits"], expected["hits"])
    np.testing.assert_array_equal(frame["requests"], expected["requests"])
    np.testing.assert_array_equal(frame["cold_misses"], expected["cold_misses"])
    np.testing.assert_array_equal(frame["reuse_hits"], expected["reuse_hits"])
    np.testing.assert_array_equal(frame["reuse_requests"], expected["reuse_requests"])
    assert result.hits == expected["hits"].sum()
    assert result.misses == expected["requests"].sum() - expected["hits"].sum()
    later = expected["reuse_requests"].sum()
    if later:
        assert result.reuse_rate == expected["reuse_hits"].sum() / later
