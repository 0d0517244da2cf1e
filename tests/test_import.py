"""`moecache import`: routing logs (JSONL, CSV, Parquet) and arrays (.npy, .npz) -> trace v1."""

import gzip
import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import moecache as mc
from moecache.errors import MoecacheError
from moecache.importer import FIELDS, ImportReport, import_routing, parse_mapping

VLLM_MAP = "experts=topk_ids,weights=topk_weights,layer=layer,token=token_idx,seq=req_id"
LAYERS = [1, 3, 5]


def vllm_rows(experts, weights, req_ids, layers=LAYERS):
    """Rows in the shape vLLM router hooks log: one per (token, layer), global token index."""
    rows = []
    for t in range(len(experts)):
        for li, layer in enumerate(layers):
            rows.append({"req_id": req_ids[t], "token_idx": t, "layer": layer,
                         "topk_ids": [int(e) for e in experts[t, li]],
                         "topk_weights": [float(w) for w in weights[t, li]]})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture()
def routed():
    rng = np.random.default_rng(7)
    experts = np.stack([[rng.permutation(16)[:2] for _ in LAYERS] for _ in range(6)])
    weights = rng.random((6, 3, 2)).astype(np.float32)
    req_ids = ["cmpl-a"] * 3 + ["cmpl-b"] * 3
    return experts, weights, req_ids


@pytest.fixture()
def log(tmp_path, routed):
    return write_jsonl(tmp_path / "log.jsonl", vllm_rows(*routed))


def one_line_error(call, *words):
    with pytest.raises(MoecacheError) as info:
        call()
    text = str(info.value)
    assert "\n" not in text, text
    for word in words:
        assert word in text, f"{word!r} not in {text!r}"
    return text


# -- row logs ---------------------------------------------------------------------------

def test_vllm_jsonl_round_trip(tmp_path, log, routed):
    experts, weights, _ = routed
    out = tmp_path / "t.parquet"
    report = import_routing(log, out, mapping=VLLM_MAP, model="Qwen/Qwen1.5-MoE-A2.7B",
                            router_label="baseline", expert_bytes="16MiB")
    tr = mc.Trace.load(out)
    np.testing.assert_array_equal(tr.experts, experts)
    np.testing.assert_array_equal(tr.weights, weights)
    assert tr.seq.tolist() == [0, 0, 0, 1, 1, 1] and tr.pos.tolist() == [0, 1, 2, 0, 1, 2]
    assert tr.step.tolist() == list(range(6)) and (tr.phase == 1).all()
    assert tr.layers.tolist() == LAYERS and tr.num_experts == int(experts.max()) + 1
    meta = tr.meta
    assert meta["model"]["name"] == "Qwen/Qwen1.5-MoE-A2.7B" and meta["router"] == "baseline"
    assert meta["expert_bytes"] == [16 * 2**20] * 3
    cap = meta["capture"]
    assert cap["mode"] == "import" and cap["source"] == str(log)
    assert cap["sha256"] == hashlib.sha256(log.read_bytes()).hexdigest()
    assert cap["mapping"]["experts"] == "topk_ids" and cap["seq_labels"] == ["cmpl-a", "cmpl-b"]
    assert "num_experts" in cap["inferred"] and cap["dropped"] == {"rows": {}, "tokens": {}}
    assert isinstance(report, ImportReport)
    assert report.rows_read == 18 and report.tokens_written == 6 and report.layers == LAYERS
    assert report.top_k == 2 and report.sequences == 2 and "num_experts" in report.inferred
    assert report.dropped_rows == {} and report.problems == [] and "6 tokens" in report.summary()


def test_row_order_in_file_does_not_matter(tmp_path, routed):
    rows = vllm_rows(*routed)
    shuffled = [rows[i] for i in np.random.default_rng(0).permutation(len(rows))]
    out = tmp_path / "t.parquet"
    import_routing(write_jsonl(tmp_path / "log.jsonl", shuffled), out, mapping=VLLM_MAP, num_experts=16)
    tr = mc.Trace.load(out)
    np.testing.assert_array_equal(tr.experts, routed[0])
    assert tr.num_experts == 16


