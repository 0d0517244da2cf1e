"""Third-party routing formats: vLLM routed experts, fitz-tec RTRACE01 (moecache.log_formats)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import moecache as mc
from moecache.cli import cli
from moecache.errors import MoecacheError
from moecache.importer import import_routing
from moecache.log_formats import READERS, read_rtrace, read_vllm, sniff
from moecache.reroute import reroute

# -- writers that follow the published layouts ---------------------------------------------


def write_rtrace(path, records, num_experts, *, magic=b"RTRACE01", version=0):
    """fitz-tec's layout: magic, int32 n_experts, int32 version, then (int32 token, int32 layer,
    float32 probs[n_experts]) per record, little-endian."""
    with open(path, "wb") as handle:
        handle.write(magic + np.array([num_experts, version], "<i4").tobytes())
        for token, layer, probs in records:
            handle.write(np.array([token, layer], "<i4").tobytes() + np.asarray(probs, "<f4").tobytes())
    return path


def vllm_request(request_id, prompt, generated, routed):
    """What a user saves per finished request: RequestOutput / CompletionOutput fields."""
    return {"request_id": request_id, "prompt_token_ids": list(prompt), "token_ids": list(generated),
            "routed_experts": np.asarray(routed).tolist()}


def write_jsonl(path, objects):
    path.write_text("".join(json.dumps(obj) + "\n" for obj in objects))
    return path


def one_line_error(call, *args, **kwargs) -> str:
    with pytest.raises(MoecacheError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# -- RTRACE01 ------------------------------------------------------------------------------

# 3 tokens x MoE layers {0, 2} (layer 1 is dense: never recorded), E = 5.
PROBS = {
    (0, 0): [0.10, 0.40, 0.05, 0.30, 0.15],
    (0, 2): [0.20, 0.20, 0.50, 0.00, 0.10],   # tie between experts 0 and 1
    (1, 0): [0.60, 0.10, 0.10, 0.10, 0.10],
    (1, 2): [0.05, 0.05, 0.05, 0.05, 0.80],
    (2, 0): [0.00, 0.00, 0.25, 0.25, 0.50],
    (2, 2): [0.30, 0.30, 0.20, 0.10, 0.10],
}
# top-2, highest first, ties -> smaller id
TOP2 = [[[1, 3], [2, 0]], [[0, 1], [4, 0]], [[4, 2], [0, 1]]]


def llama_order():
    """Records as a llama.cpp graph writes them: per batch, layer by layer, its tokens in order."""
    batches = [[0, 1], [2]]
    return [(t, layer, PROBS[t, layer]) for batch in batches for layer in (0, 2) for t in batch]


def test_rtrace_exact_arrays(tmp_path):
    path = write_rtrace(tmp_path / "trace.bin", llama_order(), 5)
    out = read_rtrace(path, "trace.bin", top_k=2)
    assert set(out) == {"experts", "weights", "logits", "layers", "num_experts"}
    assert out["experts"].tolist() == TOP2
    assert out["layers"].tolist() == [0, 2]
    assert int(out["num_experts"]) == 5 and out["num_experts"].shape == ()
    probs = np.array([[PROBS[t, layer] for layer in (0, 2)] for t in range(3)], np.float32)
    np.testing.assert_array_equal(out["weights"], np.take_along_axis(probs, np.array(TOP2), axis=2))
    expected = np.log(np.maximum(probs, np.finfo(np.float32).tiny))
    np.testing.assert_array_equal(out["logits"], expected)
    assert out["logits"].min() == pytest.approx(-87.336, abs=1e-3)   # the zero probabilities


def test_rtrace_softmax_of_logits_gives_back_the_probabilities(tmp_path):
    path = write_rtrace(tmp_path / "trace.bin", llama_order(), 5)
    logits = read_rtrace(path, "t", top_k=1)["logits"].astype(np.float64)
    soft = np.exp(logits) / np.exp(logits).sum(axis=2, keepdims=True)
    probs = np.array([[PROBS[t, layer] for layer in (0, 2)] for t in range(3)])
    np.testing.assert_allclose(soft, probs / probs.sum(axis=2, keepdims=True), atol=1e-6)


def test_rtrace_record_order_does_not_matter(tmp_path):
    records = llama_order()
    a = read_rtrace(write_rtrace(tmp_path / "a.bin", records, 5), "a", top_k=3)
    b = read_rtrace(write_rtrace(tmp_path / "b.bin", records[::-1], 5), "b", top_k=3)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_rtrace_needs_top_k(tmp_path):
    path = write_rtrace(tmp_path / "t.bin", llama_order(), 5)
    assert "--top-k" in one_line_error(read_rtrace, path, "t.bin")
    assert "exceeds the trace's n_experts = 5" in one_line_error(read_rtrace, path, "t.bin", top_k=6)
    assert "positive integer" in one_line_error(read_rtrace, path, "t.bin", top_k=0)
    assert "positive integer" in one_line_error(read_rtrace, path, "t.bin", top_k=True)


@pytest.mark.parametrize("cut, message", [
    (10, "t.bin: truncated RTRACE01 header (10 of 16 bytes)"),
    (16 + 28 + 5,
     "t.bin: truncated RTRACE01 trace: the last record has 5 of 28 bytes (after 1 complete records)"),
    (16, "t.bin: RTRACE01 trace holds no records"),
])
def test_rtrace_truncated(tmp_path, cut, message):
    path = write_rtrace(tmp_path / "t.bin", llama_order(), 5)
    path.write_bytes(path.read_bytes()[:cut])
    assert one_line_error(read_rtrace, path, "t.bin", top_k=2) == message


def test_rtrace_wrong_magic_version_and_header(tmp_path):
    bad = write_rtrace(tmp_path / "m.bin", llama_order(), 5, magic=b"RTRACE02")
    assert one_line_error(read_rtrace, bad, "m.bin", top_k=2) == (
        "m.bin: not an RTRACE01 trace (starts with b'RTRACE02')")
    assert sniff(bad) is None
    old = write_rtrace(tmp_path / "v.bin", llama_order(), 5, version=1)
    message = one_line_error(read_rtrace, old, "v.bin", top_k=2)
    assert message == "v.bin: RTRACE01 header version 1 is not supported (known: 0)"
    none = write_rtrace(tmp_path / "e.bin", [], 0)
    assert "n_experts = 0" in one_line_error(read_rtrace, none, "e.bin", top_k=1)


def test_rtrace_corrupt_records(tmp_path):
    twice = write_rtrace(tmp_path / "d.bin", [*llama_order(), (1, 2, PROBS[1, 2])], 5)
    message = one_line_error(read_rtrace, twice, "d", top_k=2)
    assert message == "d: token 1, layer 2 is recorded twice (records 3 and 6; several runs in one file?)"
    missing = write_rtrace(tmp_path / "m.bin", [r for r in llama_order() if r[:2] != (0, 2)], 5)
    message = one_line_error(read_rtrace, missing, "m", top_k=2)
    assert "1 of 3 tokens lack records for some of the 2 MoE layers (first: token 0 has no layer 2)" \
        in message
    nan = write_rtrace(tmp_path / "n.bin", [(0, 0, [0.5, np.nan, 0.5, 0, 0])], 5)
    assert "token 0, layer 0: expert 1 has probability nan" in one_line_error(read_rtrace, nan, "n", top_k=2)
    negative = write_rtrace(tmp_path / "s.bin", [(0, -1, PROBS[0, 0])], 5)
    assert "record 0 has a negative layer index (-1)" in one_line_error(read_rtrace, negative, "s", top_k=2)


# -- vLLM routed experts -------------------------------------------------------------------

# 3 hidden layers, layer 0 dense (vLLM leaves it 0), K = 2.
REQ_A = np.array([[[0, 0], [3, 1], [2, 5]], [[0, 0], [1, 4], [5, 0]], [[0, 0], [2, 3], [1, 2]]])
REQ_B = np.array([[[0, 0], [7, 6], [4, 3]], [[0, 0], [6, 0], [3, 4]]])


def test_vllm_jsonl_exact_arrays(tmp_path):
    # request A: 2 prompt + 2 generated tokens -> 3 routed; request B: 1 + 2 -> 2 routed
    path = write_jsonl(tmp_path / "out.jsonl", [vllm_request("cmpl-a", [11, 12], [13, 14], REQ_A),
                                                 vllm_request("cmpl-b", [21], [22, 23], REQ_B)])
    assert sniff(path) == "vllm"
    out = read_vllm(path, "out.jsonl")
    assert set(out) == {"experts", "layers", "seq", "token_id"}
    np.testing.assert_array_equal(out["experts"], np.concatenate([REQ_A, REQ_B])[:, 1:])
    assert out["layers"].tolist() == [1, 2]
    assert out["seq"].tolist() == [0, 0, 0, 1, 1]
    assert out["token_id"].tolist() == [11, 12, 13, 21, 22]


def test_vllm_request_output_shape_and_json_list(tmp_path):
    request = {"request_id": "7", "prompt_token_ids": [1, 2],
               "outputs": [{"index": 0, "token_ids": [3, 4], "routed_experts": REQ_A.tolist()},
                           {"index": 1, "token_ids": [5], "routed_experts": REQ_A[:2].tolist()}]}
    path = tmp_path / "outs.json"
    path.write_text(json.dumps([request, vllm_request("8", [9], [10, 11], REQ_B)]))
    assert sniff(path) == "vllm"
    out = read_vllm(path, "outs.json")
    assert out["seq"].tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert out["token_id"].tolist() == [1, 2, 3, 1, 2, 9, 10]
    np.testing.assert_array_equal(out["experts"], np.concatenate([REQ_A, REQ_A[:2], REQ_B])[:, 1:])


def test_vllm_npz_of_per_request_arrays_keeps_file_order(tmp_path):
    path = tmp_path / "routed.npz"
    np.savez(path, **{"req-9": REQ_B.astype(np.int32), "req-10": REQ_A.astype(np.int32)})
    assert sniff(path) == "vllm"
    out = read_vllm(path, "routed.npz")
    assert set(out) == {"experts", "layers", "seq"}   # no token ids in an .npz of arrays
    np.testing.assert_array_equal(out["experts"], np.concatenate([REQ_B, REQ_A])[:, 1:])
    assert out["seq"].tolist() == [0, 0, 1, 1, 1]


def test_vllm_ids_without_token_lists_and_without_dense_layers(tmp_path):
    routed = REQ_A[:, 1:]
    path = write_jsonl(tmp_path / "r.jsonl", [{"routed_experts": routed.tolist()}])
    out = read_vllm(path, "r.jsonl")
    assert out["layers"].tolist() == [0, 1] and "token_id" not in out
    np.testing.assert_array_equal(out["experts"], routed)


@pytest.mark.parametrize("obj, message", [
    (vllm_request("a", [1, 2], [3, 4, 5], REQ_A),
     "line 1 (request_id 'a'): routed_experts has 3 tokens, expected 4 (2 prompt + 3 generated - 1"),
    ({"prompt_token_ids": [1, 2, 3, 4], "routed_experts": REQ_A.tolist()},
     "routed_experts has 3 tokens, fewer than the 4 prompt tokens"),
    ({"request_id": "a", "routed_experts": None}, "routed_experts is missing or null (was the engine started "
                                                   "with enable_return_routed_experts=True?)"),
    ({"type": "meta", "model": "x"},
     "line 1 has no 'routed_experts' and no 'outputs' list (keys: model, type)"),
    ({"routed_experts": [[[1, 2], [3]]]},
     "routed_experts is not a rectangular (tokens, layers, top_k) array"),
    ({"routed_experts": [[[1.5, 2.0]]]},
     "must be integer ids shaped (tokens, layers, top_k), got shape (1, 1, 2) dtype float64"),
    ({"routed_experts": [[1, 2]]}, "got shape (1, 2)"),
    ({"routed_experts": [[[1, 2]]], "prompt_token_ids": ["a"]}, "prompt_token_ids must be a list of integer"),
    ({"routed_experts": [[[0], [3]], [[0], [2]]]}, "layer 0 routes every token to expert 0 with top_k 1"),
    ({"routed_experts": [[[4, 0], [1, 2]], [[1, 3], [0, 0]]]},
     "line 1: token 1, layer 1 has no routing (all 2 ids are 0) in a MoE layer"),
    ({"routed_experts": [[[0, 0]], [[0, 0]]]}, "every expert id is 0 in every layer"),
])
def test_vllm_bad_requests(tmp_path, obj, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [obj])
    assert message in one_line_error(read_vllm, path, "bad.jsonl")


def test_vllm_bad_files(tmp_path):
    mixed = write_jsonl(tmp_path / "m.jsonl", [{"routed_experts": REQ_A.tolist()},
                                               {"routed_experts": REQ_A[:, :2].tolist()}])
    assert one_line_error(read_vllm, mixed, "m.jsonl") == (
        "m.jsonl: line 2: routed_experts has 2 layers x top_k 2, the first request 3 x 2")
    broken = tmp_path / "b.jsonl"
    broken.write_text(json.dumps({"routed_experts": REQ_A.tolist()}) + "\n{oops\n")
    assert one_line_error(read_vllm, broken, "b.jsonl").startswith("b.jsonl: line 2 is not valid JSON")
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n")
    assert one_line_error(read_vllm, empty, "e.jsonl") == "e.jsonl: no request with routed_experts"
    pickled = tmp_path / "p.npz"
    np.savez(pickled, a=np.array([{"x": 1}], dtype=object))
    assert "array 'a' is damaged or holds Python objects" in one_line_error(read_vllm, pickled, "p.npz")
    flat = tmp_path / "f.npz"
    np.savez(flat, weights=np.ones((2, 3, 2)))
    assert "array 'weights': routed_experts must be integer ids" in one_line_error(read_vllm, flat, "f.npz")
    not_zip = tmp_path / "z.npz"
    not_zip.write_bytes(b"PK\x03\x04 junk")
    assert "z.npz: not a readable .npz archive" in one_line_error(read_vllm, not_zip, "z.npz")
    assert "d: not a regular file" in one_line_error(read_vllm, tmp_path, "d")


# -- sniffing -------------------------------------------------------------------------------

def test_sniff(tmp_path):
    assert sniff(write_rtrace(tmp_path / "router_trace.bin", llama_order(), 5)) == "rtrace"
    assert sniff(write_rtrace(tmp_path / "trace.jsonl", llama_order(), 5)) == "rtrace"
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"layer": 1, "token": 0, "routed_experts": [3, 1]}])
    assert sniff(rows) is None
    own = tmp_path / "own.npz"
    np.savez(own, experts=REQ_A, seq=np.zeros(3, int))
    assert sniff(own) is None
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    assert sniff(tmp_path / "bad.npz") is None
    assert sniff(tmp_path / "missing.bin") is None
    assert sniff(tmp_path) is None
    assert set(READERS) == {"vllm", "rtrace"}


# -- llama.cpp recipe (docs/llama-cpp-logs.md) ------------------------------------------------

DOC = Path(__file__).resolve().parents[1] / "docs" / "llama-cpp-logs.md"


def doc_script(first_line):
    """The fenced python block of the doc that starts with ``first_line``."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    (script,) = [b for b in blocks if b.startswith(first_line)]
    return script


