"""Layers in parallel give the numbers of layers one after another."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import moecache as mc
from moecache.parallel import map_parallel, read_ahead
from moecache.policies import REGISTRY
from moecache.requests import NEVER, TOTALS, global_keys, largest_at, routing_counts, step_unions
from tests.strategies import make_trace, routings


def test_every_kernel_releases_the_gil():
    for name, policy in REGISTRY.items():
        if policy.kernel is not None:
            assert policy.kernel.targetoptions.get("nogil"), name


@settings(max_examples=25, deadline=None)
@given(routings(max_layers=4, max_experts=12, max_tokens=40),
       st.sampled_from(["lru", "clock", "random", "opt"]), st.integers(2, 4))
def test_threads_equal_one_thread(routing, policy, workers):
    trace = make_trace(*routing)
    capacity = int(mc.Requests.from_trace(trace).layer_totals["largest"].max())
    one = mc.replay(trace, policy, capacity, workers=1, record_events=True)
    many = mc.replay(trace, policy, capacity, workers=workers, record_events=True)
    assert one.hits == many.hits
    assert one.per_layer.equals(many.per_layer) and one.events.equals(many.events)
    curve_one = mc.curve(trace, policy, workers=1)
    curve_many = mc.curve(trace, policy, workers=workers)
    assert curve_one.equals(curve_many)


def test_map_parallel_order_and_errors():
    assert map_parallel(lambda i: i * i, 7, 3) == [0, 1, 4, 9, 16, 25, 36]
    assert map_parallel(lambda i: i, 0, 3) == []

    def fail(i):
        if i == 2:
            raise mc.MoecacheError("layer 2 is bad")
        return i

    with pytest.raises(mc.MoecacheError, match="layer 2 is bad"):
        map_parallel(fail, 5, 2)
    assert np.array_equal(map_parallel(np.arange, 3, 1)[2], np.arange(2))


def test_read_ahead_keeps_order_and_none_items():
    assert list(read_ahead(iter([1, None, 2]))) == [1, None, 2]
    assert list(read_ahead(iter([]))) == []


@settings(max_examples=40, deadline=None)
@given(routings(max_layers=4, max_experts=130, max_tokens=40), st.integers(1, 5))
def test_request_passes_in_parts_equal_a_slow_reference(routing, workers):
    """Step sets, global keys and routing counts built in 1..5 parts (cut across one- and
    many-token steps) equal sets and counts computed one (step, layer) at a time."""
    trace = make_trace(*routing)
    starts, num_layers = trace.step_starts(), trace.num_layers
    sets = [sorted({int(e) for token in range(starts[t], starts[t + 1]) for e in trace.experts[token, layer]})
            for t in range(len(starts) - 1) for layer in range(num_layers)]
    ids, offsets = step_unions(trace.experts, starts, trace.num_experts, workers)
    assert [ids[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:], strict=True)] == sets
    assert ids.dtype == np.int16 and offsets[0] == 0 and offsets[-1] == len(ids)
    keys = global_keys(ids, offsets, num_layers, trace.num_experts, workers)
    assert keys.tolist() == [r % num_layers * trace.num_experts + e for r, s in enumerate(sets) for e in s]
    last = np.full(num_layers * trace.num_experts, NEVER, np.int64)
    totals, largest_step = routing_counts(ids, offsets, num_layers, trace.num_experts, last, 0, workers)
    want = np.zeros((len(TOTALS), num_layers), np.int64)
    first_largest = np.zeros(num_layers, np.int64)
    seen: set[int] = set()
    for r, s in enumerate(sets):
        t, layer = divmod(r, num_layers)
        before = sets[r - num_layers] if r >= num_layers else []
        layer_keys = {layer * trace.num_experts + e for e in s}
        want[:4, layer] += [len(s), len(layer_keys - seen), len(set(s) & set(before)), len(s) if t else 0]
        if len(s) > want[4, layer]:
            want[4, layer], first_largest[layer] = len(s), t
        seen |= layer_keys
    assert totals.tolist() == want.tolist() and largest_step.tolist() == first_largest.tolist()
    sizes = np.diff(offsets).reshape(-1, num_layers)
    assert largest_at(totals, largest_step) == np.unravel_index(int(np.argmax(sizes)), sizes.shape)