def test_identity_mapping_and_unused_columns(tmp_path):
    rows = [{"token": t, "layer": layer, "experts": [t % 4, 4 + layer], "extra": "x"}
            for t in range(4) for layer in (0, 1)]
    report = import_routing(write_jsonl(tmp_path / "log.jsonl", rows), tmp_path / "t.parquet")
    assert report.mapping == {"experts": "experts", "layer": "layer", "token": "token"}
    assert report.ignored_columns == ["extra"] and "seq" in report.inferred
    assert mc.Trace.load(tmp_path / "t.parquet").experts[:, 1, 1].tolist() == [5, 5, 5, 5]


def test_per_request_token_index_orders(tmp_path):
    # two requests, token index counted within each request; request 1 logged first
    rows = [{"req": r, "i": i, "layer": 0, "ids": [10 * r + i]} for r in (1, 0) for i in (2, 0, 1)]
    log = write_jsonl(tmp_path / "log.jsonl", rows)
    orders = {None: [10, 11, 12, 0, 1, 2], "sequence": [10, 11, 12, 0, 1, 2],
              "token": [10, 0, 11, 1, 12, 2], "file": [12, 10, 11, 2, 0, 1]}
    for order, expected in orders.items():
        out = tmp_path / f"{order}.parquet"
        report = import_routing(log, out, mapping="experts=ids,token=i,seq=req", order=order)
        trace = mc.Trace.load(out)
        assert trace.experts[:, 0, 0].tolist() == expected, order
        assert trace.meta["capture"]["order"] == (order or "sequence")
        assert trace.meta["capture"]["steps_formed"] == report.steps_formed
    assert report.steps_formed == "steps: one per token, tokens in order of first appearance in the file"
    assert mc.Trace.load(tmp_path / "token.parquet").pos.tolist() == [0, 0, 1, 1, 2, 2]
    assert mc.Trace.load(tmp_path / "token.parquet").seq.tolist() == [1, 0, 1, 0, 1, 0]


def test_csv_list_spellings_and_gzip(tmp_path):
    text = ("token_idx,layer,topk_ids,topk_weights,req_id\n"
            '0,0,"[3, 7]","[0.5, 0.5]",7\n'
            "0,1,1 2,0.25 0.75,7\n"
            "1,0,3;4,,7\n"
            '1,1,"[2,6]","[1,0]",7\n')
    (tmp_path / "log.csv").write_text(text)
    with gzip.open(tmp_path / "log.csv.gz", "wt") as handle:
        handle.write(text)
    for name in ("log.csv", "log.csv.gz"):
        out = tmp_path / f"{name}.parquet"
        import_routing(tmp_path / name, out, mapping=VLLM_MAP)
        tr = mc.Trace.load(out)
        assert tr.experts.tolist() == [[[3, 7], [1, 2]], [[3, 4], [2, 6]]]
        assert tr.weights[0].tolist() == [[0.5, 0.5], [0.25, 0.75]] and np.isnan(tr.weights[1, 0]).all()
        assert tr.seq.tolist() == [7, 7]


