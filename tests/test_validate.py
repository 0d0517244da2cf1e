"""The front door (moecache.validate): every error, capacity ranges, clipping and memory
splits, checked against the slow reference, and the same answers from every driver."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import moecache as mc
from moecache.compare import compare
from moecache.sweep import sweep
from moecache.validate import plan, plan_range

from .reference import reference_replay, step_sets
from .strategies import make_trace, routings


@pytest.fixture(scope="module")
def batched():
    """Prefill steps of 6 tokens: step sets larger than K, per-token steps of K."""
    return mc.synth(layers=3, experts=16, top_k=2, tokens=120, sequences=2, prompt_len=6, seed=3)


def largest_set(experts, step, per_token):
    return max(len(s) for sets in step_sets(experts, step, per_token) for s in sets)


@settings(max_examples=40)
@given(data=routings(), scope=st.sampled_from(["layer", "global"]), per_token=st.booleans())
def test_range_is_largest_step_set_to_every_expert(data, scope, per_token):
    experts, step, num_experts = data
    trace = make_trace(experts, step, num_experts)
    smallest = largest_set(experts, step, per_token)
    top = num_experts * (experts.shape[1] if scope == "global" else 1)
    checked = plan_range(trace, "lru", scope, per_token=per_token)
    assert (checked.smallest, checked.top) == (smallest, top)
    assert checked.capacities == tuple(range(smallest, top + 1))
    frame = mc.curve(trace, "lru", scope, per_token=per_token)
    assert frame["capacity"].tolist() == list(checked.capacities)
    assert plan(trace, "lru", scope, capacity=smallest, per_token=per_token).capacity == smallest
    if smallest > 1:
        errors = set()
        for call in (lambda: plan(trace, "lru", scope, capacity=smallest - 1, per_token=per_token),
                     lambda: mc.replay(trace, "lru", smallest - 1, scope, per_token=per_token),
                     lambda: mc.curve(trace, "lru", scope, capacities=[smallest - 1, top],
                                      per_token=per_token)):
            with pytest.raises(mc.MoecacheError, match="below the largest step set") as caught:
                call()
            errors.add(str(caught.value))
        assert errors == {f"<memory>: capacity {smallest - 1} is below the largest step set ({smallest} "
                          f"experts in layer {_where(experts, step, per_token)}); use a capacity >= "
                          f"{smallest}" + (" or per-token steps (--per-token)"
                                           if not per_token and len(set(step)) < len(step) else "")}


def _where(experts, step, per_token):
    """'L at step T' of the first largest set, step-major then layer, from the reference's sets."""
    sets = step_sets(experts, step, per_token)
    size = max(len(s) for row in sets for s in row)
    return next(f"{layer} at step {t}" for t, row in enumerate(sets) for layer, s in enumerate(row)
                if len(s) == size)


@settings(max_examples=30)
@given(data=routings(), scope=st.sampled_from(["layer", "global"]), spare=st.integers(0, 40),
       policy=st.sampled_from(["lru", "fifo", "opt"]))
