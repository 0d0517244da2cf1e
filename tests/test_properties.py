"""Properties every correct expert-cache simulator has (docs/semantics.md, ReMoE appendix)."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import moecache as mc
from moecache.curve import STACK_POLICIES
from moecache.policies import POLICIES, REGISTRY

from .strategies import make_trace, routings


def largest_set(trace, per_token=False):
    return int(mc.Requests.from_trace(trace, per_token=per_token).set_sizes.max())


@pytest.mark.parametrize("policy", list(STACK_POLICIES))
@pytest.mark.parametrize("scope", ["layer", "global"])
@given(data=routings())
def test_hit_rate_never_decreases_with_capacity(policy, scope, data):
    trace = make_trace(*data)
    top = trace.num_experts * (trace.num_layers if scope == "global" else 1)
    hits = [mc.replay(trace, policy, c, scope=scope).hits
            for c in range(largest_set(trace), top + 1)]
    assert hits == sorted(hits)


@pytest.mark.parametrize("scope", ["layer", "global"])
@given(data=routings(), extra=st.integers(0, 10))
def test_opt_bypass_never_below_opt(scope, data, extra):
    """With unit sizes, bypassing can only help Belady (docs/semantics.md)."""
    trace = make_trace(*data)
    capacity = largest_set(trace) + extra
    assert (mc.replay(trace, "opt-bypass", capacity, scope=scope).hits
            >= mc.replay(trace, "opt", capacity, scope=scope).hits)


@given(data=routings(), extra=st.integers(0, 10))
def test_lru_hits_at_least_reuse_per_layer(data, extra):
    """With per-layer caches the previous step's experts are always resident under LRU."""
    trace = make_trace(*data)
    result = mc.replay(trace, "lru", largest_set(trace) + extra)
    frame = result.per_layer
    assert (frame["hits"] >= frame["reuse_hits"]).all()
    # the rates compare the same way once step 0 (no predecessor) is left out
    assert (frame["hits"] / frame["reuse_requests"].clip(lower=1)
            >= frame["reuse_rate"].fillna(0)).all()


@given(data=routings(), seed=st.integers(0, 2**31))
def test_random_is_reproducible_for_a_seed(data, seed):
    trace = make_trace(*data)
    capacity = largest_set(trace)
    first = mc.replay(trace, "random", capacity, seed=seed)
    again = mc.replay(trace, "random", capacity, seed=seed)
    assert np.array_equal(first.per_layer["hits"], again.per_layer["hits"])


def test_reuse_rate_is_a_property_of_routing_alone():
    trace = mc.synth(layers=3, experts=16, top_k=4, tokens=500, seed=3)
    weightless = [p for p in POLICIES if not REGISTRY[p].needs_scores]  # synth gives no weights
    rates = {mc.replay(trace, p, c).reuse_rate for p in weightless for c in (4, 9, 16)}
    assert len(rates) == 1
