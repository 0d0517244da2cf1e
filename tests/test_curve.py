"""Whole curves: one stack pass must equal a replay at every capacity, exactly."""

import importlib

import numpy as np
import pandas as pd
import pytest
from hypothesis import given

import moecache as mc
from moecache.curve import STACK_POLICIES
from moecache.policies import POLICIES, resolve

from .strategies import make_trace, routings

curve_module = importlib.import_module("moecache.curve")  # the package exports the function


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("sizes", ["one size", "a size per layer"])
@given(data=routings(max_experts=8))
def test_curve_equals_replay_at_every_capacity(policy, scope, sizes, data):
    experts, step, num_experts = data
    layers = experts.shape[1]
    expert_bytes = 7 if sizes == "one size" else [7 + 5 * layer for layer in range(layers)]
    trace = make_trace(experts, step, num_experts, expert_bytes=expert_bytes)
    frame = mc.curve(trace, policy, scope, bandwidth="1MB/s")
    smallest = int(mc.Requests.from_trace(trace).set_sizes.max())
    top = num_experts * (trace.num_layers if scope == "global" else 1)
    assert frame["capacity"].tolist() == list(range(smallest, top + 1))
    for row in frame.itertuples():
        single = mc.replay(trace, policy, row.capacity, scope, bandwidth="1MB/s").to_dict()
        for key in ("hits", "misses", "cold_misses", "miss_bytes", "requests", "reuse_rate"):
            assert getattr(row, key) == single[key], key
        assert row.io_seconds == pytest.approx(single["io_seconds"])


def test_curve_on_synthetic_trace_is_monotone_and_bounded():
    trace = mc.synth(layers=4, experts=32, top_k=4, tokens=3000, seed=2)
    lru, opt = mc.curve(trace, "lru"), mc.curve(trace, "opt")
    assert np.all(np.diff(lru["hits"]) >= 0) and np.all(opt["hits"] >= lru["hits"])
    assert lru["misses"].iloc[-1] == lru["cold_misses"].iloc[-1]
    chosen = mc.curve(trace, "fifo", capacities=[4, 9, 40])
    assert chosen["capacity"].tolist() == [4, 9, 40]
    assert chosen["hits"].iloc[1] == mc.replay(trace, "fifo", 9).hits


def test_curve_rejects_capacity_below_a_step_set():
    trace = mc.synth(layers=1, experts=8, top_k=4, tokens=20, seed=0)
    with pytest.raises(mc.MoecacheError, match="below the largest step set"):
        mc.curve(trace, "lru", capacities=[3, 5])


@pytest.mark.parametrize("policy", list(STACK_POLICIES))
@given(data=routings(max_layers=2, max_experts=90, max_tokens=25))
def test_curve_past_64_experts_equals_replay(policy, data):
    """Past 64 keys the lru curve leaves its 64-bit mask shortcut for the general stack."""
    experts, step, num_experts = data
    trace = make_trace(experts, step, num_experts)
    for scope in ("layer", "global"):
        frame = mc.curve(trace, policy, scope)
        for row in frame.itertuples():
            assert row.hits == mc.replay(trace, policy, row.capacity, scope).hits


@pytest.mark.parametrize("scope", ["layer", "global"])
@given(data=routings(max_layers=3, max_experts=40, max_tokens=60, grouped=False))
def test_opt_curve_with_one_request_size_equals_replay(scope, data):
    """One token per step: every request has K experts and OPT takes the marker kernel."""
    experts, step, num_experts = data
    trace = make_trace(experts, step, num_experts)
    requests = mc.Requests.from_trace(trace)
    assert len(set(requests.set_sizes.ravel().tolist())) == 1
    frame = mc.curve(trace, "opt", scope)
    for row in frame.itertuples():
        assert row.hits == mc.replay(trace, "opt", row.capacity, scope).hits


@pytest.mark.parametrize("layers, experts, top_k", [(64, 64, 4), (40, 64, 4), (6, 96, 8), (2, 16, 1)])
def test_long_opt_curve_with_one_request_size_equals_replay(layers, experts, top_k):
    """Long sticky traces: records shift across many marker blocks, past 512 markers the
    first marker is searched 32 blocks at a time more than once, and at 4,096 keys the
    shift skips blocks that hold no record."""
    trace = mc.synth(layers=layers, experts=experts, top_k=top_k, tokens=400, stickiness=0.6, seed=7)
    for scope in ("layer", "global"):
        frame = mc.curve(trace, "opt", scope).set_index("capacity")
        top = experts * (layers if scope == "global" else 1)
        for capacity in sorted({top_k, top_k + 1, 17, 33, 100, 513, 700, top // 2, top} - {0}):
            if top_k <= capacity <= top:
                assert frame.loc[capacity, "hits"] == mc.replay(trace, "opt", capacity, scope).hits


def test_lfu_curve_past_its_priority_range_falls_back_to_replays(monkeypatch):
    trace = mc.synth(layers=2, experts=16, top_k=4, tokens=200, seed=3)
    one_pass = mc.curve(trace, "lfu", "global")
    monkeypatch.setattr(curve_module, "PRIORITY_LIMIT", 1000)
    assert not curve_module.one_pass(mc.Requests.from_trace(trace), resolve("lfu"))
    pd.testing.assert_frame_equal(mc.curve(trace, "lfu", "global"), one_pass)


@pytest.mark.parametrize("layers, experts, tokens",
                         [(3, 32, 1500), (1, 100, 1500), (40, 64, 150), (100, 64, 60)])
def test_long_lru_curve_past_64_experts_equals_replay(layers, experts, tokens):
    """Long enough for the LRU stamp counter to renumber its stamps many times (and, past
    2,000 keys, to count words in chunks of 64: two chunks at 2,560 keys, four at 6,400)."""
    trace = mc.synth(layers=layers, experts=experts, top_k=4, tokens=tokens, stickiness=0.3, seed=5)
    frame = mc.curve(trace, "lru", "global").set_index("capacity")
    for capacity in (4, 5, 9, 17, 33, 60, 95, 1000, 3000, layers * experts):
        if capacity > layers * experts:
            continue
        assert frame.loc[capacity, "hits"] == mc.replay(trace, "lru", capacity, "global").hits