def test_parquet_source_with_steps_phase_and_token_ids(tmp_path):
    # a prefill chunk of 3 tokens (one step), then 2 decode tokens
    n, ids = 5, np.arange(5 * 2 * 2).reshape(5, 2, 2) % 9
    table = pa.table({
        "t": np.repeat(np.arange(n), 2), "layer": np.tile([2, 4], n),
        "experts": pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1).astype(np.int16)), 2),
        "batch": np.repeat([0, 0, 0, 1, 2], 2), "kind": np.repeat(["prefill"] * 3 + ["decode"] * 2, 2),
        "vocab": np.repeat([11, 12, 13, 14, 15], 2)})
    pq.write_table(table, tmp_path / "log.parquet")
    out = tmp_path / "t.parquet"
    mapping = "token=t,step=batch,phase=kind,token_id=vocab"
    report = import_routing(tmp_path / "log.parquet", out, mapping=mapping)
    tr = mc.Trace.load(out)
    np.testing.assert_array_equal(tr.experts, ids)
    assert tr.step.tolist() == [0, 0, 0, 1, 2] and tr.num_steps == 3 and report.steps == 3
    assert tr.phase.tolist() == [0, 0, 0, 1, 1] and tr.token_id.tolist() == [11, 12, 13, 14, 15]
    # steps derived from the phase column instead: the prefill run is one step
    import_routing(tmp_path / "log.parquet", out, mapping="token=t,phase=kind", step="prefill",
                   overwrite=True)
    assert mc.Trace.load(out).step.tolist() == [0, 0, 0, 1, 2]
    # a moecache trace is itself a row log with the identity mapping (format v2: its ids
    # column is binary, read as lists of int16)
    back = tmp_path / "back.parquet"
    import_routing(out, back, num_experts=9)
    np.testing.assert_array_equal(mc.Trace.load(back).experts, ids)
    # a binary column of some other log is not guessed at
    pq.write_table(table.set_column(2, "experts", pa.array([b"\x01\x00\x02\x00"] * 10, pa.binary(4))),
                   tmp_path / "binary.parquet")
    with pytest.raises(MoecacheError, match="must hold lists of numbers, got fixed_size_binary"):
        import_routing(tmp_path / "binary.parquet", tmp_path / "b.parquet", mapping=mapping)


def test_nested_json_objects_and_json_array(tmp_path):
    rows = [{"meta": {"req": "r1", "tok": t}, "layer": 0, "routing": {"ids": [t, t + 1]}} for t in range(3)]
    (tmp_path / "log.json").write_text(json.dumps(rows))
    out = tmp_path / "t.parquet"
    import_routing(tmp_path / "log.json", out, mapping="experts=routing.ids,token=meta.tok,seq=meta.req")
    assert mc.Trace.load(out).experts[:, 0].tolist() == [[0, 1], [1, 2], [2, 3]]


# -- arrays -----------------------------------------------------------------------------

def test_npy_and_npz(tmp_path):
    rng = np.random.default_rng(3)
    experts = np.stack([[rng.permutation(8)[:2] for _ in range(3)] for _ in range(10)]).astype(np.int32)
    np.save(tmp_path / "r.npy", experts)
    import_routing(tmp_path / "r.npy", tmp_path / "a.parquet", num_experts=8)
    tr = mc.Trace.load(tmp_path / "a.parquet")
    np.testing.assert_array_equal(tr.experts, experts)
    assert tr.layers.tolist() == [0, 1, 2] and tr.num_experts == 8

    weights = rng.random(experts.shape).astype(np.float32)
    seq = np.repeat([0, 1], 5)
    np.savez(tmp_path / "r.npz", experts=experts, weights=weights, seq=seq, layers=np.array([9, 3, 5]))
    report = import_routing(tmp_path / "r.npz", tmp_path / "b.parquet", expert_bytes=[1, 2, 3])
    tr = mc.Trace.load(tmp_path / "b.parquet")
    assert tr.layers.tolist() == [3, 5, 9]  # the layer axis is put in ascending layer order
    np.testing.assert_array_equal(tr.experts, experts[:, [1, 2, 0]])
    np.testing.assert_array_equal(tr.weights, weights[:, [1, 2, 0]])
    assert tr.seq.tolist() == seq.tolist() and tr.pos.tolist() == [0, 1, 2, 3, 4] * 2
    assert tr.meta["expert_bytes"] == [1, 2, 3]  # one per MoE layer, in ascending layer order
    assert report.rows_read == 30 and report.mapping == {}
    import_routing(tmp_path / "r.npy", tmp_path / "c.parquet", layers=[9, 3, 5])
    tr = mc.Trace.load(tmp_path / "c.parquet")
    assert tr.layers.tolist() == [3, 5, 9]
    np.testing.assert_array_equal(tr.experts, experts[:, [1, 2, 0]])


