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


def test_lirs_masks_kernel_equals_lists_kernel_on_long_streams():
    """Up to 64 keys lirs runs its masks kernel; on streams long enough that S's groups are
    squeezed many times it gives the hits of its lists kernel (equal to the driver above)."""
    import moecache as mc
    from moecache.policies import lirs

    for experts, top_k in ((64, 8), (40, 4), (9, 2)):
        trace = mc.synth(layers=1, experts=experts, top_k=top_k, tokens=20_000, seed=experts)
        keys, offsets = mc.Requests.from_trace(trace).layer(0)
        for capacity in (top_k, top_k + 1, experts // 2, experts - 1, experts):
            for hirs in (0.01, 0.3, 1.0):
                lir_limit = capacity - max(1, int(capacity * hirs))
                masks = lirs.simulate_masks(keys, offsets, capacity, lir_limit)
                lists = lirs.simulate_lists(keys, offsets, experts, capacity, lir_limit)
                np.testing.assert_array_equal(masks, lists)


@settings(max_examples=200)
@given(data=st.data(), stream=streams())
def test_lru_k_kernel_equals_driver(data, stream):
    assert_kernel_equals_driver("lru-k", data, stream)
