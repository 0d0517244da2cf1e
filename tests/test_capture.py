"""moecache.capture on tiny random models of each MoE architecture (README: Capture).

Every model is built from its config class, saved with ``save_pretrained`` beside a
tokenizer trained locally, and captured by path. The recorded routing is checked
against an independent reference: a plain batch-1 forward, without KV cache or
padding, over each sequence's full token stream (prompt + generated tokens), with
hooks of its own on the routers at the usual paths (``model.layers[i].mlp.gate``,
``.mlp.router`` for GPT-OSS).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import moecache as mc  # noqa: E402
from moecache.capture import capture, capture_model, load_model, load_prompts  # noqa: E402
from moecache.capture.routers import find_routers  # noqa: E402
from moecache.errors import MoecacheError  # noqa: E402
from moecache.trace import DECODE, PREFILL  # noqa: E402

from .tiny_models import (  # noqa: E402
    ARCHS,
    PROMPTS,
    build_tokenizer,
    mixtral_with_unsupported_router,
    save_tiny_model,
    tiny_configs,
)

MAX_NEW = 6
ROUTER_ATTR = {"gpt_oss": "router"}
SHARED = {"qwen2_moe": 1, "deepseek_v2": 2, "deepseek_v3": 1}


# -- fixtures ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS[:2]) + "\n\n" + "\n".join(PROMPTS[2:]) + "\n")
    return path


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request, tmp_path_factory):
    """(arch, model folder, model loaded for reference checks, tokenizer)."""
    arch = request.param
    path = save_tiny_model(arch, tmp_path_factory.mktemp(arch))
    model, tokenizer = load_model(path, device="cpu")
    return arch, path, model, tokenizer


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    path = save_tiny_model("mixtral", tmp_path_factory.mktemp("mixtral_solo"))
    model, tokenizer = load_model(path, device="cpu")
    return path, model, tokenizer


# -- independent reference --------------------------------------------------------------------

def routers(arch, model):
    """{layer: router module} at the usual paths, for MoE layers only."""
    attr = ROUTER_ATTR.get(arch, "gate")
    found = {}
    for index, layer in enumerate(model.model.layers):
        module = getattr(layer.mlp, attr, None)
        if module is not None and not isinstance(module, torch.nn.Linear):
            found[index] = module
    return found


def reference(arch, model, token_ids):
    """Per MoE layer: (indices (N, K), weights (N, K), logits (N, E)) of a plain forward."""
    seen = {}
    handles = [module.register_forward_hook(
        lambda _m, _a, out, layer=layer: seen.__setitem__(layer, out))
        for layer, module in routers(arch, model).items()]
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([token_ids]), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {layer: tuple(t.float().numpy() if t.is_floating_point() else t.numpy() for t in out)
            for layer, out in seen.items()}


def generate_alone(model, tokenizer, prompt, max_new):
    """Greedy batch-1 generation: the new tokens."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


def expected_moe_layers(arch, config):
    n = config.num_hidden_layers
    if arch.startswith("deepseek"):
        return list(range(config.first_k_dense_replace, n))
    if arch.startswith("qwen"):
        return [i for i in range(n) if i not in config.mlp_only_layers
                and (i + 1) % config.decoder_sparse_step == 0]
    return list(range(n))


def assert_routing_matches(arch, model, trace, seq, token_ids, rows):
    """The trace rows ``rows`` (one per token of ``token_ids``) equal the reference routing."""
    ref = reference(arch, model, token_ids)
    assert sorted(ref) == trace.layers.tolist()
    for li, layer in enumerate(trace.layers):
        _, weights, indices = ref[layer]
        got = trace.experts[rows, li]
        assert np.array_equal(np.sort(got, axis=1), np.sort(indices, axis=1)), (arch, seq, layer)
        # weights: same multiset, stored by descending weight
        assert np.allclose(trace.weights[rows, li], -np.sort(-weights, axis=1), atol=1e-5)
        assert np.all(np.diff(trace.weights[rows, li], axis=1) <= 0)


