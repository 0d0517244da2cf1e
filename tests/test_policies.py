"""The contract every registered policy meets, found through the registry: a policy added
later is tested here without any edit (its slow reference goes in tests/reference.py).

Each test runs the policy's fast kernel (a plain replay, where it has one) and its hooks
through the driver (``record_events=True``, with or without prefetch) and compares both
with the slow reference.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import moecache as mc
from moecache.policies import REGISTRY

from .reference import REFERENCES, assert_matches, reference_replay
from .strategies import make_trace, routings

POLICIES = list(REGISTRY)
PREFETCH_FIELDS = ("prefetched", "prefetch_used", "prefetch_wasted", "prefetch_dropped")


@st.composite
def policy_args(draw, policy):
    """Random valid parameter values of ``policy`` (empty for a policy without any)."""
    args = {}
    for p in REGISTRY[policy].params:
        if draw(st.booleans()):
            args[p.name] = (draw(st.integers(int(p.low), int(p.high))) if p.integer
                            else draw(st.floats(p.low, p.high)))
    return args


def both_paths(trace, policy, capacity=None, **kwargs):
    """The plain replay and the driver with events, after checking they agree."""
    plain = mc.replay(trace, policy, capacity, **kwargs)
    driven = mc.replay(trace, policy, capacity, record_events=True, **kwargs)
    np.testing.assert_array_equal(plain.per_layer["hits"], driven.per_layer["hits"])
    assert driven.events["hits"].sum() == driven.hits and driven.events["misses"].sum() == driven.misses
    return plain


def test_every_policy_has_a_reference():
    assert sorted(REGISTRY) == sorted(REFERENCES)


@pytest.mark.parametrize("policy", POLICIES)
@settings(max_examples=25)
@given(data=routings(), extra=st.integers(0, 12), per_token=st.booleans(), seed=st.integers(0, 99),
       args=st.data())
def test_layer_scope_matches_reference(policy, data, extra, per_token, seed, args):
    experts, step, num_experts = data
    chosen = args.draw(policy_args(policy))
    trace = make_trace(experts, step, num_experts)
    capacity = reference_replay(experts, step, "lru", num_experts, per_token=per_token)["max_set"] + extra
    result = both_paths(trace, policy, capacity, per_token=per_token, seed=seed, policy_args=chosen)
    assert_matches(result, reference_replay(experts, step, policy, capacity, per_token=per_token,
                                            weights=trace.weights, seed=seed, params=chosen))


@pytest.mark.parametrize("policy", POLICIES)
@settings(max_examples=25)
@given(data=routings(), extra=st.integers(0, 20), seed=st.integers(0, 99), args=st.data())
def test_global_scope_matches_reference(policy, data, extra, seed, args):
    experts, step, num_experts = data
    chosen = args.draw(policy_args(policy))
    trace = make_trace(experts, step, num_experts)
    capacity = reference_replay(experts, step, "lru", num_experts)["max_set"] + extra
    result = both_paths(trace, policy, capacity, scope="global", seed=seed, policy_args=chosen)
    assert_matches(result, reference_replay(experts, step, policy, capacity, scope="global", seed=seed,
                                            weights=trace.weights, params=chosen))


@pytest.mark.parametrize("policy", POLICIES)
@settings(max_examples=20)
@given(data=routings(max_layers=3), sizes=st.lists(st.integers(1, 4), min_size=3, max_size=3),
       slack=st.integers(0, 30))
def test_memory_budget_with_mixed_expert_sizes_matches_reference(policy, data, sizes, slack):
    experts, step, num_experts = data
    expert_bytes = [1000 * s for s in sizes[:experts.shape[1]]]
    trace = make_trace(experts, step, num_experts, expert_bytes=expert_bytes)
    largest = max(reference_replay(experts, step, "lru", num_experts)["max_set"] * b for b in expert_bytes)
    memory = largest + 1000 * slack
    result = both_paths(trace, policy, memory=memory, scope="global")
    expected = reference_replay(experts, step, policy, None, scope="global", weights=trace.weights,
                                expert_bytes=expert_bytes, memory=memory)
    assert_matches(result, expected)
    missed = (expected["requests"] - expected["hits"]) * np.array(expert_bytes)
    assert result.miss_bytes == int(missed.sum())


@pytest.mark.parametrize("policy", POLICIES)
@settings(max_examples=10)
@given(data=routings(max_layers=2, max_experts=90, max_tokens=25), extra=st.integers(0, 40))
def test_more_than_64_experts_match_reference(policy, data, extra):
    """Past 64 keys the lru and fifo kernels leave their 64-bit mask representation."""
    experts, step, num_experts = data
    trace = make_trace(experts, step, num_experts)
    capacity = reference_replay(experts, step, "lru", num_experts)["max_set"] + extra
    for scope in ("layer", "global"):
        result = both_paths(trace, policy, capacity, scope=scope)
        assert_matches(result, reference_replay(experts, step, policy, capacity, scope=scope,
                                                weights=trace.weights))


@st.composite
def prefetch_lists(draw, steps, layers, num_experts):
    """Random prefetch batches (possibly empty, possibly repeating an id)."""
    ids = st.integers(0, num_experts - 1)
    return [[draw(st.lists(ids, max_size=3)) for _ in range(layers)] for _ in range(steps)]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("scope", ["layer", "global"])
@settings(max_examples=20)
@given(data=routings(), extra=st.integers(0, 6), seed=st.integers(0, 99), draw=st.data())
def test_prefetch_matches_reference(policy, scope, data, extra, seed, draw):
    experts, step, num_experts = data
    trace = make_trace(experts, step, num_experts, expert_bytes=10)
    probe = reference_replay(experts, step, "lru", num_experts)
    batches = draw.draw(prefetch_lists(probe["steps"], experts.shape[1], num_experts))
    capacity = probe["max_set"] + extra
    result = mc.replay(trace, policy, capacity, scope=scope, seed=seed, record_events=True,
                       prefetch=mc.Prefetch.from_lists(batches))
    expected = reference_replay(experts, step, policy, capacity, scope=scope, seed=seed, prefetch=batches,
                                weights=trace.weights)
    assert_matches(result, expected)
    for field in PREFETCH_FIELDS:
        assert getattr(result, field) == expected[field], field
    assert result.prefetch_used + result.prefetch_wasted == result.prefetched
    assert result.prefetch_bytes == 10 * result.prefetched
    assert result.wasted_bytes == 10 * result.prefetch_wasted
    events = result.events
    assert len(events) == result.steps * trace.num_layers
    assert events["prefetched"].sum() == result.prefetched
    assert events["hits"].sum() == result.hits and events["misses"].sum() == result.misses
    per_layer = events.groupby("layer")["hits"].sum()
    np.testing.assert_array_equal(per_layer.to_numpy(), result.per_layer["hits"].to_numpy())


@pytest.mark.parametrize("policy", POLICIES)
@settings(max_examples=20)
@given(data=routings())
def test_full_capacity_leaves_only_cold_misses(policy, data):
    trace = make_trace(*data)
    layer = both_paths(trace, policy, trace.num_experts)
    pooled = both_paths(trace, policy, trace.num_experts * trace.num_layers, scope="global")
    for result in (layer, pooled):
        assert result.misses == result.cold_misses
        assert (result.per_layer["cold_misses"] == result.per_layer["misses"]).all()


@pytest.mark.parametrize("policy", [p for p in POLICIES if REGISTRY[p].admission == "demand"])
@settings(max_examples=20)
@given(data=routings(grouped=False), extra=st.integers(0, 10), seed=st.integers(0, 9))
def test_demand_policy_at_k_and_below_opt(policy, data, extra, seed):
    """At C = K (one token per step) the cache holds exactly the last step, whatever the
    policy; at any capacity OPT's hits bound the policy's."""
    trace = make_trace(*data)
    at_k = both_paths(trace, policy, trace.top_k, seed=seed)
    assert at_k.hits == at_k.per_layer["reuse_hits"].sum()
    capacity = trace.top_k + extra
    for scope in ("layer", "global"):
        best = mc.replay(trace, "opt", capacity, scope=scope).hits
        assert both_paths(trace, policy, capacity, scope=scope, seed=seed).hits <= best
