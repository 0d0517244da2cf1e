"""Real-log shapes through `moecache import`, replayed against the slow reference.

Each test writes a log in one shape users have (per-request token counters with rows
grouped by layer, a metadata header, warm-up rows with valid ids, token indices that
restart per forward batch), imports it, and checks that the trace holds the tokens in
the right order and that replay gives exactly the reference's hits and reuse computed
on the arrays the log was generated from.
"""

import json

import numpy as np
import pytest
from click.testing import CliRunner

import moecache as mc
from moecache import log_formats
from moecache.cli import cli
from moecache.errors import MoecacheError
from moecache.importer import REPEAT_RUN, import_routing
from moecache.reroute import reroute

from .reference import reference_replay

LAYERS = [1, 3, 5, 7]
E, K = 16, 2
MAP = "experts=ids,weights=w,layer=layer,token=i,seq=req"


def routing(rng, tokens, stick=0.6):
    """Sticky top-K routing (tokens, layers, K) with non-uniform weights summing to 1."""
    experts = np.zeros((tokens, len(LAYERS), K), np.int64)
    for t in range(tokens):
        for li in range(len(LAYERS)):
            keep = t and rng.random() < stick
            experts[t, li] = experts[t - 1, li] if keep else rng.permutation(E)[:K]
    weights = rng.dirichlet(np.full(K, 2.0), size=(tokens, len(LAYERS))).astype(np.float32)
    return experts, weights


def row(req, i, layer_index, experts, weights, t):
    return {"req": req, "i": i, "layer": LAYERS[layer_index], "ids": experts[t, layer_index].tolist(),
            "w": weights[t, layer_index].tolist()}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def assert_replays_like_reference(trace, experts):
    """Exact hits, cold misses and reuse of the reference on the expected token order."""
    np.testing.assert_array_equal(trace.experts, experts)
    step = np.arange(len(experts))
    for policy in ("lru", "fifo", "opt"):
        for capacity in (K, K + 3):
            result = mc.replay(trace, policy=policy, capacity=capacity)
            expected = reference_replay(experts, step, policy, capacity)
            np.testing.assert_array_equal(result.per_layer["hits"], expected["hits"])
            np.testing.assert_array_equal(result.per_layer["cold_misses"], expected["cold_misses"])
            assert result.reuse_rate == expected["reuse_hits"].sum() / expected["reuse_requests"].sum()


@pytest.fixture()
def requests():
    """Three requests of different lengths, named so that sorting them would reorder them."""
    rng = np.random.default_rng(11)
    return {name: routing(rng, n) for name, n in (("cmpl-z", 7), ("cmpl-a", 5), ("cmpl-m", 6))}


def test_per_request_counters_with_rows_grouped_by_layer(tmp_path, requests):
    # every layer's rows for all requests, then the next layer; token index restarts per request
    rows = [row(req, t, li, ex, w, t) for li in range(len(LAYERS))
            for req, (ex, w) in requests.items() for t in range(len(ex))]
    log = write_jsonl(tmp_path / "log.jsonl", rows)
    out = tmp_path / "t.parquet"
    report = import_routing(log, out, mapping=MAP, num_experts=E)
    trace = mc.Trace.load(out)
    expected = np.concatenate([ex for ex, _ in requests.values()])
    assert_replays_like_reference(trace, expected)
    assert trace.seq.tolist() == [0] * 7 + [1] * 5 + [2] * 6
    assert trace.meta["capture"]["seq_labels"] == ["cmpl-z", "cmpl-a", "cmpl-m"]
    formed = "steps: one per token, sequences one after another in order of first appearance, " \
             "tokens by token index"
    assert report.steps_formed == formed and trace.meta["capture"]["steps_formed"] == formed
    assert formed in report.summary()
    # the old default interleaved the requests by token index: other numbers
    interleaved = import_routing(log, tmp_path / "token.parquet", mapping=MAP, num_experts=E, order="token")
    assert "across all sequences" in interleaved.steps_formed
    tokens = mc.Trace.load(tmp_path / "token.parquet")
    assert tokens.seq.tolist()[:3] == [0, 1, 2]
    assert mc.replay(tokens, "lru", K).hits != mc.replay(trace, "lru", K).hits


