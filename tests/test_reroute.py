"""Offline rerouting against a slow reference, and its effect on reuse."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import moecache as mc
from moecache.reroute import reroute


def slow_reroute(trace, mode, bias, window, capacity):
    """Straight from the module docstring: Python loops, sets and sorted()."""
    logits = trace.logits.astype(np.float64)
    n, num_layers, num_experts = logits.shape
    out = np.zeros(trace.experts.shape, np.int64)
    used_at = [dict() for _ in range(num_layers)]  # expert -> last step (new routing)
    cache = [dict() for _ in range(num_layers)]  # resident expert -> last step
    starts = trace.step_starts()
    for t in range(len(starts) - 1):
        for token in range(starts[t], starts[t + 1]):
            for layer in range(num_layers):
                favoured = (set(cache[layer]) if mode == "cache" else
                            {e for e, s in used_at[layer].items() if s >= t - window})
                scores = [logits[token, layer, e] + (bias if e in favoured else 0.0)
                          for e in range(num_experts)]
                ranked = sorted(range(num_experts), key=lambda e: (-scores[e], e))
                out[token, layer] = ranked[:trace.top_k]
        for layer in range(num_layers):
            step_set = {int(e) for token in range(starts[t], starts[t + 1]) for e in out[token, layer]}
            for e in step_set:
                used_at[layer][e] = t
                cache[layer][e] = t
            while len(cache[layer]) > (capacity or 10**9):
                victim = min((e for e in cache[layer] if e not in step_set),
                             key=lambda e: (cache[layer][e], e))
                del cache[layer][victim]
    return out


@given(seed=st.integers(0, 10**6), mode=st.sampled_from(["recent", "cache"]),
       bias=st.floats(0, 3), window=st.integers(1, 3), extra=st.integers(0, 3),
       prompt=st.integers(0, 3))
def test_matches_slow_reference(seed, mode, bias, window, extra, prompt):
    trace = mc.synth(layers=2, experts=8, top_k=2, tokens=30, sequences=2, prompt_len=prompt,
                     seed=seed, logits=True)
    capacity = 2 * max(prompt, 1) + extra if mode == "cache" else None
    new, _ = reroute(trace, mode=mode, bias=bias, window=window, capacity=capacity)
    np.testing.assert_array_equal(new.experts, slow_reroute(trace, mode, bias, window, capacity))


def test_zero_bias_keeps_routing_and_more_bias_raises_reuse():
    trace = mc.synth(layers=4, experts=32, top_k=4, tokens=800, stickiness=0.2, seed=3, logits=True)
    same, fid = reroute(trace, bias=0.0)
    # the same sets (rank order may differ where float16 scores tie)
    np.testing.assert_array_equal(np.sort(same.experts, axis=2), np.sort(trace.experts, axis=2))
    assert fid.overlap == 1.0 and fid.gate_mass == pytest.approx(1.0)
    reuse = [mc.replay(reroute(trace, bias=b)[0], "lru", 8).reuse_rate for b in (0.0, 0.5, 1.5)]
    assert reuse[0] < reuse[1] < reuse[2]
    strong, fid = reroute(trace, bias=1.5, label="remoe-emulated")
    assert fid.overlap < 1 and fid.gate_mass < 1
    assert strong.meta["router"] == "remoe-emulated" and strong.meta["reroute"]["bias"] == 1.5
    np.testing.assert_allclose(strong.weights.sum(axis=2), trace.weights.sum(axis=2), rtol=1e-5)


def test_cache_aware_routing_raises_hit_rate():
    trace = mc.synth(layers=2, experts=32, top_k=4, tokens=800, stickiness=0.2, seed=4, logits=True)
    aware, _ = reroute(trace, mode="cache", bias=1.0, capacity=8)
    assert mc.replay(aware, "lru", 8).hit_rate > mc.replay(trace, "lru", 8).hit_rate


def test_errors():
    plain = mc.synth(layers=1, experts=8, top_k=2, tokens=10)
    with pytest.raises(mc.MoecacheError, match="no router scores"):
        reroute(plain)
    scored = mc.synth(layers=1, experts=8, top_k=2, tokens=10, logits=True)
    with pytest.raises(mc.MoecacheError, match="capacity >= K"):
        reroute(scored, mode="cache", capacity=1)
    with pytest.raises(mc.MoecacheError, match="unknown reroute mode"):
        reroute(scored, mode="sticky")
    with pytest.raises(mc.MoecacheError, match="a capacity only applies to cache-aware rerouting"):
        reroute(scored, mode="recent", capacity=4)
    for bias in (float("nan"), float("inf")):
        with pytest.raises(mc.MoecacheError, match="bias must be a finite number"):
            reroute(scored, bias=bias)
    with pytest.raises(mc.MoecacheError, match="window must be from 1 to 2"):
        reroute(scored, window=2**63)


def test_huge_window_never_favours_unused_experts():
    trace = mc.synth(layers=2, experts=16, top_k=2, tokens=40, seed=3, logits=True)
    for window in (2**40, 2**63 - 1):
        new, _ = reroute(trace, bias=100.0, window=window)
        # step 0 has no history: the original top-K; later steps keep the experts used before
        np.testing.assert_array_equal(new.experts[0], trace.experts[0])
        np.testing.assert_array_equal(new.experts, reroute(trace, bias=100.0, window=40)[0].experts)
