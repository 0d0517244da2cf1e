"""The fast kernels of arc, lirs and lru-k give exactly the hits of their hooks run by the
driver, on random unit-size request streams larger than the policy contract tests use: up
to 130 keys, up to 1000 requests of 1..8 distinct ascending keys, skewed and sticky so that
hits, misses and ghost hits are all common, capacities from the largest request up to the
number of keys and a few more, random valid parameters."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from moecache.policies import REGISTRY, resolve

from .strategies import unit_streams


def streams():
    """(keys, offsets, num_keys, capacity) of a random unit-size request stream."""
    return unit_streams(key_counts=(1, 2, 5, 16, 64, 130), beyond=4)


def assert_kernel_equals_driver(name, data, stream):
    args = {p.name: data.draw(st.integers(int(p.low), int(p.high)) if p.integer else st.floats(p.low, p.high))
            for p in REGISTRY[name].params}
    choice = resolve(name, args)
    keys, offsets, num_keys, capacity = stream
    sizes = np.ones(num_keys, np.int64)
    assert choice.policy.kernel is not None
    kernel, _, _ = choice.run(keys, offsets, sizes, capacity, 0)
    driven, _, _ = choice.run(keys, offsets, sizes, capacity, 0, record=True)
    np.testing.assert_array_equal(kernel, driven)


@settings(max_examples=200)
@given(data=st.data(), stream=streams())
def test_arc_kernel_equals_driver(data, stream):
    assert_kernel_equals_driver("arc", data, stream)


@settings(max_examples=200)
@given(data=st.data(), stream=streams())
def test_lirs_kernel_equals_driver(data, stream):
    assert_kernel_equals_driver("lirs", data, stream)


@settings(max_examples=200)
@given(data=st.data(), stream=streams())
def test_lru_k_kernel_equals_driver(data, stream):
    assert_kernel_equals_driver("lru-k", data, stream)
