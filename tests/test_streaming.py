"""Streaming replay (moecache.streaming): the same numbers as the in-memory replay, for
every policy, both scopes, many spans; bad input in one line."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

import moecache as mc
from moecache.cli import cli
from moecache.errors import MoecacheError
from moecache.policies import POLICIES
from moecache.streaming import (
    curve_stream,
    open_stream,
    replay_file,
    replay_in_spans,
    replay_stream,
    scan,
    should_stream,
)
from moecache.trace_format import ids_column
from moecache.trace_io import TraceWriter


@pytest.fixture(scope="module")
def trace_file(tmp_path_factory):
    """Three sequences with prefill steps (multi-token step sets) and router weights; layers
    of different expert sizes, for byte budgets in global scope."""
    path = tmp_path_factory.mktemp("stream") / "t.parquet"
    trace = mc.synth(layers=3, experts=16, top_k=2, tokens=500, sequences=3, prompt_len=6, logits=True,
                     seed=5)
    trace.meta["expert_bytes"] = [3000, 1000, 2000]
    trace.save(path)
    return path


def same(a: mc.ReplayResult, b: mc.ReplayResult) -> None:
    assert a.to_dict() == b.to_dict()
    assert a.per_layer.equals(b.per_layer)


@pytest.mark.parametrize("span", [40, 700, 1 << 23])
def test_every_policy_equals_the_in_memory_replay(trace_file, span):
    trace = mc.Trace.load(trace_file)
    with open_stream(trace_file, weights=True, span_entries=span) as streamed:
        assert (streamed.num_steps, streamed.num_tokens) == (trace.num_steps, trace.num_tokens)
        assert len(streamed.spans) > (10 if span == 40 else 0)
        for policy in POLICIES:
            for scope, capacity in (("layer", 8), ("global", 20)):
                expected = mc.replay(trace, policy, capacity, scope)
                same(expected, replay_stream(streamed, policy, capacity, scope))


@pytest.mark.parametrize("policy", ["lru", "opt", "score-lru", "s3fifo", "pinned:train=0.3,n=3"])
def test_byte_budgets_and_per_token_steps(trace_file, policy):
    trace = mc.Trace.load(trace_file)
    for per_token in (False, True):
        with open_stream(trace_file, weights=True, per_token=per_token, span_entries=64) as streamed:
            for scope in ("layer", "global"):
                expected = mc.replay(trace, policy, scope=scope, memory="60KB", per_token=per_token,
                                     bandwidth="1GB/s", latency="1ms")
                got = replay_stream(streamed, policy, scope=scope, memory="60KB", bandwidth="1GB/s",
                                    latency="1ms")
                same(expected, got)


@pytest.mark.parametrize("policy", ["lru", "opt", "fifo"])
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_curve_equals_the_in_memory_curve(trace_file, policy, scope):
    trace = mc.Trace.load(trace_file, weights=False)
    expected = mc.curve(trace, policy, scope, capacities="8:48:5")
    with open_stream(trace_file, span_entries=100) as streamed:
        got = curve_stream(streamed, policy, scope, capacities="8:48:5")
    assert got.columns.tolist() == expected.columns.tolist()
    assert np.allclose(got.select_dtypes("number"), expected.select_dtypes("number"), equal_nan=True, rtol=0)
    assert got["hits"].tolist() == expected["hits"].tolist()


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10**6), span=st.integers(1, 200), capacity=st.integers(4, 12),
       policy=st.sampled_from(["lru", "opt", "opt-bypass", "arc", "lfu", "score-lru"]),
       scope=st.sampled_from(["layer", "global"]), prompt=st.integers(0, 4))
def test_random_traces_and_spans(tmp_path_factory, seed, span, capacity, policy, scope, prompt):
    path = tmp_path_factory.mktemp("random") / "t.parquet"
    trace = mc.synth(layers=2, experts=12, top_k=2, tokens=80, sequences=2, prompt_len=prompt,
                     logits=True, seed=seed)
    trace.save(path)
    capacity = max(capacity, int(mc.Requests.from_trace(trace).layer_totals["largest"].max()))
    with open_stream(path, weights=True, span_entries=span) as streamed:
        same(mc.replay(trace, policy, capacity, scope), replay_stream(streamed, policy, capacity, scope))


@pytest.mark.parametrize("span", [40, 700, 1 << 23])
def test_one_pass_equals_the_in_memory_replay(trace_file, span, monkeypatch):
    """lru is served while the file is read (no spill: open_stream is never called); the
    other policies spill and read back; both give the in-memory numbers."""
    import moecache.streaming as streaming

    trace = mc.Trace.load(trace_file)
    spill = streaming.open_stream
    monkeypatch.setattr(streaming, "open_stream", lambda *a, **k: pytest.fail("lru spilled"))
    for per_token in (False, True):
        for scope, capacity in (("layer", 8), ("global", 20)):
            expected = mc.replay(trace, "lru", capacity, scope, per_token=per_token)
            same(expected, replay_file(trace_file, "lru", capacity, scope, per_token=per_token,
                                       span_entries=span))
            same(expected, replay_in_spans(trace, "lru", capacity, scope, per_token=per_token,
                                           span_entries=span))
            expected = mc.replay(trace, "lru", scope=scope, memory="60KB", per_token=per_token,
                                 bandwidth="1GB/s", latency="1ms")
            same(expected, replay_file(trace_file, "lru", scope=scope, memory="60KB", per_token=per_token,
                                       bandwidth="1GB/s", latency="1ms", span_entries=span))
            same(expected, replay_in_spans(trace, "lru", scope=scope, memory="60KB", per_token=per_token,
                                           bandwidth="1GB/s", latency="1ms", span_entries=span))
    monkeypatch.setattr(streaming, "open_stream", spill)
    for policy in ("opt", "fifo", "score-lru"):
        same(mc.replay(trace, policy, 20, "global"), replay_file(trace_file, policy, 20, "global",
                                                                span_entries=span))


def test_next_uses_in_32_or_64_bits(trace_file, monkeypatch):
    """OPT's next uses are spilled as int32 while the steps fit in it, else int64: the same hits."""
    import moecache.streaming as streaming

    trace = mc.Trace.load(trace_file)
    for kind in (np.int32, np.int64):
        monkeypatch.setattr(streaming.StreamedTrace, "_step_type", property(lambda self, kind=kind: kind))
        with open_stream(trace_file, span_entries=50) as streamed:
            for scope, capacity in (("layer", 8), ("global", 20)):
                expected = mc.replay(trace, "opt", capacity, scope)
                same(expected, replay_stream(streamed, "opt", capacity, scope))
            size = (streamed.folder / "next.steps").stat().st_size
            assert size == streamed.num_entries * np.dtype(kind).itemsize


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10**6), span=st.integers(1, 200), capacity=st.integers(2, 12),
       scope=st.sampled_from(["layer", "global"]), prompt=st.integers(0, 6))