def test_memory_split_matches_reference(data, scope, spare, policy):
    experts, step, num_experts = data
    layers = experts.shape[1]
    sizes = [6 + 4 * layer for layer in range(layers)]  # gcd 2 when layers > 1
    trace = make_trace(experts, step, num_experts, expert_bytes=sizes)
    largest = [max(len(s[layer]) for s in step_sets(experts, step)) for layer in range(layers)]
    need = max(n * b for n, b in zip(largest, sizes, strict=True))
    memory = (need * layers if scope == "layer" else need) + spare
    checked = plan(trace, policy, scope, memory=memory)
    assert checked.memory_bytes == memory
    if scope == "layer":
        assert checked.layer_capacities == tuple(memory // layers // b for b in sizes)
        caps = set(checked.layer_capacities)
        assert checked.capacity == (caps.pop() if len(caps) == 1 else None)
    else:
        divisor = 2 if layers > 1 else sizes[0]
        assert checked.units == tuple(b // divisor for b in sizes) and checked.pool == memory // divisor
        assert checked.capacity == (memory // sizes[0] if layers == 1 else None)
    result = mc.replay(trace, policy, scope=scope, memory=memory)
    expected = reference_replay(experts, step, policy, None, scope, expert_bytes=sizes, memory=memory)
    np.testing.assert_array_equal(result.per_layer["hits"], expected["hits"])
    with pytest.raises(mc.MoecacheError, match="whose largest step set needs"):
        plan(trace, policy, scope, memory=memory - spare - 1)


def test_clipping_and_skipping(batched):
    smallest = plan_range(batched, "lru").smallest
    assert smallest > 2
    assert plan_range(batched, "lru", capacities=f"{smallest}:1000000000").capacities == tuple(
        range(smallest, 17))
    assert plan_range(batched, "lru", "global", capacities="40:1000000000:4").capacities == (40, 44, 48)
    listed = plan_range(batched, "lru", capacities=[99, smallest, smallest, 16])
    assert listed.capacities == (smallest, 16, 99)  # a listed capacity past E is kept
    assert listed.rows.tolist() == [smallest, 16, 16]  # and reads E's row
    assert mc.curve(batched, "lru", capacities=[99]).iloc[0]["hits"] == mc.replay(batched, "lru", 99).hits
    skipped = plan_range(batched, "lru", capacities=[1, smallest, 16, 17], skip_invalid=True)
    assert skipped.capacities == (smallest, 16)
    assert plan_range(batched, "lru", capacities=[1, 2], skip_invalid=True).capacities == ()


@pytest.mark.parametrize("kwargs, message", [
    ({"policy": "nosuch", "capacity": 8}, "unknown policy 'nosuch': choose one of lru"),
    ({"scope": "pool", "capacity": 8}, "unknown scope 'pool': choose layer or global"),
    ({}, "give exactly one of capacity (experts) or memory (bytes)"),
    ({"capacity": 8, "memory": "1GiB"}, "give exactly one of capacity (experts) or memory (bytes)"),
    ({"capacity": 0}, "capacity must be positive and below 2**63, got 0"),
    ({"capacity": 2**63}, f"capacity must be positive and below 2**63, got {2**63}"),
    ({"capacity": 8.5}, "capacity must be a whole number of experts, got 8.5"),
    ({"capacity": True}, "capacity must be a whole number of experts, got True"),
    ({"memory": "0"}, "memory '0' must be at least 1 byte"),
    ({"memory": "1MiB"}, "<memory>: memory 1.00 MiB split over 3 layers (341.33 KiB each) holds no expert "
                         "of layer 0 (16.50 MiB each), whose largest step set needs 7; use a memory budget "
                         ">= 346.50 MiB or per-token steps (--per-token)"),
    ({"capacity": 8, "seed": -1}, "seed must be a whole number from 0 to 2**63 - 1, got -1"),
    ({"capacity": 8, "bandwidth": "fast"}, "cannot read bandwidth 'fast'"),
    ({"capacity": 8, "latency": -1}, "duration -1 must not be negative"),
    ({"capacity": 4}, "<memory>: capacity 4 is below the largest step set (7 experts in layer 0 at step "
                      "0); use a capacity >= 7 or per-token steps (--per-token)"),
])
def test_each_error_is_one_line(batched, kwargs, message):
    with pytest.raises(mc.MoecacheError) as caught:
        plan(batched, **kwargs)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_errors_of_traces_and_ranges(batched):
    plain = mc.Trace.from_arrays(np.zeros((3, 1, 1), np.int16), num_experts=2)
    with pytest.raises(mc.MoecacheError, match="memory budgets need expert_bytes in the trace metadata"):
        plan(plain, memory="1GiB")
    empty = mc.Trace.from_arrays(np.zeros((0, 1, 1), np.int16), num_experts=2)
    with pytest.raises(mc.MoecacheError, match="the trace holds no tokens: nothing to replay"):
        plan_range(empty)
    with pytest.raises(mc.MoecacheError, match="expected a moecache.Trace .* got str"):
        plan("trace.parquet", capacity=4)
    for capacities, message in [([], "capacities name no value"), ("", "names no value"),
                                ("x", "cannot read capacities 'x'"), ([0, 16], "capacity must be positive"),
                                ("3:16", "capacity 3 is below the largest step set")]:
        with pytest.raises(mc.MoecacheError, match=message):
            plan_range(batched, capacities=capacities)


def test_every_driver_takes_the_same_range_and_gives_the_same_error(tmp_path, batched):
    path = batched.save(tmp_path / "t.parquet")
    loaded = mc.Trace.load(path)
    table = sweep([path], ("lru", "fifo"), ("layer", "global"), out=None, progress=False)
    for scope in ("layer", "global"):
        expected = list(plan_range(loaded, "lru", scope).capacities)
        assert mc.curve(loaded, "fifo", scope)["capacity"].tolist() == expected
        for policy in ("lru", "fifo"):
            rows = table[(table.policy == policy) & (table.scope == scope)]
            assert rows["capacity"].tolist() == expected
    below = plan_range(loaded).smallest - 1
    errors = set()
    for call in (lambda: mc.replay(loaded, "lru", below),
                 lambda: mc.curve(loaded, "opt", capacities=[below]),
                 lambda: compare(loaded, loaded, capacities=[below, 16], policies=["lru"]),
                 lambda: compare(loaded, loaded, capacities=f"{below}:16", policies=["opt"])):
        with pytest.raises(mc.MoecacheError) as caught:
            call()
        errors.add(str(caught.value))
    assert len(errors) == 1 and f"{path}: capacity {below} is below the largest step set" in errors.pop()
    # a sweep over traces of several sizes skips what a trace cannot take instead
    skipped = sweep([path], ("lru",), ("layer",), [below, 16, 17], out=None, progress=False)
    assert skipped["capacity"].tolist() == [16]


def test_compare_io_time_is_the_replays_with_latency(batched):
    other = mc.synth(layers=3, experts=16, top_k=2, tokens=120, sequences=2, prompt_len=6, seed=4)
    frame = compare(batched, other, capacities=[12, 16], policies=["lru"], bandwidths=["2GB/s"],
                    latency="1ms", compute_ms=5.0)
    io = frame[frame.metric == "I/O ms per token"].set_index("capacity")
    for capacity in (12, 16):
        for trace, column in ((batched, "synthetic (base)"), (other, "synthetic (remoe)")):
            single = mc.replay(trace, "lru", capacity, bandwidth="2GB/s", latency="1ms")
            assert io.loc[capacity, column] == pytest.approx(1e3 * single.io_seconds_per_token, rel=1e-12)
            assert single.latency == 1e-3 and single.misses > 0