def test_info_states_how_steps_were_formed(tmp_path, requests):
    rows = [row(req, t, li, ex, w, t) for req, (ex, w) in requests.items()
            for t in range(len(ex)) for li in range(len(LAYERS))]
    out = tmp_path / "t.parquet"
    import_routing(write_jsonl(tmp_path / "log.jsonl", rows), out, mapping=MAP, num_experts=E)
    result = CliRunner().invoke(cli, ["info", str(out)])
    assert result.exit_code == 0, result.output
    line = next(text for text in result.output.splitlines() if text.startswith("steps formed"))
    assert line.split(None, 2)[2] == ("one per token, sequences one after another in order of first "
                                      "appearance, tokens by token index")


def test_step_and_time_columns_order_interleaved_sequences(tmp_path, requests):
    # continuous batching: request tokens interleaved in a known serving order
    names = list(requests)
    served = [(name, t) for t in range(7) for name in names if t < len(requests[name][0])]
    rows = []
    for clock, (name, t) in enumerate(served):
        ex, w = requests[name]
        rows += [dict(row(name, t, li, ex, w, t), ts=1000.0 + clock + li / 100) for li in range(len(LAYERS))]
    shuffled = [rows[i] for i in np.random.default_rng(1).permutation(len(rows))]
    log = write_jsonl(tmp_path / "log.jsonl", shuffled)
    expected = np.stack([requests[name][0][t] for name, t in served])
    report = import_routing(log, tmp_path / "t.parquet", mapping=MAP + ",time=ts", num_experts=E)
    assert_replays_like_reference(mc.Trace.load(tmp_path / "t.parquet"), expected)
    assert report.steps_formed.startswith("steps: one per token, tokens in order of the time column (ties: ")
    for r in shuffled:
        r["batch"] = served.index((r["req"], r["i"]))
    log = write_jsonl(tmp_path / "steps.jsonl", shuffled)
    report = import_routing(log, tmp_path / "s.parquet", mapping=MAP + ",step=batch", num_experts=E)
    assert_replays_like_reference(mc.Trace.load(tmp_path / "s.parquet"), expected)
    assert report.steps_formed.startswith("steps: one per value of the step field, in step order; within")


def test_header_and_profile_lines_are_skipped_and_counted(tmp_path, requests):
    header = {"type": "meta", "model": "some/moe", "num_layers": 8, "hook": "vllm"}
    profile = {"type": "profile", "layer": 3, "elapsed_ms": 1.5}
    rows = [row(req, t, li, ex, w, t) for req, (ex, w) in requests.items()
            for t in range(len(ex)) for li in range(len(LAYERS))]
    log = write_jsonl(tmp_path / "log.jsonl", [header] + rows[:20] + [profile] + rows[20:])
    out = tmp_path / "t.parquet"
    report = import_routing(log, out, mapping=MAP, num_experts=E)
    assert report.skipped_rows == {"non_routing": 2} and report.dropped_rows == {}
    assert report.rows_read == len(rows) + 2 and report.tokens_written == 18
    assert "skipped (non_routing): 2 rows" in report.summary()
    assert report.problems == ["2 rows without routing data (first: row 1, type 'meta'): skipped 2 rows"]
    trace = mc.Trace.load(out)
    assert trace.meta["capture"]["skipped"] == {"non_routing": 2}
    assert_replays_like_reference(trace, np.concatenate([ex for ex, _ in requests.values()]))
    # without a type column: a header without experts, layer and token
    no_type = write_jsonl(tmp_path / "plain.jsonl", [{"model": "some/moe"}] + rows)
    report = import_routing(no_type, tmp_path / "u.parquet", mapping=MAP, num_experts=E)
    assert report.skipped_rows == {"non_routing": 1}
    assert "first: row 1, no experts, layer or token" in report.problems[0]


def warmup_rows(req, tokens, start=0):
    """A profile run's rows: every token routed to experts 0..K-1 with weights exactly 1/K."""
    return [{"req": req, "i": start + t, "layer": layer, "ids": list(range(K)), "w": [1 / K] * K}
            for t in range(tokens) for layer in LAYERS]