def test_one_pass_random_traces_and_spans(tmp_path_factory, seed, span, capacity, scope, prompt):
    """Random traces, spans and capacities, some below the largest step set: the one-pass
    replays (of the file, of the loaded trace in spans) give the in-memory result, or the
    same one-line error."""
    path = tmp_path_factory.mktemp("one-pass") / "t.parquet"
    mc.synth(layers=2, experts=12, top_k=2, tokens=80, sequences=2, prompt_len=prompt, seed=seed).save(path)
    trace = mc.Trace.load(path)  # the errors name the file
    try:
        expected = mc.replay(trace, "lru", capacity, scope)
    except MoecacheError as err:
        for run in (lambda: replay_file(path, "lru", capacity, scope, span_entries=span),
                    lambda: replay_in_spans(mc.Trace.load(path), "lru", capacity, scope, span_entries=span)):
            with pytest.raises(MoecacheError) as got:
                run()
            assert str(got.value) == str(err)
    else:
        same(expected, replay_file(path, "lru", capacity, scope, span_entries=span))
        same(expected, replay_in_spans(mc.Trace.load(path), "lru", capacity, scope, span_entries=span))


def test_one_pass_names_the_largest_set_found_late(tmp_path):
    """A step set too large for the cache, many spans in: serving stops there, and the error
    names the largest set of the whole file, as the in-memory replay does."""
    rng = np.random.default_rng(0)
    experts = np.stack([np.stack([rng.permutation(16)[:2] for _ in range(2)]) for _ in range(300)])
    step = np.arange(300)
    step[200:206] = 200  # a prefill step of 6 tokens
    step[250:260] = 250  # and a larger one of 10 later
    step[206:250] = np.arange(201, 245)
    step[260:] = np.arange(251, 291)
    path = tmp_path / "late.parquet"
    mc.Trace.from_arrays(experts, 16, step=step).save(path)
    trace = mc.Trace.load(path)
    with pytest.raises(MoecacheError) as expected:
        mc.replay(trace, "lru", 6)
    assert "at step 245" in str(expected.value)  # the 246th step (step value 250)
    with pytest.raises(MoecacheError) as got:
        replay_file(path, "lru", 6, span_entries=16)
    assert str(got.value) == str(expected.value)
    with pytest.raises(MoecacheError) as got:
        replay_in_spans(mc.Trace.load(path), "lru", 6, span_entries=16)
    assert str(got.value) == str(expected.value)