@pytest.mark.parametrize("array, words", [
    (np.zeros((4, 3), np.int64), ["shape (tokens, layers, K)", "(4, 3, 1)"]),
    (np.zeros((4, 3, 2), np.float32), ["integers", "float32"]),
    (np.zeros((0, 3, 2), np.int64), ["empty"]),
    (np.full((2, 1, 2), -1, np.int64), ["negative expert id"]),
    (np.zeros((2, 1, 2), np.int64), ["repeated"]),
])
def test_npy_errors(tmp_path, array, words):
    np.save(tmp_path / "r.npy", array)
    path = tmp_path / "r.npy"
    one_line_error(lambda: import_routing(path, tmp_path / "t.parquet"), str(path), *words)


def test_npz_errors(tmp_path):
    good = np.arange(6).reshape(3, 1, 2)
    cases = {
        "unknown": ({"experts": good, "expert": good}, ["unknown array 'expert'"]),
        "weights": ({"experts": good, "weights": np.ones((3, 1, 3))}, ["'weights' has shape"]),
        "seq": ({"experts": good, "seq": np.zeros(2, int)}, ["'seq' must have shape (3,)"]),
        "layers": ({"experts": good, "layers": np.array([1, 2])}, ["'layers' must be 1 integers"]),
        "warmup": ({"experts": good, "seq": np.array([-1, 0, 0])},
                   ["1 warm-up token with a negative seq", "--drop-warmup"]),
    }
    for name, (arrays, words) in cases.items():
        path = tmp_path / f"{name}.npz"
        np.savez(path, **arrays)
        one_line_error(lambda p=path: import_routing(p, tmp_path / "t.parquet"), str(path), *words)
    np.save(tmp_path / "r.npy", good)
    one_line_error(lambda: import_routing(tmp_path / "r.npy", tmp_path / "t.parquet", mapping="experts=x"),
                   str(tmp_path / "r.npy"), "--map applies to row logs")
    report = import_routing(tmp_path / "warmup.npz", tmp_path / "t.parquet", on_warmup="drop")
    assert report.tokens_written == 2 and report.dropped_rows == {"warmup": 1}


# -- problems ---------------------------------------------------------------------------

def drop_row(rows, **match):
    return [r for r in rows if any(r[k] != v for k, v in match.items())]


def test_missing_layer(tmp_path, routed):
    rows = drop_row(vllm_rows(*routed), token_idx=2, layer=3)
    path = write_jsonl(tmp_path / "log.jsonl", rows)
    one_line_error(lambda: import_routing(path, tmp_path / "t.parquet", mapping=VLLM_MAP),
                   str(path), "1 of 6 tokens lack rows", "token 2 (seq 'cmpl-a') has no row for layer 3",
                   "--drop-problems")
    report = import_routing(path, tmp_path / "t.parquet", mapping=VLLM_MAP, on_problem="drop")
    assert report.dropped_tokens == {"missing_layers": 1} and report.dropped_rows == {"missing_layers": 2}
    assert report.tokens_written == 5 and len(report.problems) == 1
    tr = mc.Trace.load(tmp_path / "t.parquet")
    np.testing.assert_array_equal(tr.experts, np.delete(routed[0], 2, axis=0))
    assert tr.meta["capture"]["dropped"]["tokens"] == {"missing_layers": 1}


def test_identical_and_conflicting_duplicates(tmp_path, routed):
    rows = vllm_rows(*routed)
    identical = write_jsonl(tmp_path / "same.jsonl", rows + [rows[4]])
    one_line_error(lambda: import_routing(identical, tmp_path / "t.parquet", mapping=VLLM_MAP),
                   str(identical), "1 duplicate (token, layer) row, all identical copies",
                   "token 1 (seq 'cmpl-a'), layer 3")
    report = import_routing(identical, tmp_path / "t.parquet", mapping=VLLM_MAP, on_problem="drop")
    assert report.dropped_rows == {"duplicate": 1} and report.dropped_tokens == {}
    np.testing.assert_array_equal(mc.Trace.load(tmp_path / "t.parquet").experts, routed[0])

    other = dict(rows[4], topk_ids=[15 - e for e in rows[4]["topk_ids"]])
    conflicting = write_jsonl(tmp_path / "conflict.jsonl", rows + [other])
    one_line_error(lambda: import_routing(conflicting, tmp_path / "u.parquet", mapping=VLLM_MAP),
                   str(conflicting), "0 identical, 1 conflicting in 1 token",
                   f"hold {rows[4]['topk_ids']} and")
    report = import_routing(conflicting, tmp_path / "u.parquet", mapping=VLLM_MAP, on_problem="drop")
    assert report.dropped_tokens == {"conflict": 1} and report.dropped_rows == {"conflict": 4}
    np.testing.assert_array_equal(mc.Trace.load(tmp_path / "u.parquet").experts, np.delete(routed[0], 1, 0))