# -- per architecture -------------------------------------------------------------------------

def test_generate_matches_reference_routing(tiny, prompts_file, tmp_path):
    """Batched, left-padded, KV-cached capture == batch-1 full forward over prompt + output."""
    arch, path, model, tokenizer = tiny
    out = capture(path, prompts_file, tmp_path / "t.parquet", max_new_tokens=MAX_NEW,
                  batch_size=3, device="cpu", progress=False)
    trace = mc.Trace.load(out)
    assert not trace.partial
    eos = tokenizer.eos_token_id
    assert sorted(set(trace.seq.tolist())) == list(range(len(PROMPTS)))
    for seq, prompt in enumerate(PROMPTS):
        rows = np.flatnonzero(trace.seq == seq)
        prompt_ids = tokenizer(prompt)["input_ids"]
        assert trace.pos[rows].tolist() == list(range(len(rows)))
        phase = trace.phase[rows]
        assert phase.tolist() == [PREFILL] * len(prompt_ids) + [DECODE] * (len(rows) - len(prompt_ids))
        # the prefill of a batch is one step; each decode forward one step
        assert len(set(trace.step[rows[: len(prompt_ids)]].tolist())) == 1
        assert np.all(np.diff(trace.step[rows[len(prompt_ids):]]) == 1)
        # fed tokens: prompt, then the generated tokens but the last (and never an EOS)
        new = generate_alone(model, tokenizer, prompt, MAX_NEW)
        fed = new[: new.index(eos)] if eos in new else new[: MAX_NEW - 1]
        assert trace.token_id[rows].tolist() == prompt_ids + fed
        assert_routing_matches(arch, model, trace, seq, prompt_ids + fed, rows)
    # rows = tokens x MoE layers
    assert trace.experts.shape == (trace.num_tokens, len(trace.layers), trace.top_k)


def test_metadata_from_config(tiny, tmp_path):
    arch, path, model, tokenizer = tiny
    out = capture(path, PROMPTS[:1], tmp_path / "t.parquet", max_new_tokens=2,
                  device="cpu", progress=False, router_label="remoe-test")
    trace = mc.Trace.load(out)
    config = model.config
    meta = trace.meta
    layers = expected_moe_layers(arch, config)
    assert meta["moe_layers"] == layers
    assert meta["num_layers"] == config.num_hidden_layers
    key = {"deepseek_v2": "n_routed_experts", "deepseek_v3": "n_routed_experts",
           "qwen2_moe": "num_experts", "olmoe": "num_experts"}.get(arch, "num_local_experts")
    assert meta["num_experts"] == getattr(config, key) == 8
    assert meta["top_k"] == config.num_experts_per_tok == 2
    assert meta["num_shared_experts"] == SHARED.get(arch, 0)
    assert meta["dtype"] == "float32"
    assert meta["router"] == "remoe-test"
    assert meta["model"]["name"] == str(path)
    assert meta["model"]["architecture"] == config.architectures[0]
    for layer, size in zip(layers, meta["expert_bytes"], strict=True):
        experts = model.model.layers[layer].mlp.experts
        total = sum(p.numel() * p.element_size() for p in experts.parameters())
        assert size == total // 8 > 0
    cap = meta["capture"]
    assert cap["mode"] == "generate" and cap["max_new_tokens"] == 2 and cap["batch_size"] == 1
    assert cap["prompts"] == "<list>" and len(cap["prompts_sha256"]) == 64
    assert cap["moecache_version"] == mc.__version__ and cap["date"]
    attr = ROUTER_ATTR.get(arch, "gate")
    assert cap["router_path"] == f"model.layers.{{i}}.mlp.{attr}"


