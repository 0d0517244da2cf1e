"""The decode timeline (moecache/timeline.py, docs/semantics.md "Timeline"): exact against
closed forms where overlap is off or I/O free, monotone in the link, and the cache outcome
equal to replay's."""

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import moecache as mc
from moecache import prefetchers, profiles
from moecache.errors import MoecacheError
from moecache.policies.driver import HIT, MISS, PREFETCH_HIT
from moecache.timeline import timeline
from tests.strategies import routings

EXPERT_BYTES = 4096
FLOPS, MEMORY_BW = 1e12, 1e11


def machine(bandwidth=1e9, latency=1e-5, queue_depth=4, tiers=()):
    link = profiles.Link(bandwidth, latency, queue_depth)
    return profiles.Hardware("test-box", "a test machine", FLOPS, MEMORY_BW, 2**34, 1e11, 2e10, link,
                             tuple(tiers) or (profiles.Tier("store", 2**50, link),))


def trace_of(experts, step, num_experts, sequences=1):
    weights = np.random.default_rng(experts.size).integers(1, 5, experts.shape) / 4
    seq = np.arange(len(experts)) * sequences // len(experts)
    return mc.Trace.from_arrays(experts, num_experts=num_experts, step=step, seq=seq,
                                expert_bytes=EXPERT_BYTES, weights=weights.astype(np.float32),
                                meta={"dtype": "float32"})


def expert_seconds(tokens=1):
    """Compute time of one expert for ``tokens`` tokens on ``machine``."""
    return max(tokens * 2 * (EXPERT_BYTES / 4) / FLOPS, EXPERT_BYTES / MEMORY_BW)


def compute_seconds(trace, dense_ms):
    """Dense time plus every entry's expert time, from the trace's own step sets."""
    req = mc.Requests.from_trace(trace)
    counts = req.token_counts(trace)
    experts = np.maximum(counts * 2 * (EXPERT_BYTES / 4) / FLOPS, EXPERT_BYTES / MEMORY_BW).sum()
    return trace.num_tokens * dense_ms / 1e3 + experts


traces = routings(max_layers=3, max_experts=10, max_tokens=40).map(lambda r: trace_of(*r))


@st.composite
def setups(draw):
    trace = draw(traces)
    largest = int(mc.Requests.from_trace(trace).layer_totals["largest"].max())
    capacity = draw(st.integers(largest, max(largest, trace.num_experts)))
    return trace, capacity


# -- the cache outcome -------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(setups(), st.sampled_from(["layer", "global"]), st.sampled_from(["lru", "fifo", "lfu", "opt"]))
def test_outcomes_give_the_replay_hits(setup, scope, policy):
    trace, capacity = setup
    capacity *= trace.num_layers if scope == "global" else 1
    req = mc.Requests.from_trace(trace)
    batches = prefetchers.plan("oracle", prefetchers.Lookahead(req, None, 1, 2))
    r = mc.replay(trace, policy, capacity, scope, prefetch=batches, record_outcomes=True)
    per_request = np.add.reduceat(r.outcomes != MISS, req.offsets[:-1])
    assert per_request.sum() == r.hits
    assert int((r.outcomes == PREFETCH_HIT).sum()) == r.prefetch_used
    assert int((r.prefetch_outcomes == 1).sum()) == r.prefetched
    plain = mc.replay(trace, policy, capacity, scope, record_outcomes=True)
    assert set(np.unique(plain.outcomes)) <= {MISS, HIT}
    assert int((plain.outcomes == HIT).sum()) == mc.replay(trace, policy, capacity, scope).hits


@settings(max_examples=30, deadline=None)
@given(setups(), st.sampled_from(["layer", "global"]))
def test_hits_and_bytes_equal_replay_without_prefetch(setup, scope):
    trace, capacity = setup
    capacity *= trace.num_layers if scope == "global" else 1
    r = timeline(trace, machine(), "lru", capacity, scope, dense_ms=0.1)
    plain = mc.replay(trace, "lru", capacity, scope)
    assert (r.hits, r.misses) == (plain.hits, plain.misses)
    assert sum(link["demand_bytes"] for link in r.links) == plain.miss_bytes
    assert r.demand_bytes_per_token == pytest.approx(plain.bytes_per_token, rel=1e-12)
    assert r.tier_hits == {"fast memory": plain.hits, "link": plain.misses}


