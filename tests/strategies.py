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
