"""Layers in parallel give the numbers of layers one after another."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import moecache as mc
from moecache.parallel import map_layers
from moecache.policies import REGISTRY
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


def test_map_layers_order_and_errors():
    assert map_layers(lambda i: i * i, 7, 3) == [0, 1, 4, 9, 16, 25, 36]
    assert map_layers(lambda i: i, 0, 3) == []

    def fail(i):
        if i == 2:
            raise mc.MoecacheError("layer 2 is bad")
        return i

    with pytest.raises(mc.MoecacheError, match="layer 2 is bad"):
        map_layers(fail, 5, 2)
    assert np.array_equal(map_layers(np.arange, 3, 1)[2], np.arange(2))
