"""Exact agreement of every policy and scope with the slow reference (tests/reference.py)."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import moecache as mc
from moecache.policies import POLICIES

from .reference import reference_replay
from .strategies import make_trace, routings


def assert_matches(result, expected):
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


@pytest.mark.parametrize("policy", POLICIES)
@given(data=routings(), extra=st.integers(0, 12), per_token=st.booleans(), seed=st.integers(0, 99))
def test_layer_scope_matches_reference(policy, data, extra, per_token, seed):
    experts, step, num_experts = data
    trace = make_trace(experts, step, num_experts)
    probe = reference_replay(experts, step, "lru", num_experts, per_token=per_token)
    capacity = probe["max_set"] + extra
    result = mc.replay(trace, policy, capacity, per_token=per_token, seed=seed)
    assert_matches(result, reference_replay(experts, step, policy, capacity,
                                            per_token=per_token, seed=seed))


@pytest.mark.parametrize("policy", POLICIES)
@given(data=routings(), extra=st.integers(0, 20), seed=st.integers(0, 99))
def test_global_scope_matches_reference(policy, data, extra, seed):
    experts, step, num_experts = data
    trace = make_trace(experts, step, num_experts)
    capacity = reference_replay(experts, step, "lru", num_experts)["max_set"] + extra
    result = mc.replay(trace, policy, capacity, scope="global", seed=seed)
    assert_matches(result, reference_replay(experts, step, policy, capacity, scope="global",
                                            seed=seed))


@pytest.mark.parametrize("policy", POLICIES)
@given(data=routings(max_layers=3), sizes=st.lists(st.integers(1, 4), min_size=3, max_size=3),
       slack=st.integers(0, 30))
def test_memory_budget_with_mixed_expert_sizes_matches_reference(policy, data, sizes, slack):
    experts, step, num_experts = data
    num_layers = experts.shape[1]
    expert_bytes = [1000 * s for s in sizes[:num_layers]]
    trace = make_trace(experts, step, num_experts, expert_bytes=expert_bytes)
    largest = max(reference_replay(experts, step, "lru", num_experts)["max_set"] * b
                  for b in expert_bytes)
    memory = largest + 1000 * slack
    result = mc.replay(trace, policy, memory=memory, scope="global")
    expected = reference_replay(experts, step, policy, None, scope="global",
                                expert_bytes=expert_bytes, memory=memory)
    assert_matches(result, expected)
    assert result.miss_bytes == int(((expected["requests"] - expected["hits"])
                                     * np.array(expert_bytes)).sum())


@pytest.mark.parametrize("policy", POLICIES)
@given(data=routings(max_layers=2, grouped=False), share=st.integers(1, 3))
def test_layer_scope_memory_budget_splits_evenly(policy, data, share):
    experts, step, num_experts = data
    num_layers, top_k = experts.shape[1:]
    memory = num_layers * 100 * (top_k + share)
    trace = make_trace(experts, step, num_experts, expert_bytes=100)
    result = mc.replay(trace, policy, memory=memory)
    assert_matches(result, reference_replay(experts, step, policy, top_k + share))
    assert result.capacity == top_k + share


def test_hand_worked_lru_example():
    """Two layers, E=4, K=2, decode: every number below is worked out by hand."""
    experts = np.array([[[0, 1], [2, 3]],
                        [[1, 2], [2, 3]],
                        [[0, 3], [0, 1]],
                        [[0, 1], [2, 3]]])
    trace = mc.Trace.from_arrays(experts, num_experts=4, expert_bytes=[10, 20])
    r = mc.replay(trace, "lru", 3)
    # layer 0, steps {0,1} {1,2} {0,3} {0,1}: t0 two cold misses; t1 hit 1, admit 2 (room);
    # t2 hit 0, admit 3 evicting 1 (1 and 2 tie on recency -> smaller id); t3 hit 0,
    # admit 1 evicting 2 (older than 3) -> 3 hits
    # layer 1, steps {2,3} {2,3} {0,1} {2,3}: t1 two hits; t2 admit 0 (room), admit 1
    # evicting 2 (tie with 3 -> smaller id); t3 hit 3, admit 2 evicting 0 -> 3 hits
    assert r.per_layer["hits"].tolist() == [3, 3]
    assert r.per_layer["cold_misses"].tolist() == [4, 4]
    assert r.hits == 6 and r.requests == 16 and r.misses == 10
    assert r.per_layer["reuse_hits"].tolist() == [1 + 0 + 1, 2 + 0 + 0]
    assert r.reuse_rate == 4 / 12
    assert r.miss_bytes == 5 * 10 + 5 * 20


@pytest.mark.parametrize("policy", POLICIES)
@given(data=routings(max_layers=2, max_experts=90, max_tokens=25), extra=st.integers(0, 40))
def test_more_than_64_experts_match_reference(policy, data, extra):
    """Past 64 keys the lru and fifo kernels leave their 64-bit mask representation."""
    experts, step, num_experts = data
    trace = make_trace(experts, step, num_experts)
    capacity = reference_replay(experts, step, "lru", num_experts)["max_set"] + extra
    for scope in ("layer", "global"):
        result = mc.replay(trace, policy, capacity, scope=scope)
        assert_matches(result, reference_replay(experts, step, policy, capacity, scope=scope))