def test_replay_serves_a_large_trace_in_spans(trace_file, monkeypatch):
    """moecache.replay of a trace above STREAM_LRU_ABOVE requested experts, under lru, runs
    in spans (its step sets never built) with the numbers of the whole-trace replay; a
    trace whose step sets are built, another policy, or a replay recording outcomes uses those."""
    import moecache.streaming as streaming

    expected = {scope: mc.replay(mc.Trace.load(trace_file), "lru", c, scope)
                for scope, c in (("layer", 8), ("global", 20))}
    monkeypatch.setattr(streaming, "STREAM_LRU_ABOVE", 100)
    trace = mc.Trace.load(trace_file)
    for scope, c in (("layer", 8), ("global", 20)):
        same(expected[scope], mc.replay(trace, "lru", c, scope))
        assert not mc.Requests.built(trace) and streaming.in_spans(trace, "lru")
    assert not streaming.in_spans(trace, "opt")
    mc.replay(trace, "lru", 8, record_outcomes=True)
    assert mc.Requests.built(trace) and not streaming.in_spans(trace, "lru")
    monkeypatch.setattr(streaming, "STREAM_LRU_ABOVE", trace.num_tokens * trace.num_layers * trace.top_k)
    assert not streaming.in_spans(mc.Trace.load(trace_file), "lru")


def _written_in_blocks(tmp_path):
    """A trace with prefill steps written in blocks of 7 tokens: row groups that cut steps."""
    whole = mc.synth(layers=2, experts=10, top_k=3, tokens=90, sequences=2, prompt_len=9, seed=1)
    path = tmp_path / "blocks.parquet"
    with TraceWriter(path, whole.meta, flush_tokens=7) as writer:
        for lo in range(0, whole.num_tokens, 7):
            part = slice(lo, lo + 7)
            writer.write(whole.experts[part], step=whole.step[part], seq=whole.seq[part],
                         pos=whole.pos[part], phase=whole.phase[part])
    return path


def test_row_groups_split_tokens_and_steps(tmp_path):
    """A trace written in blocks of 7 tokens (row groups that cut steps) streams as it loads."""
    path = _written_in_blocks(tmp_path)
    loaded = mc.Trace.load(path)
    with open_stream(path, span_entries=5) as streamed:
        for policy in ("lru", "opt", "lirs"):
            same(mc.replay(loaded, policy, 10), replay_stream(streamed, policy, 10))


def test_info_of_a_scanned_trace_equals_the_loaded_one(tmp_path, monkeypatch):
    """`moecache info` on a trace too large for memory checks it block by block (blocks
    that cut tokens and steps) and prints what it prints for the loaded trace."""
    import moecache.cli as cli_module
    from moecache.report import trace_summary

    path = _written_in_blocks(tmp_path)
    header, tokens = scan(path, span_entries=5)
    assert header.num_tokens == 0 and len(tokens["step"]) == 90
    loaded = mc.Trace.load(path)
    assert trace_summary(header, path, tokens=tokens) == trace_summary(loaded, path)
    runner = CliRunner()
    in_memory = runner.invoke(cli, ["info", str(path)])
    monkeypatch.setattr(cli_module, "should_stream", lambda *args, **kwargs: True)
    scanned = runner.invoke(cli, ["info", str(path)])
    assert scanned.exit_code == in_memory.exit_code == 0 and scanned.output == in_memory.output
    bad = tmp_path / "bad.parquet"
    mc.synth(layers=2, experts=8, top_k=2, tokens=40, seed=3).save(bad)
    table = pq.read_table(bad)
    experts = np.frombuffer(table["experts"].combine_chunks().buffers()[1], "<i2").reshape(-1, 2).copy()
    experts[50] = [1, 1]  # a duplicate id, in the middle of the file
    column = ids_column(experts)
    pq.write_table(table.set_column(table.schema.get_field_index("experts"), "experts", column), bad,
                   row_group_size=8)
    result = runner.invoke(cli, ["info", str(bad)])  # scanned (should_stream still patched)
    assert result.exit_code == 2 and "duplicate expert id" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_cli_stream_equals_in_memory(trace_file):
    runner = CliRunner()
    outputs = []
    for flag in ("--stream", "--no-stream"):
        result = runner.invoke(cli, ["replay", str(trace_file), "--policy", "opt", "--capacity", "20",
                                     "--scope", "global", flag, "--json"])
        assert result.exit_code == 0, result.output
        outputs.append(json.loads(result.output))
    assert outputs[0] == outputs[1]
    curves = [runner.invoke(cli, ["curve", str(trace_file), "--capacities", "8:16", flag, "--json"]).output
              for flag in ("--stream", "--no-stream")]
    assert json.loads(curves[0]) == json.loads(curves[1])


