"""The fast kernels of clock, sieve and slru give exactly the hits of their hooks run by the
driver, on random unit-size request streams larger than the policy contract tests use:
up to 130 keys (past the 64 of a mask), 1000 requests of 1..8 distinct ascending keys,
skewed and sticky so that both hits and misses are common, capacities from the largest
request up to the number of keys, random valid parameters."""

import numpy as np
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from moecache.policies import REGISTRY, resolve

from .strategies import unit_streams


@st.composite
def streams(draw):
    """(keys, offsets, num_keys, capacity, seed) of a random unit-size request stream."""
    num_keys = draw(st.sampled_from([1, 2, 8, 16, 63, 64, 65, 130]))
    top_k = draw(st.integers(1, min(8, num_keys)))
    num_requests = draw(st.integers(1, 1000))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    weights = rng.permutation(1.0 / np.arange(1, num_keys + 1) ** draw(st.floats(0.0, 2.0)))
    stickiness = draw(st.floats(0.0, 0.9))
    sets, previous = [], []
    for _ in range(num_requests):
        k = int(rng.integers(1, top_k + 1))
        kept = [key for key in previous if rng.random() < stickiness][:k]
        fresh = rng.choice(num_keys, size=k, replace=False, p=weights / weights.sum())
        chosen = list(dict.fromkeys(kept + [int(key) for key in fresh]))[:k]
        sets.append(sorted(chosen))
        previous = chosen
    keys = np.array([key for s in sets for key in s], np.int32)
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in sets])]).astype(np.int64)
    capacity = draw(st.integers(max(len(s) for s in sets), num_keys))
    return keys, offsets, num_keys, capacity, draw(st.integers(0, 99))


@st.composite
def choices(draw, name):
    """``name`` with random valid values of its parameters, the default half of the time."""
    args = {p.name: draw(st.just(p.default) | (st.integers(int(p.low), int(p.high)) if p.integer
                                               else st.floats(p.low, p.high)))
            for p in REGISTRY[name].params}
    return resolve(name, args)


def assert_kernel_equals_driver(choice, stream):
    keys, offsets, num_keys, capacity, seed = stream
    sizes = np.ones(num_keys, np.int64)
    assert choice.policy.kernel is not None
    kernel, _, _ = choice.run(keys, offsets, sizes, capacity, seed)
    driven, _, _ = choice.run(keys, offsets, sizes, capacity, seed, record=True)
    np.testing.assert_array_equal(kernel, driven)


@settings(max_examples=200)
@given(data=st.data(), stream=streams())
def test_clock_kernel_equals_driver(data, stream):
    assert_kernel_equals_driver(data.draw(choices("clock")), stream)


@settings(max_examples=200)
@given(data=st.data(), stream=streams())
def test_sieve_kernel_equals_driver(data, stream):
    assert_kernel_equals_driver(data.draw(choices("sieve")), stream)


@settings(max_examples=200)
@given(data=st.data(), stream=streams())
def test_slru_kernel_equals_driver(data, stream):
    assert_kernel_equals_driver(data.draw(choices("slru")), stream)


@settings(max_examples=100)
@given(segments=st.integers(1, 4), stream=unit_streams(key_counts=(40, 64)), seed=st.integers(0, 99))
def test_slru_slots_kernel_equals_driver(segments, stream, seed):
    """More than 8 keys in segment 0 once steady: the slots kernel, not the packed one."""
    capacity = stream[3]
    assume(capacity - (segments - 1 if capacity >= segments else 0) * (capacity // segments) > 8)
    assert_kernel_equals_driver(resolve("slru", {"segments": segments}), (*stream, seed))
