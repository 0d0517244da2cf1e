"""Hypothesis strategies for random routing traces."""

import numpy as np
from hypothesis import strategies as st

import moecache as mc


@st.composite
def routings(draw, max_layers=3, max_experts=10, max_tokens=40, grouped=True):
    """(experts (T, L, K), step (T,), num_experts) with optional multi-token steps."""
    num_experts = draw(st.integers(1, max_experts))
    top_k = draw(st.integers(1, num_experts))
    num_layers = draw(st.integers(1, max_layers))
    tokens = draw(st.integers(1, max_tokens))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    # sticky-ish routing so that caches see both hits and misses
    pool = draw(st.integers(top_k, num_experts))
    experts = np.stack([
        np.stack([rng.permutation(pool)[:top_k] for _ in range(num_layers)])
        for _ in range(tokens)]).astype(np.int16)
    if grouped:
        step = np.cumsum(rng.random(tokens) < draw(st.floats(0.3, 1.0))).astype(np.int64)
    else:
        step = np.arange(tokens, dtype=np.int64)
    return experts, step, num_experts


def make_trace(experts, step, num_experts, expert_bytes=None):
    """A trace of the routing, with router weights from a few values (so that ranks tie)."""
    weights = np.random.default_rng(experts.size).integers(1, 5, experts.shape) / 4
    return mc.Trace.from_arrays(experts, num_experts=num_experts, step=step,
                                expert_bytes=expert_bytes, weights=weights.astype(np.float32))


@st.composite
def unit_streams(draw, key_counts=(1, 2, 3, 5, 8, 16, 40, 64, 65, 130), beyond=0):
    """(keys, offsets, num_keys, capacity) of a random unit-size request stream for kernel
    tests: up to 1000 requests of 1..8 distinct ascending keys, skewed and sticky so that
    hits, misses and returns of evicted keys are all common; capacities from the largest
    request up to ``beyond`` past the number of keys."""
    num_keys = draw(st.sampled_from(key_counts))
    top_k = draw(st.integers(1, min(8, num_keys)))
    num_requests = draw(st.integers(1, 1000))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    popularity = rng.permutation(1.0 / np.arange(1, num_keys + 1) ** draw(st.floats(0.0, 2.0)))
    popularity /= popularity.sum()
    stickiness = draw(st.floats(0.0, 0.9))
    sets, previous = [], []
    for _ in range(num_requests):
        k = int(rng.integers(1, top_k + 1))
        kept = [key for key in previous if rng.random() < stickiness][:k]
        fresh = [int(key) for key in rng.choice(num_keys, size=k, replace=False, p=popularity)]
        chosen = list(dict.fromkeys(kept + fresh))[:k]
        sets.append(sorted(chosen))
        previous = chosen
    keys = np.array([key for s in sets for key in s], np.int32)
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in sets])]).astype(np.int64)
    return keys, offsets, num_keys, draw(st.integers(max(len(s) for s in sets), num_keys + beyond))
