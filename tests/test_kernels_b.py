"""The fast kernels of s3fifo, 2q and lfuda give exactly the hits of their hooks run by the
driver, on random unit-size request streams larger than the policy contract tests use:
up to 130 keys, 1000 requests of 1..8 distinct ascending keys, skewed and sticky so that
hits, misses and returns of forgotten keys are all common, capacities from the largest
request up to the number of keys, random valid parameters."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moecache.policies import REGISTRY, resolve

from .strategies import unit_streams


def streams():
    """(keys, offsets, num_keys, capacity) of a random unit-size request stream."""
    return unit_streams(key_counts=(1, 3, 8, 16, 40, 64, 65, 130), beyond=0)


@st.composite
def choices(draw, name):
    """``name`` with random valid values of its parameters, each the default half of the time."""
    args = {p.name: draw(st.just(p.default) | (st.integers(int(p.low), int(p.high)) if p.integer
                                               else st.floats(p.low, p.high)))
            for p in REGISTRY[name].params}
    return resolve(name, args)


@pytest.mark.parametrize("name", ["s3fifo", "2q", "lfuda"])
@settings(max_examples=200, deadline=None)
@given(data=st.data(), stream=streams())
def test_kernel_equals_driver(name, data, stream):
    choice = data.draw(choices(name))
    keys, offsets, num_keys, capacity = stream
    sizes = np.ones(num_keys, np.int64)
    assert choice.policy.kernel is not None and choice.policy.unit_kernel
    kernel, _, _ = choice.run(keys, offsets, sizes, capacity, 0)
    driven, _, _ = choice.run(keys, offsets, sizes, capacity, 0, record=True)
    np.testing.assert_array_equal(kernel, driven)