def test_rows_of_one_token_disagreeing(tmp_path):
    rows = [{"token": t, "layer": layer, "experts": [layer], "step": t + (t == 1 and layer == 1)}
            for t in range(3) for layer in (0, 1)]
    path = write_jsonl(tmp_path / "log.jsonl", rows)
    one_line_error(lambda: import_routing(path, tmp_path / "t.parquet"), str(path),
                   "1 token whose rows disagree on step", "token 1")
    report = import_routing(path, tmp_path / "t.parquet", on_problem="drop")
    assert report.dropped_tokens == {"conflict": 1} and report.tokens_written == 2


def test_stray_layer_and_declared_layers(tmp_path, routed):
    rows = vllm_rows(*routed)
    path = write_jsonl(tmp_path / "log.jsonl", rows + [dict(rows[0], layer=40)])
    out = tmp_path / "t.parquet"
    one_line_error(lambda: import_routing(path, out, mapping=VLLM_MAP), str(path),
                   "5 of 6 tokens lack rows", "layer 40 is logged for 1 token",
                   "if layer 40 is no MoE layer, name the MoE layers with --layers")
    # dropping 5 of 6 tokens for one stray row would be worse than the problem
    one_line_error(lambda: import_routing(path, out, mapping=VLLM_MAP, on_problem="drop"),
                   str(path), "not dropping: that would discard most tokens")
    one_line_error(lambda: import_routing(path, out, mapping=VLLM_MAP, layers=LAYERS), str(path),
                   "1 row of layers outside --layers (layers 40; first: row 19")
    report = import_routing(path, out, mapping=VLLM_MAP, layers=LAYERS, on_problem="drop")
    assert report.dropped_rows == {"other_layers": 1}
    np.testing.assert_array_equal(mc.Trace.load(out).experts, routed[0])
    # a declared layer that no row logs: every token misses it
    other = tmp_path / "u.parquet"
    one_line_error(lambda: import_routing(path, other, mapping=VLLM_MAP, layers=[*LAYERS, 7, 40]), str(path),
                   "6 of 6 tokens lack rows", "has no row for layer 7")
    with pytest.raises(MoecacheError, match="distinct non-negative"):
        import_routing(path, out, layers=[1, 1])


def test_warmup_rows(tmp_path, routed):
    rows = vllm_rows(*routed)
    dummy = [{"req_id": None, "token_idx": 0, "layer": layer, "topk_ids": [0, 1], "topk_weights": [1, 0]}
             for layer in LAYERS]
    negative = [dict(r, token_idx=-1) for r in rows[:3]]
    path = write_jsonl(tmp_path / "log.jsonl", dummy + negative + rows)
    one_line_error(lambda: import_routing(path, tmp_path / "t.parquet", mapping=VLLM_MAP),
                   str(path), "6 warm-up rows", "row 1", "seq null", "--drop-warmup")
    report = import_routing(path, tmp_path / "t.parquet", mapping=VLLM_MAP, on_warmup="drop")
    assert report.dropped_rows == {"warmup": 6} and report.tokens_written == 6
    np.testing.assert_array_equal(mc.Trace.load(tmp_path / "t.parquet").experts, routed[0])