# -- closed forms --------------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(setups(), st.sampled_from(["layer", "global"]), st.floats(1e6, 1e10), st.floats(0, 1e-3),
       st.integers(1, 8), st.floats(0, 1.0))
def test_without_overlap_time_is_compute_plus_replay_io(setup, scope, bandwidth, latency, depth, dense_ms):
    trace, capacity = setup
    capacity *= trace.num_layers if scope == "global" else 1
    r = timeline(trace, machine(bandwidth, latency, depth), "lru", capacity, scope, dense_ms=dense_ms,
                 overlap=False)
    io = mc.replay(trace, "lru", capacity, scope, bandwidth=bandwidth, latency=latency).io_seconds
    assert r.total_s == pytest.approx(compute_seconds(trace, dense_ms) + io, rel=1e-9, abs=1e-15)
    assert r.stall_s == pytest.approx(io, rel=1e-9, abs=1e-15)


@settings(max_examples=30, deadline=None)
@given(setups(), st.sampled_from([None, "oracle", "previous-token"]), st.floats(0, 1.0))
def test_free_io_leaves_the_compute_time(setup, prefetch, dense_ms):
    trace, capacity = setup
    r = timeline(trace, machine(1e300, 0.0), "lru", capacity, dense_ms=dense_ms, prefetch=prefetch)
    assert r.total_s == pytest.approx(compute_seconds(trace, dense_ms), rel=1e-9, abs=1e-15)
    assert r.stall_s == pytest.approx(0.0, abs=1e-12)


def test_host_misses_without_overlap():
    experts = np.array([[[0, 1]], [[1, 2]], [[3, 0]]], np.int16)
    trace = trace_of(experts, np.arange(3), 4)
    box = machine(1e9, 1e-5)
    r = timeline(trace, box, "lru", 2, dense_ms=0.5, miss="host", overlap=False)
    plain = mc.replay(trace, "lru", 2, bandwidth=1e9, latency=1e-5)
    host = max(2 * (EXPERT_BYTES / 4) / box.host_flops, EXPERT_BYTES / box.host_memory_bandwidth)
    expected = 3 * 0.5e-3 + plain.hits * expert_seconds() + plain.misses * host + plain.io_seconds
    assert r.total_s == pytest.approx(expected, rel=1e-12)


def test_overlap_hand_worked():
    """One layer, C = 1, K = 1: ids 0, 1, 1. Link: 1 byte per us, latency 2 us, depth 1.
    Dense 10 us per token; an expert computes in 4096 / 1e11 s = 0.04096 us."""
    experts = np.array([[[0]], [[1]], [[1]]], np.int16)
    trace = trace_of(experts, np.arange(3), 2)
    r = timeline(trace, machine(1e6, 2e-6, 1), "lru", 1, dense_ms=0.01)
    compute = EXPERT_BYTES / MEMORY_BW
    fetch = 2e-6 + EXPERT_BYTES / 1e6
    first = 10e-6 + fetch + compute  # dense, then wait for expert 0, compute it
    second = first + 10e-6 + fetch + compute  # expert 1 misses too
    third = second + 10e-6 + compute  # a hit
    assert r.ends == pytest.approx([first, second, third], rel=1e-12)
    # the oracle's batch for token 0 goes out at time 0, token 1's after token 0's router (at
    # 10 us) but waits for the link (depth 1) until 4098 us; token 2 needs nothing new
    o = timeline(trace, machine(1e6, 2e-6, 1), "lru", 1, dense_ms=0.01, prefetch="oracle")
    assert (o.prefetched, o.prefetch_used) == (2, 2)
    assert o.ends == pytest.approx([fetch + compute, 2 * fetch + compute, 2 * fetch + 10e-6 + 2 * compute],
                                   rel=1e-12)


# -- monotone in the link ------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(setups(), st.sampled_from([None, "oracle", "previous-token"]), st.booleans(),
       st.sampled_from(["fetch", "host"]), st.floats(1e6, 1e10), st.floats(1.0, 100.0),
       st.floats(0, 1e-3), st.floats(0, 1), st.integers(1, 4))