def test_auto_streams_only_large_traces(trace_file, monkeypatch):
    import moecache.streaming as streaming

    assert should_stream(trace_file) is False
    assert should_stream(trace_file, True) is True
    assert should_stream(trace_file, policy="lru") is False  # a small trace: in memory
    monkeypatch.setattr(streaming, "STREAM_LRU_ABOVE", 10)
    assert should_stream(trace_file, policy="lru") is True  # lru streams as fast, in less memory
    assert should_stream(trace_file, policy="opt") is False  # opt is faster in memory
    assert should_stream(trace_file, policy="arc") is False  # hooks: faster in memory
    assert should_stream(trace_file, False, policy="lru") is False


def test_bad_input_is_one_line(tmp_path, trace_file):
    plain = tmp_path / "plain.parquet"
    mc.synth(layers=2, experts=8, top_k=2, tokens=30, seed=2).save(plain)
    with pytest.raises(MoecacheError, match="no router weights"):
        open_stream(plain, weights=True)

    class Mine(mc.PythonPolicy):
        def victim(self, resident, pinned, mark):
            return int(np.flatnonzero(resident & (pinned != mark))[0])

    with open_stream(trace_file) as streamed:
        with pytest.raises(MoecacheError, match="cannot stream"):
            replay_stream(streamed, Mine, 8)
        with pytest.raises(MoecacheError, match="below the largest step set"):
            replay_stream(streamed, "lru", 1)
    with pytest.raises(MoecacheError, match=r"spill folder in .*plain.parquet: cannot write: Not a dir"):
        open_stream(trace_file, folder=plain)  # a file where the spill folder should go
    result = CliRunner().invoke(cli, ["replay", str(tmp_path / "missing.parquet"), "--capacity", "4",
                                      "--stream"])
    assert result.exit_code == 2 and "missing.parquet" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_unsorted_steps_across_spans_are_refused(tmp_path):
    """Steps that go back in a later row group: the in-memory load and the stream both refuse."""
    good, bad = tmp_path / "good.parquet", tmp_path / "bad.parquet"
    mc.synth(layers=2, experts=8, top_k=2, tokens=40, seed=3).save(good)
    table = pq.read_table(good)
    step = table["step"].to_numpy().copy()
    step[60:] -= 20  # token 30 on: steps 10.. again
    pq.write_table(table.set_column(table.schema.get_field_index("step"), "step", pa.array(step)), bad,
                   row_group_size=8)
    with pytest.raises(MoecacheError, match="not sorted"):
        mc.Trace.load(bad)
    with pytest.raises(MoecacheError, match="not sorted"):
        open_stream(bad, span_entries=8)


def test_compare_streamed_equals_in_memory(tmp_path):
    base, remoe = tmp_path / "base.parquet", tmp_path / "remoe.parquet"
    mc.synth(layers=2, experts=16, top_k=2, tokens=300, stickiness=0.2, seed=1).save(base)
    mc.synth(layers=2, experts=16, top_k=2, tokens=300, stickiness=0.8, seed=2).save(remoe)
    runner = CliRunner()
    args = ["compare", str(base), str(remoe), "--capacity", "4,8", "--bandwidth", "ufs4,nvme4", "--json"]
    outputs = []
    for flag in ("--stream", "--no-stream"):
        result = runner.invoke(cli, [*args, flag])
        assert result.exit_code == 0, result.output
        outputs.append(json.loads(result.output))
    assert outputs[0] == outputs[1]
    result = runner.invoke(cli, [*args, "--stream", "--compute-ms", "20"])
    assert result.exit_code == 2 and "needs the traces in memory" in result.output


def test_reading_memory_does_not_grow_with_the_trace(tmp_path, monkeypatch):
    """Arrow holds about one batch, not the file: pyarrow's pre_buffer (on by default) kept
    every range it read, so a billion-request trace peaked at 1.6 GiB."""
    import moecache.streaming as streaming
    from moecache.synth import write_synth

    path = write_synth(tmp_path / "t.parquet", layers=4, experts=32, top_k=4, tokens=1_000_000, seed=1,
                       block_tokens=20_000)
    held = []
    count = streaming._Counter.count

    def watched(self, part):
        span = count(self, part)
        held.append(pa.total_allocated_bytes())
        return span

    monkeypatch.setattr(streaming._Counter, "count", watched)
    with open_stream(path, span_entries=100_000):
        pass
    assert len(held) > 100
    assert max(held) < path.stat().st_size / 2  # the file is 10 MB of Parquet