def test_warmup_with_valid_ids_is_reported_then_dropped(tmp_path, requests):
    rows = [row(req, t, li, ex, w, t) for req, (ex, w) in requests.items()
            for t in range(len(ex)) for li in range(len(LAYERS))]
    log = write_jsonl(tmp_path / "log.jsonl", warmup_rows("warmup-0", 12, start=3) + rows)
    out = tmp_path / "t.parquet"
    with pytest.raises(MoecacheError) as info:
        import_routing(log, out, mapping=MAP, num_experts=E)
    assert str(info.value) == (f"{log}: 12 warm-up tokens with weights exactly 1/K = 0.5 in every layer "
                               "(first: row 1, token 3 (seq 'warmup-0')); rerun with --drop-warmup to drop "
                               "and count them")
    report = import_routing(log, out, mapping=MAP, num_experts=E, on_warmup="drop")
    assert report.dropped_rows == {"warmup_uniform": 48} and report.dropped_tokens == {"warmup_uniform": 12}
    assert report.sequences == 3
    assert_replays_like_reference(mc.Trace.load(out), np.concatenate([ex for ex, _ in requests.values()]))


def test_warmup_under_a_real_request_never_replaces_its_tokens(tmp_path, requests):
    # the profile run reuses the first request's id and token indices: its rows collide
    name = next(iter(requests))
    rows = [row(req, t, li, ex, w, t) for req, (ex, w) in requests.items()
            for t in range(len(ex)) for li in range(len(LAYERS))]
    log = write_jsonl(tmp_path / "log.jsonl", warmup_rows(name, 10) + rows)
    out = tmp_path / "t.parquet"
    report = import_routing(log, out, mapping=MAP, num_experts=E, on_warmup="drop")
    assert report.dropped_tokens == {"warmup_uniform": 10} and "duplicate" not in report.dropped_rows
    assert_replays_like_reference(mc.Trace.load(out), np.concatenate([ex for ex, _ in requests.values()]))


def test_runs_of_identical_routing_are_warmup(tmp_path, requests):
    ex, w = routing(np.random.default_rng(5), 1)
    dummy = [row("profile", t, li, ex, w, 0) for t in range(REPEAT_RUN) for li in range(len(LAYERS))]
    rows = [row(req, t, li, e, x, t) for req, (e, x) in requests.items()
            for t in range(len(e)) for li in range(len(LAYERS))]
    log = write_jsonl(tmp_path / "log.jsonl", dummy + rows)
    out = tmp_path / "t.parquet"
    with pytest.raises(MoecacheError, match=f"{REPEAT_RUN} warm-up tokens in runs of {REPEAT_RUN} or more "
                       r"consecutive tokens .* \(first: row 1, a run of 32\); rerun with --drop-warmup"):
        import_routing(log, out, mapping=MAP, num_experts=E)
    report = import_routing(log, out, mapping=MAP, num_experts=E, on_warmup="drop")
    assert report.dropped_tokens == {"warmup_repeated": REPEAT_RUN}
    assert_replays_like_reference(mc.Trace.load(out), np.concatenate([e for e, _ in requests.values()]))
    # one token short of a run is real routing
    short = write_jsonl(tmp_path / "short.jsonl", dummy[len(LAYERS):] + rows)
    assert import_routing(short, tmp_path / "u.parquet", mapping=MAP, num_experts=E).tokens_written == 18 + 31


def batch_rows(req, ex, w, sizes, first=0):
    """Rows of one request served in forward batches of ``sizes`` tokens, the index restarting
    at ``first`` in every batch (a decode batch of one token is index ``first`` again)."""
    rows, t = [], 0
    for size in sizes:
        rows += [row(req, first + j, li, ex, w, t + j) for j in range(size) for li in range(len(LAYERS))]
        t += size
    return rows


def test_token_index_restarting_per_batch(tmp_path, requests):
    (a, (ex_a, w_a)), (b, (ex_b, w_b)) = list(requests.items())[:2]
    rows = batch_rows(a, ex_a, w_a, [4, 1, 1, 1]) + batch_rows(b, ex_b, w_b, [2, 2, 1])
    log = write_jsonl(tmp_path / "log.jsonl", rows)
    out = tmp_path / "t.parquet"
    with pytest.raises(MoecacheError, match="goes back within a request at row 17: if it restarts at every "
                       "forward batch, pass --token-restarts batch; rerun with --drop-problems"):
        import_routing(log, out, mapping=MAP, num_experts=E)
    report = import_routing(log, out, mapping=MAP, num_experts=E, token_restarts="batch")
    assert report.dropped_rows == {} and report.tokens_written == 12
    assert "tokens by batch (in file order), then token index" in report.steps_formed
    trace = mc.Trace.load(out)
    assert trace.meta["capture"]["token_restarts"] == "batch"
    assert_replays_like_reference(trace, np.concatenate([ex_a, ex_b]))