def test_time_never_rises_with_a_faster_link(setup, prefetch, overlap, miss, bandwidth, faster, latency,
                                             shorter, depth):
    trace, capacity = setup
    kwargs = dict(dense_ms=0.05, prefetch=prefetch, overlap=overlap, miss=miss)
    slow = timeline(trace, machine(bandwidth, latency, depth), "lru", capacity, **kwargs)
    fast = timeline(trace, machine(bandwidth * faster, latency * shorter, depth), "lru", capacity, **kwargs)
    assert fast.total_s <= slow.total_s * (1 + 1e-12)
    assert np.all(fast.ends <= slow.ends * (1 + 1e-12))


@settings(max_examples=40, deadline=None)
@given(setups(), st.integers(1, 4))
def test_oracle_never_stalls_more_when_the_link_idles_between_layers(setup, depth):
    """Dense compute of a layer outlasts a full batch of fetches, so the link is idle by the
    next layer's router; the oracle's batch then arrives before it is needed."""
    trace, capacity = setup
    box = machine(1e9, 1e-5, depth)
    batch = trace.num_experts * (1e-5 + EXPERT_BYTES / 1e9) * 4
    dense_ms = 1e3 * batch * trace.num_layers
    none = timeline(trace, box, "lru", capacity, dense_ms=dense_ms)
    oracle = timeline(trace, box, "lru", capacity, dense_ms=dense_ms, prefetch="oracle",
                      budget=trace.num_experts)
    assert oracle.stall_s <= none.stall_s + 1e-12
    assert oracle.stall_s == pytest.approx(0.0, abs=1e-12)


# -- tiers ----------------------------------------------------------------------------------------

def test_tiers_split_every_fetch():
    trace = mc.synth(layers=2, experts=16, top_k=2, tokens=300, expert_bytes=EXPERT_BYTES, seed=3)
    trace = mc.Trace.from_arrays(trace.experts, 16, step=trace.step, expert_bytes=EXPERT_BYTES,
                                 meta={"dtype": "float32"})
    near, far = profiles.Link(2e10, 1e-6, 8), profiles.Link(1e9, 1e-4, 8)
    big = profiles.Tier("host", 2 * 16 * EXPERT_BYTES, near)
    box = machine(tiers=(big, profiles.Tier("ssd", 2**40, far)))
    r = timeline(trace, box, "lru", 4, dense_ms=0.1, tiers=True)
    plain = mc.replay(trace, "lru", 4)
    cold = int(mc.Requests.from_trace(trace).layer_totals["cold_misses"].sum())
    assert r.tier_hits == {"fast memory": plain.hits, "host": plain.misses - cold, "ssd": cold}
    small = profiles.Tier("host", 4 * EXPERT_BYTES, near)
    s = timeline(trace, machine(tiers=(small, profiles.Tier("ssd", 2**40, far))), "lru", 4, dense_ms=0.1,
                 tiers=True)
    assert sum(s.tier_hits.values()) == trace.num_tokens * 2 * 2
    assert s.tier_hits["ssd"] > cold and s.total_s > r.total_s


# -- prefetchers ----------------------------------------------------------------------------------

def test_prefetcher_batches():
    experts = np.array([[[0, 1], [2, 3]], [[1, 2], [3, 0]], [[0, 1], [2, 3]]], np.int16)
    trace = trace_of(experts, np.arange(3), 4)
    req = mc.Requests.from_trace(trace)
    oracle = prefetchers.plan("oracle", prefetchers.Lookahead(req, None, 1, 8))
    assert oracle.experts.tolist() == req.ids.tolist()
    previous = prefetchers.plan("previous-token", prefetchers.Lookahead(req, None, 2, 8))
    assert previous.offsets.tolist() == [0, 0, 0, 2, 4, 6, 8]
    assert previous.experts.tolist() == req.ids[:8].tolist()
    one = prefetchers.plan("previous-token", prefetchers.Lookahead(req, None, 1, 1))
    assert np.diff(one.offsets).tolist() == [0, 0, 1, 1, 1, 1]