def test_skip_warmup_drops_first_tokens(tmp_path, log, routed):
    report = import_routing(log, tmp_path / "t.parquet", mapping=VLLM_MAP, skip_warmup=2)
    assert report.dropped_tokens == {"skip_warmup": 2} and report.dropped_rows == {"skip_warmup": 6}
    tr = mc.Trace.load(tmp_path / "t.parquet")
    np.testing.assert_array_equal(tr.experts, routed[0][2:])
    assert tr.pos.tolist() == [0, 0, 1, 2]  # positions are counted over the kept tokens
    one_line_error(lambda: import_routing(log, tmp_path / "u.parquet", mapping=VLLM_MAP, skip_warmup=6),
                   str(log), "drops all 6 tokens")


@pytest.mark.parametrize("change, words", [
    ({"topk_ids": [1, 2, 3]}, ["inconsistent K", "2 or 3 experts", "row 5 holds 3"]),
    ({"topk_ids": [1, 16]}, ["expert id 16 >= num_experts 16", "row 5"]),
    ({"topk_ids": [-1, 2]}, ["negative expert id -1", "row 5"]),
    ({"topk_ids": [4, 4]}, ["repeated within one row", "row 5"]),
    ({"topk_ids": None}, ["1 row without experts", "row 5"]),
    ({"topk_ids": []}, ["empty experts list", "row 5"]),
    ({"topk_ids": [1.5, 2]}, ["non-integer expert id", "row 5"]),
    ({"topk_weights": [0.5]}, ["row 5 holds 1 weights", "2 experts"]),
    ({"layer": None}, ["'layer' is empty in 1 row", "row 5"]),
])
def test_malformed_rows_are_errors_even_when_dropping(tmp_path, routed, change, words):
    rows = vllm_rows(*routed)
    rows[4] = dict(rows[4], **change)
    path = write_jsonl(tmp_path / "log.jsonl", rows)
    for on_problem in ("error", "drop"):
        text = one_line_error(lambda p=on_problem: import_routing(
            path, tmp_path / "t.parquet", mapping=VLLM_MAP, num_experts=16, on_problem=p), str(path), *words)
        assert "--drop-problems" not in text


def test_mapping_errors(tmp_path, log):
    def run(mapping):
        return lambda: import_routing(log, tmp_path / "t.parquet", mapping=mapping)

    one_line_error(run("experts=nope,token=token_idx"), str(log), "no column 'nope' (mapped to experts)",
                   "topk_ids")
    one_line_error(run("experts:topk_ids"), str(log), "bad --map item 'experts:topk_ids'", "FIELD=COLUMN")
    one_line_error(run("expert=topk_ids"), str(log), "unknown field 'expert'")
    one_line_error(run("experts=topk_ids"), str(log), "no token column")
    one_line_error(run("token=token_idx"), str(log), "no experts column")


def test_parse_mapping():
    assert parse_mapping(VLLM_MAP) == {"experts": "topk_ids", "weights": "topk_weights", "layer": "layer",
                                       "token": "token_idx", "seq": "req_id"}
    assert parse_mapping(" experts = ids , ") == {"experts": "ids"}
    assert parse_mapping(None) == {} and parse_mapping("") == {}
    assert parse_mapping({"seq": "a=b"}) == {"seq": "a=b"}
    assert set(FIELDS) >= {"experts", "weights", "layer", "token", "seq", "pos", "step", "phase", "token_id"}
    for bad, word in [("experts", "bad --map item"), ("experts=", "bad --map item"),
                      ("=x", "bad --map item"), ("a=b=c", "bad --map item"),
                      ("seq=a,seq=b", "mapped twice"), ("foo=x", "unknown field")]:
        with pytest.raises(MoecacheError, match=word):
            parse_mapping(bad)


