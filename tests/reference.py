"""A slow, obviously-correct replay written straight from docs/semantics.md.

It shares no code with moecache's kernels: sets are Python sets, the cache is a dict,
and every eviction takes ``min`` over the candidates with the policy's full sort key.
"""

from __future__ import annotations

import numpy as np


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


def splitmix64(state: int) -> tuple[int, int]:
    mask = (1 << 64) - 1
    state = (state + 0x9E3779B97F4A7C15) & mask
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return state, z ^ (z >> 31)


def simulate(requests: list[set], policy: str, capacity: int, size=lambda key: 1,
             seed: int = 0) -> list[int]:
    """Hits per request. ``requests`` are sets of hashable, ordered keys."""
    cache: set = set()
    last_use: dict = {}
    inserted: dict = {}
    uses: dict = {}
    slots: list = []  # the random policy's documented slot array (swap-remove)
    rng = seed
    hits = []

    def next_use(key, now):
        for later in range(now + 1, len(requests)):
            if key in requests[later]:
                return later
        return float("inf")

    for now, request in enumerate(requests):
        hits.append(len(request & cache))
        for key in request:
            uses[key] = uses.get(key, 0) + 1
        for key in sorted(request - cache):
            if policy == "opt-bypass" and sum(size(k) for k in cache) + size(key) > capacity:
                farthest = min([k for k in cache if k not in request] + [key],
                               key=lambda k: (-next_use(k, now), k))
                if farthest == key:
                    continue  # streamed through without being cached
            while sum(size(k) for k in cache) + size(key) > capacity:
                candidates = [k for k in cache if k not in request]
                assert candidates, "capacity below one request"
                if policy == "lru":
                    victim = min(candidates, key=lambda k: (last_use[k], k))
                elif policy == "fifo":
                    victim = min(candidates, key=lambda k: (inserted[k], k))
                elif policy == "lfu":
                    victim = min(candidates, key=lambda k: (uses[k], last_use[k], k))
                elif policy in ("opt", "opt-bypass"):
                    victim = min(candidates, key=lambda k: (-next_use(k, now), k))
                elif policy == "random":
                    while True:
                        rng, draw = splitmix64(rng)
                        victim = slots[draw % len(slots)]
                        if victim not in request:
                            break
                else:
                    raise ValueError(policy)
                cache.remove(victim)
                index = slots.index(victim)
                slots[index] = slots[-1]
                slots.pop()
            cache.add(key)
            inserted[key] = now
            slots.append(key)
        for key in request:
            last_use[key] = now
    return hits


def reference_replay(experts, step, policy, capacity, scope="layer", per_token=False,
                     expert_bytes=None, memory=None, seed=0) -> dict:
    """Pooled and per-layer counts, as moecache.replay should report them."""
    sets = step_sets(np.asarray(experts), np.asarray(step), per_token)
    num_layers = experts.shape[1]
    hits = np.zeros(num_layers, np.int64)
    if scope == "layer":
        for layer in range(num_layers):
            cap = capacity if memory is None else memory // num_layers // expert_bytes[layer]
            hits[layer] = sum(simulate([s[layer] for s in sets], policy, cap, seed=seed))
    else:
        pooled = [{(layer, e) for e in s[layer]} for s in sets for layer in range(num_layers)]
        if memory is None:
            per_request = simulate(pooled, policy, capacity, seed=seed)
        else:
            per_request = simulate(pooled, policy, memory,
                                   size=lambda key: expert_bytes[key[0]], seed=seed)
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
            "max_set": max((len(x) for s in sets for x in s), default=0)}