# What capture_routing.py writes: one line per (forward pass, MoE layer), layers 1 and 3, K = 2.
# seq 0: a 3-token prompt pass, then 2 decode passes; seq 1: a 2-token prompt pass, 1 decode pass.
PASSES = [(0, [[[1, 2], [0, 5]], [[3, 4], [6, 7]], [[1, 5], [2, 3]]]),
          (0, [[[2, 1], [5, 0]]]),
          (0, [[[1, 2], [0, 5]]]),
          (1, [[[7, 6], [4, 3]], [[3, 0], [1, 2]]]),
          (1, [[[7, 0], [4, 1]]])]


def capture_log(path, passes=PASSES):
    lines = []
    for batch, (seq, tokens) in enumerate(passes):
        for li, layer in enumerate((1, 3)):
            topk = [token[li] for token in tokens]
            lines.append(json.dumps({"seq": seq, "batch": batch, "layer": layer, "topk": topk}))
    path.write_text("\n".join(lines) + "\n")
    return path


def run_converter(tmp_path, raw):
    script = tmp_path / "routing_to_npz.py"
    script.write_text(doc_script("# routing_to_npz.py"))
    out = tmp_path / "routing.npz"
    done = subprocess.run([sys.executable, str(script), str(raw), str(out)], capture_output=True, text=True,
                          timeout=60)
    return done, out