def test_warmup_batch_before_restarting_batches(tmp_path, requests):
    # the log: a profile batch under the request id, then the real batches, all from 0
    (name, (ex, w)), = list(requests.items())[:1]
    rows = warmup_rows(name, 9) + batch_rows(name, ex, w, [3, 1, 1, 1, 1])
    log = write_jsonl(tmp_path / "log.jsonl", rows)
    out = tmp_path / "t.parquet"
    with pytest.raises(MoecacheError, match="9 warm-up tokens with weights exactly 1/K"):
        import_routing(log, out, mapping=MAP, num_experts=E, token_restarts="batch")
    report = import_routing(log, out, mapping=MAP, num_experts=E, token_restarts="batch", on_warmup="drop")
    assert report.dropped_tokens == {"warmup_uniform": 9} and report.tokens_written == 7
    assert_replays_like_reference(mc.Trace.load(out), ex)


def test_all_uniform_weights_are_no_gate_weights(tmp_path):
    rows = [{"i": t, "layer": 0, "ids": [t % 4, (t + 1) % 4], "w": [0.5, 0.5]} for t in range(5)]
    log = write_jsonl(tmp_path / "log.jsonl", rows)
    with pytest.raises(MoecacheError, match="every token has weights exactly 1/K = 0.5 in every layer: "
                       "column 'w' \\(weights\\) holds no gate weights"):
        import_routing(log, tmp_path / "t.parquet", mapping="experts=ids,weights=w,token=i", on_warmup="drop")


def test_pos_alone_identifies_tokens(tmp_path):
    rows = [{"p": t, "layer": 0, "ids": [t % 3]} for t in range(4)]
    log = write_jsonl(tmp_path / "log.jsonl", rows)
    report = import_routing(log, tmp_path / "t.parquet", mapping="experts=ids,pos=p")
    assert report.tokens_written == 4 and "tokens by position" in report.steps_formed
    with pytest.raises(MoecacheError, match=r"no token column: map token=COLUMN \(the token's index\) or "
                       r"pos=COLUMN"):
        import_routing(log, tmp_path / "u.parquet", mapping="experts=ids")


# -- array formats of moecache.log_formats, through a fake reader ----------------------

@pytest.fixture()
def fake_format(monkeypatch):
    """Registers a reader for ``*.fake`` files; returns the arrays it will hand back."""
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((6, 2, 8)).astype(np.float32)
    experts = np.argsort(-logits, axis=2)[:, :, :K]
    arrays = {"experts": experts, "logits": logits, "num_experts": np.array(8), "layers": np.array([4, 2]),
              "seq": np.array([0, 0, 0, 1, 1, 1])}
    calls = []

    def reader(path, src, top_k=None):
        calls.append(top_k)
        return dict(arrays)

    monkeypatch.setattr(log_formats, "READERS", {"fake": reader})
    monkeypatch.setattr(log_formats, "sniff", lambda path: "fake" if path.suffix == ".fake" else None)
    return arrays, calls


def test_reader_arrays_take_the_array_path(tmp_path, fake_format):
    arrays, calls = fake_format
    src = tmp_path / "run.fake"
    src.write_bytes(b"anything")
    out = tmp_path / "t.parquet"
    report = import_routing(src, out, top_k=K)
    assert calls == [K] and report.format == "fake" and report.num_experts == 8
    assert "num_experts" not in report.inferred
    assert report.steps_formed == "steps: one per token, tokens in the order of the array's token axis"
    trace = mc.Trace.load(out, logits=True)
    assert trace.layers.tolist() == [2, 4]
    np.testing.assert_array_equal(trace.experts, arrays["experts"][:, ::-1])
    np.testing.assert_array_equal(trace.logits, arrays["logits"][:, ::-1].astype(np.float16))
    rerouted, _ = reroute(trace, mode="recent", bias=0.0)
    np.testing.assert_array_equal(rerouted.experts, trace.experts)
    assert_replays_like_reference_arrays(trace)