def test_co_activation_learns_a_cycle():
    """Layer 1 always uses the experts of layer 0 plus 2: the table predicts it exactly."""
    rng = np.random.default_rng(0)
    first = np.stack([rng.permutation(4)[:2] for _ in range(200)])
    experts = np.stack([first, first + 2], axis=1).astype(np.int16)
    trace = trace_of(experts, np.arange(200), 6, sequences=4)
    r = timeline(trace, machine(), "lru", 2, dense_ms=0.1, prefetch="co-activation", budget=2,
                 train_fraction=0.5)
    layer1 = r.per_layer.set_index("layer").loc[1]
    assert layer1["misses"] == 0
    assert r.prefetch_accuracy > 0.45  # layer 0's batches guess from the previous token's layer 1


# -- bad input ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(prefetch="psychic"), "unknown prefetcher 'psychic'"),
    (dict(prefetch="oracle", depth=0), "depth must be at least 1"),
    (dict(prefetch="oracle", budget=0), "budget must be at least 1"),
    (dict(prefetch="oracle", depth=2**63), "depth must be a whole number below 2\\*\\*63"),
    (dict(prefetch="oracle", budget=2.5), "budget must be a whole number"),
    (dict(prefetch="previous-token", depth=9), "depth 9 is more than the trace's 2 MoE layers"),
    (dict(prefetch="co-activation"), "at least 2 sequences"),
    (dict(miss="disk"), "miss handling must be one of fetch, host"),
    (dict(tier_policy="nope"), "unknown policy 'nope'"),
    (dict(tier_policy="score-lru", tiers=True), "tier policy score-lru reads router weights"),
    (dict(dense_ms=-1.0), "must be a finite number >= 0"),
    (dict(dense_ms=None), "give --model or --dense-ms"),
    (dict(dtype="q4_k"), "give --model too"),
    (dict(tiers=(profiles.Tier("tiny", 10, profiles.Link(1e9, 0, 1)),)), "must hold every expert"),
])
def test_bad_input_is_one_line(kwargs, message):
    experts = np.array([[[0, 1], [2, 3]], [[1, 2], [3, 0]]], np.int16)
    trace = trace_of(experts, np.arange(2), 4)
    args = {"dense_ms": 0.1, **kwargs}
    with pytest.raises(MoecacheError, match=message.replace("(", r"\(")):
        timeline(trace, machine(), "lru", 2, **args)


def test_unknown_hardware():
    trace = trace_of(np.array([[[0]]], np.int16), np.arange(1), 2)
    with pytest.raises(MoecacheError, match="unknown hardware"):
        timeline(trace, "abacus", "lru", 1, dense_ms=1.0)


def test_model_profile_sizes():
    trace = mc.Trace.load(Path(__file__).resolve().parents[1] / "traces" / "toy-baseline.parquet")
    r = timeline(trace, "jetson-orin-nx-16gb", "lru", 8, model="deepseek-v2-lite", dtype="q4_k")
    size = profiles.model("deepseek-v2-lite").expert_bytes("q4_k")
    assert r.links[0]["demand_bytes"] == r.misses * size
    assert math.isfinite(r.tpot_s) and r.tpot_p50_s <= r.tpot_p95_s


# -- the command --------------------------------------------------------------------------------

def test_cli_json_and_errors(tmp_path):
    import json

    from click.testing import CliRunner

    from moecache.cli import cli

    experts = np.array([[[0, 1], [2, 3]], [[1, 2], [3, 0]], [[0, 1], [2, 3]]], np.int16)
    path = trace_of(experts, np.arange(3), 4).save(tmp_path / "t.parquet")
    hardware = tmp_path / "box.toml"
    hardware.write_text(BOX_TOML)
    out = CliRunner().invoke(cli, ["timeline", str(path), "--hardware", str(hardware), "--capacity", "2",
                                   "--dense-ms", "0.5", "--prefetch", "oracle", "--json"])
    assert out.exit_code == 0, out.output
    record = json.loads(out.output)
    assert {"tpot_s", "tokens_per_s", "stall_s", "prefetch_accuracy", "per_layer_stall_s"} <= set(record)
    assert record["tpot_s"] > 0
    bad = CliRunner().invoke(cli, ["timeline", str(path), "--hardware", "abacus", "--capacity", "2"])
    assert bad.exit_code == 2 and len(bad.output.strip().splitlines()) == 1
    alone = CliRunner().invoke(cli, ["timeline", str(path), "--hardware", str(hardware), "--capacity", "2",
                                     "--dense-ms", "0.5", "--figure-from", "1"])
    assert alone.exit_code == 2 and "give --figure FILE too" in alone.output
    small = CliRunner().invoke(cli, ["timeline", str(path), "--hardware", str(hardware), "--capacity", "1",
                                     "--dense-ms", "0.5"])
    assert small.exit_code == 2 and "capacity 1 is below the largest step set" in small.output