def test_forward_mode_and_logits(tiny, tmp_path):
    """Teacher forcing: each token its own step; full router scores stored as float16."""
    arch, path, model, tokenizer = tiny
    out = capture(path, PROMPTS, tmp_path / "f.parquet", mode="forward", batch_size=2,
                  save_logits=True, device="cpu", progress=False)
    trace = mc.Trace.load(out, logits=True)
    lengths = [len(tokenizer(p)["input_ids"]) for p in PROMPTS]
    assert trace.num_tokens == sum(lengths) == trace.num_steps
    assert trace.step.tolist() == list(range(sum(lengths)))
    assert np.all(trace.phase == PREFILL)
    assert trace.seq.tolist() == [s for s, n in enumerate(lengths) for _ in range(n)]
    assert trace.logits.shape == (trace.num_tokens, len(trace.layers), 8)
    assert trace.meta["capture"]["mode"] == "forward"
    for seq, prompt in enumerate(PROMPTS):
        rows = np.flatnonzero(trace.seq == seq)
        ids = tokenizer(prompt)["input_ids"]
        assert trace.token_id[rows].tolist() == ids
        assert_routing_matches(arch, model, trace, seq, ids, rows)
        ref = reference(arch, model, ids)
        for li, layer in enumerate(trace.layers):
            np.testing.assert_allclose(trace.logits[rows, li], ref[layer][0], rtol=2e-3, atol=2e-3)


# -- single-architecture behaviour ------------------------------------------------------------

def test_deepseek_v3_records_used_experts_not_logit_topk(tmp_path):
    """Sigmoid + correction bias + groups: the top-K of the logits is often NOT what ran."""
    path = save_tiny_model("deepseek_v3", tmp_path / "m")
    out = capture(path, PROMPTS, tmp_path / "t.parquet", mode="forward", save_logits=True,
                  device="cpu", progress=False)
    trace = mc.Trace.load(out, logits=True)
    naive = np.sort(np.argsort(-trace.logits.astype(np.float32), axis=2)[:, :, :2], axis=2)
    used = np.sort(trace.experts, axis=2)
    assert (naive != used).any(axis=2).mean() > 0.1
    # and the weights are scaled by routed_scaling_factor after normalisation
    assert np.allclose(trace.weights.sum(axis=2), 2.5, atol=1e-4)


def test_early_eos_stops_recording(mixtral, tmp_path):
    path, model, tokenizer = mixtral
    new = generate_alone(model, tokenizer, PROMPTS[0], MAX_NEW)
    eos = new[1]  # make prompt 0 finish at its second generated token
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = eos
    try:
        out = capture_model(model, tokenizer, PROMPTS, tmp_path / "t.parquet",
                            max_new_tokens=MAX_NEW, batch_size=4, progress=False)
    finally:
        model.generation_config.eos_token_id = saved
    trace = mc.Trace.load(out)
    decode = trace.phase == DECODE
    assert np.count_nonzero(decode & (trace.seq == 0)) == 1  # g1 fed, g2 = EOS never fed
    assert eos not in trace.token_id[decode].tolist()
    for seq, prompt in enumerate(PROMPTS):
        gen = generate_alone(model, tokenizer, prompt, MAX_NEW)
        expected = gen.index(eos) if eos in gen[: MAX_NEW - 1] else MAX_NEW - 1
        assert np.count_nonzero(decode & (trace.seq == seq)) == expected
    # every decode step holds one token per still-running sequence
    steps, counts = np.unique(trace.step[decode], return_counts=True)
    assert counts.tolist() == sorted(counts.tolist(), reverse=True)
    assert counts[0] == len(PROMPTS)


