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


def random_traces(seed: int, count: int = 40, experts: tuple[int, int] = (3, 25), smallest: int = 1,
                  length: int = 300) -> list[tuple[list[int], int]]:
    """(ids, capacity): skewed ids over E in ``experts``, capacities from ``smallest`` to E - 1."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        num = int(rng.integers(*experts))
        weights = rng.random(num) ** 3
        ids = rng.choice(num, size=length, p=weights / weights.sum())
        out.append(([int(i) for i in ids], int(rng.integers(smallest, num))))
    return out


def assert_same_hits(policy: str, init: Callable, traces: list, args: dict | None = None,
                     params: str = "") -> None:
    for ids, capacity in traces:
        assert mc_hits(ids, policy, capacity, **(args or {})) == lcs_hits(ids, init, capacity, params), \
            (ids, capacity)


def test_sieve_equals_libcachesim():
    assert_same_hits("sieve", native.Sieve_init, random_traces(13))


def test_s3fifo_equals_libcachesim_from_two_experts_in_the_small_queue():
    """Defaults from C = 20 (small queue 2); other shares and thresholds where it holds 2 or more."""
    assert_same_hits("s3fifo", native.S3FIFO_init, random_traces(14, experts=(21, 80), smallest=20))
    for small, ghost, threshold in ((0.25, 0.5, 1), (0.3, 0.0, 3), (0.2, 2.0, 2)):
        traces = random_traces(15, count=10, experts=(11, 40), smallest=10)
        assert_same_hits("s3fifo", native.S3FIFO_init, traces,
                         {"small": small, "ghost": ghost, "threshold": threshold},
                         f"small-size-ratio={small},ghost-size-ratio={ghost},move-to-main-threshold={threshold}")


def test_s3fifo_differs_from_libcachesim_below_two_experts_in_the_small_queue():
    """At C = 10 the small queue holds one expert: libCacheSim caches no new object whose
    size is at least the small queue's, so it never hits; moecache caches it."""
    assert mc_hits([0, 0], "s3fifo", 10) == [False, True]
    assert lcs_hits([0, 0], native.S3FIFO_init, 10) == [False, False]


def test_arc_equals_libcachesim():
    assert_same_hits("arc", native.ARC_init, random_traces(16, count=60, experts=(3, 60)))


def test_lirs_differs_from_libcachesim_on_a_hit_in_q_outside_s():
    """C = 2 (one LIR, one HIR expert). The second 1 hits a resident HIR expert not in S:
    libCacheSim (hit_RD_HIRinQ) demotes LIR 0 to Q, evicting Q's front, 1 itself, yet keeps 1
    in S as resident without occupying capacity; 2 then becomes LIR in the free room and the
    last 1 hits a phantom. Here 1 goes on top of S and to Q's end, 2 evicts it (a resident HIR
    on a full LIR set) and the last 1 misses."""
    ids = [0, 1, 0, 1, 2, 1]
    assert mc_hits(ids, "lirs", 2) == [False, False, True, True, False, False]
    assert lcs_hits(ids, native.LIRS_init, 2) == [False, False, True, True, False, True]
