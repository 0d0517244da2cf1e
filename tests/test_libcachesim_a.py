"""lru-k, slru, 2q and lfuda against libCacheSim (issue 13, point 2): on one expert per
step (K = 1) a step is a single request, and the hit counts equal libCacheSim's with the
same parameters, or a pinned minimal trace shows where and why they differ. The helpers
are test_libcachesim_b's."""

from __future__ import annotations

import pytest

pytest.importorskip("libcachesim")
native = pytest.importorskip("libcachesim.libcachesim_python")

from .test_libcachesim_b import assert_same_hits, lcs_hits, mc_hits, random_traces  # noqa: E402


@pytest.mark.parametrize("k", [1, 2, 3])
def test_lru_k_equals_libcachesim(k):
    assert_same_hits("lru-k", native.LRU_K_init, random_traces(30 + k), {"k": k}, f"k={k}")


@pytest.mark.parametrize("segments", [1, 2, 3, 4])
def test_slru_equals_libcachesim_when_the_segments_divide_the_capacity(segments):
    traces = [(ids, max(capacity - capacity % segments, segments))
              for ids, capacity in random_traces(40 + segments)]
    assert_same_hits("slru", native.SLRU_init, traces, {"segments": segments}, f"n-seg={segments}")


def test_slru_differs_from_libcachesim_when_segment_0_overflows():
    """Capacity 3, 2 segments of 1: 0 and 2 share segment 0; the hit on 0 moves 1 down,
    and libCacheSim evicts 2 on that hit (docstring of policies/slru.py)."""
    assert mc_hits([0, 1, 2, 0, 2], "slru", 3, segments=2) == [False, False, False, True, True]
    assert lcs_hits([0, 1, 2, 0, 2], native.SLRU_init, 3, "n-seg=2") == [False, False, False, True, False]


@pytest.mark.parametrize("ratios", [(0.25, 0.5), (0.5, 1.0), (0.1, 0.0), (0.4, 2.0)])
def test_2q_equals_libcachesim_when_a1in_holds_an_expert(ratios):
    a_in, a_out = ratios
    traces = [(ids, capacity) for ids, capacity in random_traces(50, experts=(5, 40), smallest=4)
              if int(capacity * a_in) >= 1]
    assert_same_hits("2q", native.TwoQ_init, traces, {"in": a_in, "out": a_out},
                     f"Ain-size-ratio={a_in},Aout-size-ratio={a_out}")


def test_2q_differs_from_libcachesim_when_a1in_holds_none():
    """Capacity 3: A1in's share is int(0.75) = 0, and libCacheSim's TwoQ caches nothing."""
    assert mc_hits([0, 0], "2q", 3) == [False, True]
    assert lcs_hits([0, 0], native.TwoQ_init, 3) == [False, False]


def test_lfuda_differs_from_libcachesim_on_a_hit_before_the_first_eviction():
    """Capacity 2: libCacheSim adds its minimum key (0 so far) at the hit on 0, so 2 evicts
    0 instead of 1 (docstring of policies/lfuda.py)."""
    assert mc_hits([0, 0, 1, 2, 0], "lfuda", 2) == [False, True, False, False, True]
    assert lcs_hits([0, 0, 1, 2, 0], native.LFUDA_init, 2) == [False, True, False, False, False]