def assert_replays_like_reference_arrays(trace):
    result = mc.replay(trace, policy="lru", capacity=K)
    expected = reference_replay(trace.experts, np.arange(trace.num_tokens), "lru", K)
    assert result.hits == expected["hits"].sum()


@pytest.mark.parametrize("change, kwargs, words", [
    ({}, {"num_experts": 9}, "the log records num_experts = 8, but --num-experts is 9"),
    ({"num_experts": None}, {"num_experts": 9},
     "'logits' hold 8 router scores per row, but num_experts is 9"),
    ({}, {"top_k": 3}, "the log holds 2 experts per row, but --top-k is 3"),
    ({"experts": None}, {}, "no 'experts' array (arrays: logits, num_experts, layers, seq)"),
    ({"num_experts": np.array([8])}, {}, "'num_experts' must be one positive integer"),
    ({}, {"mapping": "experts=x"}, "--map applies to row logs"),
    ({}, {"order": "sequence"}, "--order sequence applies to row logs"),
    ({}, {"token_restarts": "batch"}, "--token-restarts batch applies to row logs"),
])
def test_reader_arrays_are_checked(tmp_path, fake_format, change, kwargs, words):
    arrays, _ = fake_format
    for key, value in change.items():
        if value is None:
            del arrays[key]
        else:
            arrays[key] = value
    src = tmp_path / "run.fake"
    src.write_bytes(b"anything")
    with pytest.raises(MoecacheError) as info:
        import_routing(src, tmp_path / "t.parquet", **kwargs)
    assert str(info.value).startswith(f"{src}: ") and words in str(info.value)


def test_reader_logits_give_num_experts(tmp_path, fake_format):
    arrays, _ = fake_format
    del arrays["num_experts"]
    src = tmp_path / "run.fake"
    src.write_bytes(b"anything")
    report = import_routing(src, tmp_path / "t.parquet")
    assert report.num_experts == 8 and "router scores" in report.inferred["num_experts"]


# -- the command line ---------------------------------------------------------------------

def test_cli_flags_for_warmup_and_restarts(tmp_path, requests):
    (name, (ex, w)), = list(requests.items())[:1]
    log = write_jsonl(tmp_path / "log.jsonl", warmup_rows(name, 9) + batch_rows(name, ex, w, [3, 1, 1, 1, 1]))
    args = ["import", str(log), "--out", str(tmp_path / "t.parquet"), "--map", MAP, "--num-experts", str(E)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.rstrip().endswith(
        "9 warm-up tokens with weights exactly 1/K = 0.5 in every layer (first: row 1, "
        f"token 0 (seq '{name}')); rerun with --drop-warmup to drop and count them")
    result = CliRunner().invoke(cli, [*args, "--drop-warmup"])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "pass --token-restarts batch; rerun with --drop-problems to drop" in result.stderr
    assert "on_problem" not in result.stderr
    result = CliRunner().invoke(cli, [*args, "--drop-warmup", "--token-restarts", "batch", "--order",
                                      "sequence"])
    assert result.exit_code == 0, result.output
    assert "dropped (warmup_uniform): 36 rows, 9 tokens" in result.stdout
    assert "steps: one per token, sequences one after another" in result.stdout
    np.testing.assert_array_equal(mc.Trace.load(tmp_path / "t.parquet").experts, ex)


def test_time_column_of_iso_timestamps(tmp_path):
    stamps = ["2024-05-01T10:00:02Z", "2024-05-01T10:00:01Z", "2024-05-01T10:00:03.5+00:00"]
    rows = [{"t": i, "layer": 0, "experts": [i], "ts": ts} for i, ts in enumerate(stamps)]
    log = write_jsonl(tmp_path / "log.jsonl", rows)
    import_routing(log, tmp_path / "t.parquet", mapping="token=t,time=ts")
    assert mc.Trace.load(tmp_path / "t.parquet").experts[:, 0, 0].tolist() == [1, 0, 2]
    rows[1]["ts"] = "yesterday"
    log = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(MoecacheError, match=r"column .ts. \(time\) holds text that is no ISO 8601"):
        import_routing(log, tmp_path / "u.parquet", mapping="token=t,time=ts")
