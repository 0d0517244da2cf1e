"""score-lru (BigRig's gaterank) beyond the policy contract: a hand-worked example, its
need for router weights, and Python policies that read the weights."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import moecache as mc
from moecache.policies import resolve
from moecache.ranking import rank

from .strategies import unit_streams
from .test_cli import run


def three_steps(weights=True):
    """E = 4, K = 2, one layer: steps {0, 1}, {2, 3}, {0, 2}, the first expert of each
    step ranked first (weight 0.9 against 0.1)."""
    experts = np.array([[[0, 1]], [[2, 3]], [[0, 2]]], np.int16)
    scores = np.tile(np.array([0.9, 0.1], np.float32), (3, 1, 1))
    return mc.Trace.from_arrays(experts, num_experts=4, weights=scores if weights else None)


def test_hand_worked_example():
    """Ticks 1, 2 for step 0 (0 ranked first, then 1): keys 0 -> 1 + 16 x 1 = 17,
    1 -> 2 + 16 x 0 = 2. Step 1 admits 2, then 3 evicts the lowest key, 1 (LRU evicts 0:
    0 and 1 tie on recency, the smaller id goes). Step 2 {0, 2}: both hit (LRU: one)."""
    trace = three_steps()
    events = mc.replay(trace, "score-lru", 3, record_events=True).events
    assert events["hits"].tolist() == [0, 0, 2]
    assert mc.replay(trace, "lru", 3).hits == 1
    # boost 0: keys 1 and 2, so 0 goes first, as in LRU
    assert mc.replay(trace, "score-lru:boost=0", 3).hits == 1


def test_a_trace_without_weights_is_refused():
    with pytest.raises(mc.MoecacheError, match="score-lru needs router weights"):
        mc.replay(three_steps(weights=False), "score-lru", 3)


def test_cli_refuses_a_trace_without_weights_in_one_line(tmp_path):
    path = tmp_path / "t.parquet"
    three_steps(weights=False).save(path)
    code, _, err = run("replay", path, "--policy", "score-lru", "--capacity", 3)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "needs router weights" in err and str(path) in err


def test_python_policy_reads_the_weights():
    """A plain-Python policy with ``needs_scores`` sees the weight of every request entry:
    evicting the resident whose last use had the lowest weight."""

    class LowestWeight(mc.PythonPolicy):
        needs_scores = True

        def reset(self, keys, offsets, sizes, capacity, params, seed):
            self.weight, self.cursor = {}, 0

        def access(self, key, now, hit):
            self.weight[key] = float(self.scores[self.cursor])
            self.cursor += 1

        def victim(self, resident, pinned, mark):
            return min((k for k in np.flatnonzero(resident) if pinned[k] != mark),
                       key=lambda k: (self.weight.get(k, 0.0), k))

    trace = three_steps()
    # step 1 evicts 1 (weight 0.1), so step 2 hits 0 and 2
    assert mc.replay(trace, LowestWeight, 3).hits == 2
    with pytest.raises(mc.MoecacheError, match="needs router weights"):
        mc.replay(three_steps(weights=False), LowestWeight, 3)


def test_rank_leaves_score_lru_out_only_when_a_trace_has_no_weights():
    trace = mc.synth(layers=1, experts=8, top_k=2, tokens=60, seed=3)
    seq = np.repeat(np.arange(4), 15)
    plain = mc.Trace.from_arrays(trace.experts, num_experts=8, seq=seq)
    weighted = mc.Trace.from_arrays(trace.experts, num_experts=8, seq=seq,
                                    weights=np.full(trace.experts.shape, 0.5, np.float32))
    assert "score-lru" not in set(rank([plain], None, [4])[0]["policy"])
    assert "score-lru" in set(rank([weighted], None, [4])[0]["policy"])
    with pytest.raises(mc.MoecacheError, match="needs router weights"):
        rank([plain], ["score-lru"], [4])


@settings(max_examples=60, deadline=None)
@given(stream=unit_streams(beyond=3), weights=st.integers(1, 4), nan=st.booleans(),
       boost=st.sampled_from([0.0, 3.0, 16.0, 1e6]), monotone=st.integers(0, 1))
def test_kernel_equals_the_hooks(stream, weights, nan, boost, monotone):
    """The unit-size kernel (its masks variant up to 64 keys, its scan variant beyond) and
    the hooks through the driver, hit for hit, with few distinct weights (so ranks tie)
    and, with ``nan``, some weights missing."""
    keys, offsets, num_keys, capacity = stream
    rng = np.random.default_rng(keys.shape[0])
    scores = (rng.integers(0, weights, keys.shape[0]) / 4).astype(np.float32)
    if nan:
        scores[rng.random(keys.shape[0]) < 0.2] = np.nan
    choice = resolve("score-lru", {"boost": boost, "monotone": monotone})
    sizes = np.ones(num_keys, np.int64)
    kernel = choice.run(keys, offsets, sizes, capacity, 0, scores=scores)[0]
    driven = choice.run(keys, offsets, sizes, capacity, 0, record=True, scores=scores)[0]
    np.testing.assert_array_equal(kernel, driven)


@pytest.mark.parametrize("num_keys", [64, 130])
def test_kernel_equals_the_hooks_on_wide_requests(num_keys):
    """Requests of up to 40 keys: ranks over several blocks of 8."""
    rng = np.random.default_rng(num_keys)
    sets = [np.sort(rng.choice(num_keys, rng.integers(1, 41), replace=False)) for _ in range(300)]
    keys = np.concatenate(sets).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in sets])]).astype(np.int64)
    scores = (rng.integers(0, 6, keys.shape[0]) / 4).astype(np.float32)
    choice = resolve("score-lru")
    sizes = np.ones(num_keys, np.int64)
    for capacity in (40, 50, num_keys):
        kernel = choice.run(keys, offsets, sizes, capacity, 0, scores=scores)[0]
        driven = choice.run(keys, offsets, sizes, capacity, 0, record=True, scores=scores)[0]
        np.testing.assert_array_equal(kernel, driven)


@settings(max_examples=60, deadline=None)
@given(weights=st.lists(st.sampled_from([0.0, 0.25, 0.5, 1.0, float("nan")]), min_size=8, max_size=20),
       lo=st.integers(0, 12))
def test_request_ranks_of_8_in_registers(weights, lo):
    """A request of 8 is ranked in registers (``ranks_of_8``): the ranks of a stable sort by
    descending weight, NaN last, as for any other width."""
    from moecache.policies import score_lru

    scores = np.array(weights, np.float32)
    lo = min(lo, scores.shape[0] - 8)
    rank = np.full(8, -1, np.int32)
    score_lru.request_ranks(scores, lo, 8, np.empty(8, np.float32), rank)
    keyed = np.where(np.isnan(scores[lo:lo + 8]), -np.inf, scores[lo:lo + 8])
    expected = np.empty(8, np.int32)
    expected[np.argsort(-keyed, kind="stable")] = np.arange(8)
    np.testing.assert_array_equal(rank, expected)