BOX_TOML = """
[hardware.box]
description = "a test box"
flops = "1TFLOPS"
memory_bandwidth = "100GB/s"
memory_capacity = "16GiB"
host_flops = "100GFLOPS"
host_memory_bandwidth = "20GB/s"
sources = { profile = "test" }

[[hardware.box.tiers]]
name = "ssd"
capacity = "1TB"
bandwidth = "2GB/s"
latency = "80us"
queue_depth = 8
source = "test"
"""


def test_recorded_events_and_figure(tmp_path):
    from moecache.timeline_plot import timeline_figure

    experts = np.array([[[0, 1], [2, 3]], [[1, 2], [3, 0]], [[0, 1], [2, 3]]], np.int16)
    trace = trace_of(experts, np.arange(3), 4)
    r = timeline(trace, machine(1e9, 1e-5, 2), "lru", 2, dense_ms=0.5, prefetch="previous-token", record=True)
    events = r.events
    device = events[events.resource == "device"]
    assert device["end"].max() == pytest.approx(r.total_s)
    assert (device.sort_values("start")["start"].diff().dropna() >= 0).all()
    spans = device.sort_values("start")
    assert (spans["start"].to_numpy()[1:] >= spans["end"].to_numpy()[:-1] - 1e-15).all()  # one at a time
    fetches = events[events.kind == "demand fetch"]
    assert len(fetches) == r.misses
    assert np.allclose(fetches["end"] - fetches["start"], EXPERT_BYTES / 1e9, rtol=1e-9)
    written = timeline_figure(r, tmp_path / "g.png", steps=2)
    assert written == [tmp_path / "g.png"] and (tmp_path / "g.png").stat().st_size > 1000
    with pytest.raises(MoecacheError, match="by its suffix"):
        timeline_figure(r, tmp_path / "g.bmp")
    before = (tmp_path / "g.png").read_bytes()
    with pytest.raises(MoecacheError, match="already exists \\(pass --force to overwrite\\)"):
        timeline_figure(r, tmp_path / "g.png", steps=1)
    assert (tmp_path / "g.png").read_bytes() == before
    assert timeline_figure(r, tmp_path / "g.png", steps=1, overwrite=True) == [tmp_path / "g.png"]



def test_a_depth_beyond_the_trace_issues_every_batch_at_the_start():
    experts = np.array([[[0, 1]], [[1, 2]], [[3, 0]]], np.int16)
    trace = trace_of(experts, np.arange(3), 4)
    far = timeline(trace, machine(), "lru", 2, dense_ms=0.5, prefetch="oracle", depth=2**63 - 1)
    three = timeline(trace, machine(), "lru", 2, dense_ms=0.5, prefetch="oracle", depth=3)
    assert far.total_s == three.total_s > 3 * 0.5e-3


def test_a_queue_deeper_than_the_transfers_changes_nothing():
    trace = mc.synth(layers=2, experts=8, top_k=2, tokens=50, expert_bytes=EXPERT_BYTES)
    trace = mc.Trace.from_arrays(trace.experts, 8, step=trace.step, expert_bytes=EXPERT_BYTES,
                                 meta={"dtype": "float32"})
    deep = timeline(trace, machine(queue_depth=2**62), "lru", 4, dense_ms=0.1, prefetch="oracle")
    enough = timeline(trace, machine(queue_depth=10**4), "lru", 4, dense_ms=0.1, prefetch="oracle")
    assert deep.total_s == enough.total_s