def test_batch_size_does_not_change_routing(mixtral, tmp_path):
    path, model, tokenizer = mixtral
    one = mc.Trace.load(capture_model(model, tokenizer, PROMPTS, tmp_path / "1.parquet",
                                      max_new_tokens=4, batch_size=1, progress=False))
    many = mc.Trace.load(capture_model(model, tokenizer, PROMPTS, tmp_path / "3.parquet",
                                       max_new_tokens=4, batch_size=3, progress=False))

    def by_token(trace):
        order = np.lexsort((trace.pos, trace.seq))
        return trace.seq[order], trace.pos[order], np.sort(trace.experts[order], axis=2)

    for a, b in zip(by_token(one), by_token(many), strict=True):
        assert np.array_equal(a, b)
    # steps: per batch, one prefill + as many decode steps as its longest-running sequence
    decode = [np.count_nonzero((one.seq == s) & (one.phase == DECODE)) for s in range(4)]
    assert max(decode) == 3  # max_new_tokens - 1
    assert one.num_steps == sum(1 + d for d in decode)
    assert many.num_steps == (1 + max(decode[:3])) + (1 + decode[3])


def test_sampling_is_seeded(mixtral, tmp_path):
    path, model, tokenizer = mixtral

    def run(name, seed):
        out = capture_model(model, tokenizer, PROMPTS, tmp_path / name, do_sample=True,
                            seed=seed, max_new_tokens=8, batch_size=2, progress=False)
        return mc.Trace.load(out)

    a, b, c = run("a.parquet", 1), run("b.parquet", 1), run("c.parquet", 2)
    assert a.token_id.tolist() == b.token_id.tolist()
    assert np.array_equal(a.experts, b.experts)
    assert a.token_id.tolist() != c.token_id.tolist()
    assert a.meta["capture"]["do_sample"] is True and a.meta["capture"]["seed"] == 1


def test_interrupt_leaves_partial_trace(mixtral, tmp_path):
    path, model, tokenizer = mixtral
    calls = {"n": 0}

    def stop(_module, _args, _output):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt

    handle = model.model.layers[-1].mlp.gate.register_forward_hook(stop)
    out = tmp_path / "t.parquet"
    try:
        with pytest.raises(KeyboardInterrupt):
            # the probe forward counts as call 1: steps 0 and 1 complete, step 2 is cut
            capture_model(model, tokenizer, PROMPTS, out, max_new_tokens=MAX_NEW, progress=False)
    finally:
        handle.remove()
    trace = mc.Trace.load(out)
    assert trace.partial
    assert trace.num_steps == 2
    assert not (tmp_path / "t.parquet.parts").exists()


def test_overwrite_refused_before_loading(mixtral, tmp_path):
    path, model, tokenizer = mixtral
    out = tmp_path / "t.parquet"
    out.write_bytes(b"old")
    with pytest.raises(MoecacheError, match="already exists"):
        capture(tmp_path / "no-such-model", PROMPTS, out, progress=False)
    with pytest.raises(MoecacheError, match="already exists"):
        capture_model(model, tokenizer, PROMPTS, out, progress=False)
    assert out.read_bytes() == b"old"
    capture_model(model, tokenizer, PROMPTS[:1], out, max_new_tokens=2, overwrite=True,
                  progress=False)
    assert mc.Trace.load(out).num_tokens > 0


def test_dtype_and_limit(mixtral, tmp_path, prompts_file):
    path, _, _ = mixtral
    out = capture(path, prompts_file, tmp_path / "t.parquet", dtype="bfloat16", limit=2,
                  max_new_tokens=2, device="cpu", progress=True)
    trace = mc.Trace.load(out)
    assert trace.meta["dtype"] == "bfloat16"
    assert trace.meta["expert_bytes"] == [6144, 6144]  # half of float32's 12288
    assert sorted(set(trace.seq.tolist())) == [0, 1]
    cap = trace.meta["capture"]
    assert cap["prompts"] == str(prompts_file) and cap["num_prompts"] == 2