def test_file_errors(tmp_path, log):
    out = tmp_path / "t.parquet"
    missing = tmp_path / "nope.jsonl"
    one_line_error(lambda: import_routing(missing, out), str(missing), "no such file")
    for name, text in [("empty.jsonl", ""), ("blank.jsonl", "\n\n"), ("empty.csv", ""),
                       ("header.csv", "token,layer,experts\n")]:
        (tmp_path / name).write_text(text)
        one_line_error(lambda n=name: import_routing(tmp_path / n, out), str(tmp_path / name), "no rows")
    (tmp_path / "bad.jsonl").write_text('{"token": 0, "layer": 0, "experts": [1]}\n{"token": 1,\n')
    one_line_error(lambda: import_routing(tmp_path / "bad.jsonl", out), str(tmp_path / "bad.jsonl"),
                   "line 2 is not valid JSON")
    (tmp_path / "x.txt").write_text("hello")
    one_line_error(lambda: import_routing(tmp_path / "x.txt", out), str(tmp_path / "x.txt"),
                   "unknown log format")
    (tmp_path / "fake.parquet").write_text("hello")
    one_line_error(lambda: import_routing(tmp_path / "fake.parquet", out), str(tmp_path / "fake.parquet"),
                   "not a Parquet file")
    import_routing(log, out, mapping=VLLM_MAP)
    one_line_error(lambda: import_routing(log, out, mapping=VLLM_MAP), str(out), "already exists", "--force")
    import_routing(log, out, mapping=VLLM_MAP, overwrite=True, num_experts=16)
    assert mc.Trace.load(out).num_experts == 16
    one_line_error(lambda: import_routing(log, out, mapping=VLLM_MAP, on_problem="ignore"), "on_problem")


# -- property: any trace survives export to vLLM-style rows and import ------------------

@pytest.mark.parametrize("seed", range(4))
def test_synthetic_trace_round_trips_through_jsonl(tmp_path, seed):
    rng = np.random.default_rng(seed)
    layers, experts, top_k = int(rng.integers(1, 4)), int(rng.integers(4, 40)), int(rng.integers(1, 4))
    base = mc.synth(layers=layers, experts=experts, top_k=top_k, tokens=int(rng.integers(5, 60)),
                    sequences=int(rng.integers(1, 4)), prompt_len=int(rng.integers(0, 4)), seed=seed)
    weights = rng.random(base.experts.shape).astype(np.float32)
    model_layers = sorted(rng.choice(64, layers, replace=False).tolist())
    rows = [{"req_id": f"req-{base.seq[t]}", "token_idx": t, "layer": model_layers[li],
             "topk_ids": base.experts[t, li].tolist(), "topk_weights": weights[t, li].tolist(),
             "step": int(base.step[t]), "phase": ["prefill", "decode"][base.phase[t]]}
            for t in range(base.num_tokens) for li in range(layers)]
    rows = [rows[i] for i in rng.permutation(len(rows))]
    out = tmp_path / "t.parquet"
    import_routing(write_jsonl(tmp_path / "log.jsonl", rows), out, mapping=VLLM_MAP, num_experts=experts)
    back = mc.Trace.load(out)
    np.testing.assert_array_equal(back.experts, base.experts)
    np.testing.assert_array_equal(back.weights, weights)
    np.testing.assert_array_equal(back.seq, base.seq)
    np.testing.assert_array_equal(back.step, base.step)
    np.testing.assert_array_equal(back.phase, base.phase)
    np.testing.assert_array_equal(back.pos, base.pos)
    assert back.layers.tolist() == model_layers and back.num_experts == experts
    def hits(trace):
        return mc.replay(trace, policy="lru", capacity=top_k, per_token=True).hits

    assert hits(back) == hits(base)


def test_cli_import_reports_and_exits_2(tmp_path):
    from click.testing import CliRunner

    from moecache.cli import cli

    rows = [{"req_id": "r", "token_idx": t, "layer": layer, "topk_ids": [t % 4, (t + 1) % 4]}
            for t in range(4) for layer in (1, 3)]
    rows.append({"req_id": "r", "token_idx": 4, "layer": 1, "topk_ids": [0, 1]})
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["import", str(log), "--out", str(tmp_path / "t.parquet"),
            "--map", "experts=topk_ids,token=token_idx,seq=req_id"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and "--drop-problems" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    result = CliRunner().invoke(cli, [*args, "--drop-problems"])
    assert result.exit_code == 0 and "missing_layers" in result.stdout
    assert mc.Trace.load(tmp_path / "t.parquet").num_tokens == 4
