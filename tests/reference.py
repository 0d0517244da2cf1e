"""A slow, obviously-correct replay written straight from docs/semantics.md.

It shares no code with moecache's kernels or hooks: sets are Python sets, the cache is a
set, and each policy's reference (``REFERENCES``, one small class per registered policy,
found by name) picks its victim with ``min`` over the candidates with the policy's full
sort key. A new policy adds its class here with ``@reference("name")``.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

REFERENCES: dict[str, type[Reference]] = {}


def reference(name: str):
    """Register a reference policy under the registered policy's name."""
    def register(cls):
        REFERENCES[name] = cls
        return cls
    return register


class Reference:
    """Hooks of the slow simulator; ``requests`` is the whole stream (for OPT)."""

    bypass = False

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


def step_sets(experts: np.ndarray, step: np.ndarray, per_token: bool = False) -> list[list[set]]:
    """E[t][l] as Python sets, steps in trace order."""
    groups: list[list[int]] = []
    for n in range(len(experts)):
        if groups and not per_token and step[n] == step[n - 1]:
            groups[-1].append(n)
        else:
            groups.append([n])
    layers = experts.shape[1]
    return [[{int(e) for n in tokens for e in experts[n, layer]} for layer in range(layers)]
            for tokens in groups]


def simulate(requests: list[set], policy: str, capacity: int, size=lambda key: 1, seed: int = 0,
             params: dict | None = None, prefetch: list[list] | None = None) -> tuple[list[int], Counter]:
    """(hits per request, prefetch counts). ``requests`` are sets of hashable, ordered keys;
    ``prefetch[r]`` lists the keys to insert before request r (docs/semantics.md)."""
    ref = REFERENCES[policy](requests, params or {}, seed)
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
                     expert_bytes=None, memory=None, seed=0, params=None, prefetch=None) -> dict:
    """Pooled and per-layer counts, as moecache.replay should report them; ``prefetch[t][l]``
    lists the experts to prefetch before step t of layer l (also reported, pooled)."""
    sets = step_sets(np.asarray(experts), np.asarray(step), per_token)
    num_layers = experts.shape[1]
    hits = np.zeros(num_layers, np.int64)
    counts: Counter = Counter()
    if scope == "layer":
        for layer in range(num_layers):
            cap = capacity if memory is None else memory // num_layers // expert_bytes[layer]
            batches = None if prefetch is None else [p[layer] for p in prefetch]
            layer_hits, layer_counts = simulate([s[layer] for s in sets], policy, cap, seed=seed,
                                                params=params, prefetch=batches)
            hits[layer] = sum(layer_hits)
            counts += layer_counts
    else:
        pooled = [{(layer, e) for e in s[layer]} for s in sets for layer in range(num_layers)]
        batches = None if prefetch is None else \
            [[(layer, e) for e in p[layer]] for p in prefetch for layer in range(num_layers)]
        size = (lambda key: 1) if memory is None else (lambda key: expert_bytes[key[0]])
        per_request, counts = simulate(pooled, policy, capacity if memory is None else memory, size=size,
                                       seed=seed, params=params, prefetch=batches)
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