def test_chat_template(mixtral, tmp_path):
    path, model, tokenizer = mixtral
    with pytest.raises(MoecacheError, match="no chat template"):
        capture_model(model, tokenizer, PROMPTS, tmp_path / "a.parquet", chat_template=True,
                      progress=False)
    tokenizer.chat_template = "{% for m in messages %}<s> user {{ m['content'] }}{% endfor %} hello"
    try:
        out = capture_model(model, tokenizer, PROMPTS[:1], tmp_path / "b.parquet",
                            chat_template=True, max_new_tokens=1, progress=False)
    finally:
        tokenizer.chat_template = None
    trace = mc.Trace.load(out)
    ids = tokenizer("<s> user " + PROMPTS[0] + " hello", add_special_tokens=False)["input_ids"]
    assert trace.token_id.tolist() == ids
    assert trace.meta["capture"]["chat_template"] is True


# -- errors -----------------------------------------------------------------------------------

def test_dense_model_is_refused(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = build_tokenizer()
    config = AutoConfig.for_model("llama", vocab_size=len(tokenizer), hidden_size=32,
                                  intermediate_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=1)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path / "dense")
    tokenizer.save_pretrained(tmp_path / "dense")
    with pytest.raises(MoecacheError, match="no MoE layers"):
        capture(tmp_path / "dense", PROMPTS, tmp_path / "t.parquet", device="cpu",
                progress=False)
    assert not (tmp_path / "t.parquet").exists()


def test_unsupported_router_is_refused():
    model = mixtral_with_unsupported_router()
    with pytest.raises(MoecacheError, match=r"unsupported router: ScoresAndIndicesRouter at "
                                            r"model.layers.0.mlp.router returns \(\(2, 8\) float32"):
        find_routers(model)



def test_missing_model_folder(tmp_path):
    with pytest.raises(MoecacheError, match="cannot load model"):
        capture(tmp_path / "nope", PROMPTS, tmp_path / "t.parquet", device="cpu", progress=False)


def test_bad_options(tmp_path):
    for kwargs, message in [({"mode": "beam"}, "--mode"), ({"max_new_tokens": 0}, "--max-new"),
                            ({"batch_size": 0}, "--batch-size"), ({"dtype": "int3"}, "--dtype"),
                            ({"limit": 0}, "--limit")]:
        with pytest.raises(MoecacheError, match=message):
            capture(tmp_path / "m", PROMPTS, tmp_path / "t.parquet", **kwargs)


# -- prompts ----------------------------------------------------------------------------------

def test_prompts_text_and_jsonl(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("first prompt\n\n  \nsecond {json-like} prompt\nthird\n")
    loaded = load_prompts(text)
    assert loaded.texts == ["first prompt", "second {json-like} prompt", "third"]
    assert loaded.source == str(text) and len(loaded.sha256) == 64
    assert load_prompts(text, limit=2).texts == ["first prompt", "second {json-like} prompt"]

    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(json.dumps({"prompt": "a\nb"}) + "\n\n" + json.dumps({"text": "c", "id": 3}) + "\n")
    assert load_prompts(jsonl).texts == ["a\nb", "c"]

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"question": "x"}) + "\n")
    with pytest.raises(MoecacheError, match=r"bad.jsonl:2: expected an object"):
        load_prompts(bad)
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{nope\n")
    with pytest.raises(MoecacheError, match=r"broken.jsonl:1: not valid JSON"):
        load_prompts(broken)


def test_prompts_missing_or_empty(tmp_path):
    with pytest.raises(MoecacheError, match="no such prompts file"):
        load_prompts(tmp_path / "absent.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n   \n")
    with pytest.raises(MoecacheError, match="no prompts"):
        load_prompts(empty)
    with pytest.raises(MoecacheError, match="no prompts"):
        load_prompts([])


def test_tiny_configs_cover_dense_and_shared():
    """The fixtures really exercise dense first layers, sparse steps and shared experts."""
    configs = tiny_configs(64)
    assert expected_moe_layers("qwen2_moe", configs["qwen2_moe"]) == [1, 2]
    assert expected_moe_layers("qwen3_moe", configs["qwen3_moe"]) == [1, 3]
    assert expected_moe_layers("deepseek_v3", configs["deepseek_v3"]) == [1, 2]
