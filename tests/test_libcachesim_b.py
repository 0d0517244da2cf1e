"""sieve, s3fifo, arc and lirs against libCacheSim (issue 13, point 2): on one expert per
step (K = 1) a step is a single request, and the hit counts equal libCacheSim's with the
same parameters, or a pinned minimal trace shows where and why they differ."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

import moecache as mc

lcs = pytest.importorskip("libcachesim")
native = pytest.importorskip("libcachesim.libcachesim_python")
common_params = pytest.importorskip("libcachesim.cache")._create_common_params


def mc_hits(ids: list[int], policy: str, capacity: int, **args: float) -> list[bool]:
    """moecache's hit per request of a one-layer, one-expert-per-step trace."""
    experts = np.asarray(ids, np.int16).reshape(-1, 1, 1)
    trace = mc.Trace.from_arrays(experts, num_experts=max(ids) + 1, step=np.arange(len(ids)))
    result = mc.replay(trace, policy, capacity, record_events=True, policy_args=args)
    return [bool(h) for h in result.events["hits"]]


def lcs_hits(ids: list[int], init: Callable, capacity: int, params: str = "") -> list[bool]:
    """libCacheSim's hit per request (object ids from 1, size 1)."""
    cache = init(common_params(capacity, hashpower=10), params)
    return [bool(cache.get(lcs.Request(obj_id=i + 1, obj_size=1))) for i in ids]


def random_traces(count: int = 40, length: int = 300) -> list[tuple[list[int], int]]:
    """(ids, capacity): skewed, drifting ids over 3 to 24 experts, capacities 1 to E - 1."""
    rng = np.random.default_rng(13)
    out = []
    for _ in range(count):
        experts = int(rng.integers(3, 25))
        weights = rng.random(experts) ** 3
        ids = rng.choice(experts, size=length, p=weights / weights.sum())
        out.append(([int(i) for i in ids], int(rng.integers(1, experts))))
    return out


TRACES = random_traces()


def assert_same_hits(policy: str, init: Callable, args: dict | None = None, params: str = "") -> None:
    for ids, capacity in TRACES:
        assert mc_hits(ids, policy, capacity, **(args or {})) == lcs_hits(ids, init, capacity, params), \
            (ids, capacity)


def test_sieve_equals_libcachesim():
    assert_same_hits("sieve", native.Sieve_init)
