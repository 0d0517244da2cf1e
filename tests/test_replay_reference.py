"""Replays against the slow reference (tests/reference.py) beyond the policy contract of
tests/test_policies.py: memory budgets in layer scope, and a hand-worked example."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import moecache as mc
from moecache.policies import POLICIES

from .reference import assert_matches, reference_replay
from .strategies import make_trace, routings


@pytest.mark.parametrize("policy", POLICIES)
@given(data=routings(max_layers=2, grouped=False), share=st.integers(1, 3))
def test_layer_scope_memory_budget_splits_evenly(policy, data, share):
    experts, step, num_experts = data
    num_layers, top_k = experts.shape[1:]
    memory = num_layers * 100 * (top_k + share)
    trace = make_trace(experts, step, num_experts, expert_bytes=100)
    result = mc.replay(trace, policy, memory=memory)
    assert_matches(result, reference_replay(experts, step, policy, top_k + share, weights=trace.weights))
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