def test_llama_cpp_converter_and_import(tmp_path):
    done, out = run_converter(tmp_path, capture_log(tmp_path / "raw.jsonl"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{out}: 8 tokens, 5 steps, MoE layers [1, 3]"
    with np.load(out) as arrays:
        experts, seq, step = arrays["experts"], arrays["seq"], arrays["step"]
        assert arrays["layers"].tolist() == [1, 3]
    assert experts.tolist() == [token for _, tokens in PASSES for token in tokens]
    assert seq.tolist() == [0, 0, 0, 0, 0, 1, 1, 1]
    assert step.tolist() == [0, 0, 0, 1, 2, 3, 3, 4]
    import_routing(out, tmp_path / "t.parquet", num_experts=8)
    imported = mc.Trace.load(tmp_path / "t.parquet")
    direct = mc.Trace.from_arrays(experts, num_experts=8, seq=seq, layers=[1, 3], step=step)
    assert imported.meta["moe_layers"] == [1, 3]
    for policy in ("lru", "opt"):
        assert mc.replay(imported, policy, 6).hits == mc.replay(direct, policy, 6).hits
    assert mc.replay(imported, "lru", 6).requests == 31    # step unions: 5 + 6, 2 + 2, 2 + 2, 4 + 4, 2 + 2


def test_llama_cpp_converter_refuses_a_short_last_layer(tmp_path):
    raw = capture_log(tmp_path / "raw.jsonl")
    lines = raw.read_text().splitlines()
    record = json.loads(lines[1])                 # pass 0, layer 3: only the last prompt token ran
    record["topk"] = record["topk"][-1:]
    raw.write_text("\n".join([lines[0], json.dumps(record), *lines[2:]]) + "\n")
    done, out = run_converter(tmp_path, raw)
    assert done.returncode == 1 and not out.exists()
    assert done.stderr.strip() == (f"{raw}: pass 0 has layers [1, 3] with token counts [1, 3], "
                                   "expected layers [1, 3] with one count (capture with logits_all=True)")


# -- end to end: `moecache import` of each format, then replay / reroute --------------------------

def cli_import(*args):
    result = CliRunner().invoke(cli, ["import", *map(str, args)])
    return result.exit_code, result.output


def assert_same_replays(imported, direct, capacity):
    for policy in ("lru", "lfu", "opt"):
        a, b = mc.replay(imported, policy, capacity), mc.replay(direct, policy, capacity)
        assert (a.requests, a.hits, a.misses) == (b.requests, b.hits, b.misses)


def test_vllm_import_end_to_end(tmp_path):
    path = write_jsonl(tmp_path / "out.jsonl", [vllm_request("cmpl-a", [11, 12], [13, 14], REQ_A),
                                                 vllm_request("cmpl-b", [21], [22, 23], REQ_B)])
    code, output = cli_import(path, "--out", tmp_path / "v.parquet", "--num-experts", 8)
    assert code == 0, output
    imported = mc.Trace.load(tmp_path / "v.parquet")
    experts = np.concatenate([REQ_A, REQ_B])[:, 1:]
    direct = mc.Trace.from_arrays(experts, num_experts=8, seq=[0, 0, 0, 1, 1], layers=[1, 2])
    np.testing.assert_array_equal(imported.experts, experts)
    assert imported.meta["moe_layers"] == [1, 2] and imported.token_id.tolist() == [11, 12, 13, 21, 22]
    assert_same_replays(imported, direct, 2)
    npz = tmp_path / "routed.npz"
    np.savez(npz, **{"cmpl-a": REQ_A, "cmpl-b": REQ_B})
    code, output = cli_import(npz, "--out", tmp_path / "n.parquet", "--num-experts", 8)
    assert code == 0, output
    assert_same_replays(mc.Trace.load(tmp_path / "n.parquet"), direct, 2)


def test_rtrace_import_end_to_end_and_reroute(tmp_path):
    path = write_rtrace(tmp_path / "router_trace.bin", llama_order(), 5)
    code, output = cli_import(path, "--out", tmp_path / "r.parquet")
    assert code == 2 and output.count("\n") == 1 and "--top-k" in output
    code, output = cli_import(path, "--out", tmp_path / "r.parquet", "--top-k", 2)
    assert code == 0, output
    imported = mc.Trace.load(tmp_path / "r.parquet", logits=True)
    assert imported.num_experts == 5 and imported.meta["moe_layers"] == [0, 2]
    assert imported.experts.tolist() == TOP2
    assert imported.logits.shape == (3, 2, 5)
    assert_same_replays(imported, mc.Trace.from_arrays(np.array(TOP2), num_experts=5, layers=[0, 2]), 2)
    same, fidelity = reroute(imported, bias=0.0)       # no bias: the stored scores give back the routing
    assert fidelity.overlap == 1.0 and same.experts.tolist() == TOP2
    biased, fidelity = reroute(imported, bias=100.0)   # history dominates: token 1 keeps token 0's experts
    assert biased.experts[1].tolist() == [[1, 3], [0, 2]] and fidelity.overlap < 1.0
