"""moecache.remoe: router-only fine-tuning for expert reuse, on tiny random MoE models.

Runs in seconds on CPU: models from tests/tiny_models.py (hidden 32, E = 8, K = 2),
blocks of 32 tokens, a few dozen optimiser steps.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import moecache as mc  # noqa: E402
from moecache.capture import capture, load_model  # noqa: E402
from moecache.capture.routers import RouterOutput  # noqa: E402
from moecache.errors import MoecacheError  # noqa: E402
from moecache.remoe import (  # noqa: E402
    finetune,
    finetune_model,
    load_texts,
    locality_loss,
    measure_reuse,
    pack_blocks,
    score_kind,
)

from .tiny_models import (  # noqa: E402
    PROMPTS,
    SENTENCES,
    build_tokenizer,
    mixtral_with_unsupported_router,
    save_tiny_model,
)

ARCHS = ("olmoe", "qwen2_moe", "deepseek_v3")  # softmax, softmax + shared/dense, sigmoid + bias/groups
FAST = dict(steps=30, lr=3e-2, seq_len=32, batch_size=4, progress=False, log_every=10)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only add overhead on shared cores
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def texts():
    rng = random.Random(0)
    words = " ".join(SENTENCES).split()
    return [" ".join(rng.choice(words) for _ in range(40)) for _ in range(20)]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("remoe_models")
    return {arch: save_tiny_model(arch, root / arch) for arch in ARCHS}


@pytest.fixture(scope="module")
def data_file(tmp_path_factory, texts):
    path = tmp_path_factory.mktemp("remoe_data") / "train.txt"
    path.write_text("\n\n".join(texts) + "\n")
    return path


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _changed(before, after):
    return {k for k in before if not torch.equal(before[k], after[k])}


# -- the objective does what it says ------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_only_routers_change_and_locality_raises_reuse(arch, paths, texts):
    model, tokenizer = load_model(paths[arch], device="cpu")
    blocks = pack_blocks(tokenizer, texts, 32)
    fixed = blocks[:4]
    original = _state(model)
    reuse_original = measure_reuse(model, fixed)

    # without the locality term (next-token + anchor only) ...
    plain = finetune_model(model, tokenizer, blocks, locality_weight=0.0, **FAST)
    reuse_plain = measure_reuse(model, fixed)
    model.load_state_dict(original)
    # ... and with it, same seed and batches
    report = finetune_model(model, tokenizer, blocks, locality_weight=1.0, **FAST)
    reuse_local = measure_reuse(model, fixed)

    # the tiny DeepSeek-V3's large random correction bias already makes it reuse ~0.9
    margin = 0.01 if arch == "deepseek_v3" else 0.1
    assert reuse_local > reuse_original + margin
    assert reuse_local > reuse_plain + margin
    assert report.reuse_after > report.reuse_before
    assert plain.eval["reuse_before"] == report.eval["reuse_before"]

    # only router parameters moved, all of them; buffers (correction bias) untouched
    changed = _changed(original, _state(model))
    assert changed == set(report.router_parameters)
    assert all(name.endswith(".weight") and ".mlp.gate." in name for name in changed)
    assert len(changed) == len(report.settings["moe_layers"])
    assert report.num_trainable == sum(original[n].numel() for n in changed)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())  # flags restored
    assert report.score_kind == ("sigmoid" if arch == "deepseek_v3" else "softmax")

    # the log: three intervals with every term and the running reuse rates
    assert [h["step"] for h in report.history] == [10, 20, 30]
    for record in report.history:
        assert {"lm", "kl", "locality", "loss", "reuse", "reuse_orig"} <= set(record)
        assert all(np.isfinite(record[k]) for k in ("lm", "kl", "locality", "loss"))
    assert report.history[-1]["locality"] < report.history[0]["locality"]
    assert report.history[-1]["reuse"] > report.history[-1]["reuse_orig"]


def test_kl_anchor_keeps_outputs_close(paths, texts):
    model, tokenizer = load_model(paths["olmoe"], device="cpu")
    blocks = pack_blocks(tokenizer, texts, 32)
    original = _state(model)
    kls = {}
    for kl_weight in (0.0, 10.0):
        model.load_state_dict(original)
        report = finetune_model(model, tokenizer, blocks, locality_weight=1.0, kl_weight=kl_weight,
                                lm_weight=0.0, **FAST)
        kls[kl_weight] = report.eval["kl"]
    assert kls[10.0] < 0.5 * kls[0.0]


# -- the command's function: checkpoint, log, reload, capture -------------------------------------

def test_finetune_saves_checkpoint_that_reloads_and_captures(paths, data_file, tmp_path):
    out = tmp_path / "olmoe-remoe"
    report = finetune(paths["olmoe"], data_file, out, steps=6, lr=3e-2, seq_len=16, batch_size=2,
                      device="cpu", log_every=2, progress=False)
    assert report.out_dir == out and not report.interrupted and report.steps == 6
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "remoe.json",
            "train_log.jsonl"} <= names
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no staging folder left behind

    meta = json.loads((out / "remoe.json").read_text())
    assert meta["interrupted"] is False and meta["steps_done"] == 6
    assert meta["settings"]["base_model"] == str(paths["olmoe"])
    assert meta["settings"]["seq_len"] == 16 and meta["settings"]["window"] == 1
    assert meta["router_parameters"] == report.router_parameters
    assert set(meta["eval"]) >= {"reuse_before", "reuse_after", "kl", "lm_before", "lm_after"}
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4, 6]

    original, _ = load_model(paths["olmoe"], device="cpu")
    tuned, tokenizer = load_model(out, device="cpu")
    assert _changed(_state(original), _state(tuned)) == set(report.router_parameters)
    assert tokenizer("hello world")["input_ids"] == build_tokenizer()("hello world")["input_ids"]

    # the fine-tuned folder's remoe.json labels its captures "remoe" by default
    trace_path = capture(out, PROMPTS, tmp_path / "t.parquet", max_new_tokens=3, device="cpu",
                         progress=False)
    trace = mc.Trace.load(trace_path)
    assert trace.num_tokens > 0 and trace.meta["router"] == "remoe"

    # an existing output is kept unless overwrite is given (checked before loading anything)
    with pytest.raises(MoecacheError, match="already exists"):
        finetune(tmp_path / "no-such-model", data_file, out, progress=False)
    finetune(paths["olmoe"], data_file, out, steps=2, seq_len=16, batch_size=2, device="cpu",
             progress=False, overwrite=True)
    assert json.loads((out / "remoe.json").read_text())["steps_done"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, "t.parquet"])


def test_interrupt_saves_what_was_trained(paths, data_file, tmp_path, monkeypatch):
    import moecache.remoe.train as module

    calls = {"n": 0, "stop": 6}

    def loader(path, **kwargs):
        model, tokenizer = load_model(path, **kwargs)

        def stop(_module, _args, _output):
            calls["n"] += 1
            if calls["n"] == calls["stop"]:
                raise KeyboardInterrupt

        model.model.layers[-1].mlp.gate.register_forward_hook(stop)
        return model, tokenizer

    monkeypatch.setattr(module, "load_model", loader)
    # call 1 is the router probe, then two forwards per step: call 6 cuts step 3
    out = tmp_path / "cut"
    report = finetune(paths["qwen2_moe"], data_file, out, steps=10, lr=3e-2, seq_len=16,
                      batch_size=2, device="cpu", progress=False)
    assert report.interrupted and report.steps == 2 and report.eval == {}
    meta = json.loads((out / "remoe.json").read_text())
    assert meta["interrupted"] is True and meta["steps_done"] == 2
    original, _ = load_model(paths["qwen2_moe"], device="cpu")
    tuned, _ = load_model(out, device="cpu")
    assert _changed(_state(original), _state(tuned)) == set(report.router_parameters)

    # interrupted before the first step completes: nothing is written, the interrupt propagates
    calls.update(n=0, stop=2)
    with pytest.raises(KeyboardInterrupt):
        finetune(paths["qwen2_moe"], data_file, tmp_path / "none", steps=10, seq_len=16,
                 batch_size=2, device="cpu", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut"]


def test_cli_interrupt_saves_then_exits_130(paths, data_file, tmp_path, monkeypatch):
    from click.testing import CliRunner

    import moecache.remoe.train as module
    from moecache.cli import cli

    calls = {"n": 0}

    def loader(path, **kwargs):
        model, tokenizer = load_model(path, **kwargs)

        def stop(_module, _args, _output):
            calls["n"] += 1
            if calls["n"] == 6:  # the probe, then two forwards per step: cuts step 3
                raise KeyboardInterrupt

        model.model.layers[-1].mlp.gate.register_forward_hook(stop)
        return model, tokenizer

    monkeypatch.setattr(module, "load_model", loader)
    out = tmp_path / "cut"
    result = CliRunner().invoke(cli, ["remoe", "finetune", str(paths["qwen2_moe"]), "--data", str(data_file),
                                      "--out", str(out), "--steps", "10", "--seq-len", "16",
                                      "--batch-size", "2", "--device", "cpu"])
    assert result.exit_code == 130, result.output
    assert result.stdout == ""
    assert result.stderr.strip().splitlines()[-1] == (
        f"moecache: interrupted; the routers trained in 2 steps are saved in {out} (marked interrupted)")
    assert json.loads((out / "remoe.json").read_text())["interrupted"] is True


# -- losses and helpers ---------------------------------------------------------------------------

def test_locality_loss_matches_definition():
    gen = torch.Generator().manual_seed(0)
    batch, length, experts, top_k = 2, 5, 6, 2
    logits = torch.randn(batch * length, experts, generator=gen)
    indices = torch.stack([torch.randperm(experts, generator=gen)[:top_k]
                           for _ in range(batch * length)])
    route = RouterOutput(logits, torch.ones(batch * length, top_k), indices)
    for kind in ("softmax", "sigmoid"):
        for window in (1, 2, 9):
            got = locality_loss([route], [kind], (batch, length), window)
            expected = []
            for b in range(batch):
                for t in range(1, length):
                    row = logits[b * length + t]
                    q = row.softmax(-1) if kind == "softmax" else row.sigmoid() / row.sigmoid().sum()
                    recent = {int(e) for s in range(max(0, t - window), t)
                              for e in indices[b * length + s]}
                    expected.append(-torch.log(q[sorted(recent)].sum()))
            assert torch.allclose(got, torch.stack(expected).mean(), atol=1e-5)


def test_score_kind_from_router_output():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(64, 8, generator=gen)
    top = logits.topk(2, dim=-1)
    soft = logits.softmax(-1).gather(1, top.indices)
    sig = logits.sigmoid().gather(1, top.indices)
    assert score_kind(RouterOutput(logits, soft, top.indices)) == "softmax"
    assert score_kind(RouterOutput(logits, soft / soft.sum(1, keepdim=True) * 2.5, top.indices)) == "softmax"
    assert score_kind(RouterOutput(logits, top.values.softmax(-1), top.indices)) == "softmax"  # GPT-OSS
    assert score_kind(RouterOutput(logits, sig / sig.sum(1, keepdim=True) * 2.5, top.indices)) == "sigmoid"


def test_load_texts_and_pack_blocks(tmp_path):
    plain = tmp_path / "a.txt"
    plain.write_text("first doc line one\nline two\n\n \nsecond doc\n\n\nthird\n")
    assert load_texts(plain) == ["first doc line one\nline two", "second doc", "third"]
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('{"text": "hello world"}\n\n{"content": "the cache"}\n')
    assert load_texts(jsonl) == ["hello world", "the cache"]

    tokenizer = build_tokenizer()
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    blocks = pack_blocks(tokenizer, ["hello world", "the cache holds"], 3)
    stream = [bos, *tokenizer("hello world", add_special_tokens=False)["input_ids"], eos,
              bos, *tokenizer("the cache holds", add_special_tokens=False)["input_ids"], eos]
    assert blocks.tolist() == [stream[0:3], stream[3:6], stream[6:9]]
    assert pack_blocks(tokenizer, ["hello world"], 100).tolist() == [stream[:4]]  # one short block
    assert len(pack_blocks(tokenizer, ["hello world"] * 50, 4, max_blocks=5)) == 5


def test_import_is_lazy():
    code = ("import sys, moecache.remoe as r; assert 'torch' not in sys.modules; "
            "assert 'finetune' in dir(r)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# -- bad input: one-line MoecacheError -------------------------------------------------------------

def test_missing_or_empty_data(paths, tmp_path):
    with pytest.raises(MoecacheError, match="no such data file"):
        finetune(paths["olmoe"], tmp_path / "nope.txt", tmp_path / "out", progress=False)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n\n")
    with pytest.raises(MoecacheError, match="empty or blank"):
        finetune(paths["olmoe"], empty, tmp_path / "out", progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"title": 3}\n')
    with pytest.raises(MoecacheError, match=r"bad.jsonl:2: expected an object with a string 'text'"):
        finetune(paths["olmoe"], bad, tmp_path / "out", progress=False)
    with pytest.raises(MoecacheError, match="is a folder"):
        load_texts(tmp_path)
    with pytest.raises(MoecacheError, match="too little text"):
        pack_blocks(lambda text, **_: {"input_ids": [5]}, ["x"], 8)  # one token, no EOS
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("knob, value, message", [
    ("steps", 0, "--steps must be an integer >= 1"),
    ("window", 0, "--window must be an integer >= 1"),
    ("seq_len", 1, "--seq-len must be an integer >= 2"),
    ("batch_size", 2.5, "--batch-size must be an integer"),
    ("lr", 0.0, "--lr must be a finite number > 0"),
    ("locality_weight", -1.0, "--locality-weight must be a finite number >= 0"),
    ("kl_weight", float("nan"), "--kl-weight must be"),
    ("dtype", "int8", "--dtype must be one of"),
    ("seed", -1, "seed must be a whole number from 0 to 2\\*\\*63 - 1"),
    ("seed", 2**63, "seed must be a whole number from 0 to 2\\*\\*63 - 1"),
])
def test_bad_options(paths, data_file, tmp_path, knob, value, message):
    with pytest.raises(MoecacheError, match=message):
        finetune(paths["olmoe"], data_file, tmp_path / "out", progress=False, **{knob: value})


def test_all_weights_zero_and_too_long_blocks(paths, data_file, tmp_path):
    with pytest.raises(MoecacheError, match="all loss weights are 0"):
        finetune(paths["olmoe"], data_file, tmp_path / "out", locality_weight=0, kl_weight=0,
                 lm_weight=0, progress=False)
    model, tokenizer = load_model(paths["olmoe"], device="cpu")
    with pytest.raises(MoecacheError, match="exceeds the model's max_position_embeddings 256"):
        finetune_model(model, tokenizer, np.zeros((1, 300), np.int64), progress=False)


def test_dense_model_is_refused(tmp_path, data_file):
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = build_tokenizer()
    config = AutoConfig.for_model("llama", vocab_size=len(tokenizer), hidden_size=32,
                                  intermediate_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=1)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "dense")
    tokenizer.save_pretrained(tmp_path / "dense")
    with pytest.raises(MoecacheError, match="no MoE layers .*: no router to fine-tune$"):
        finetune(tmp_path / "dense", data_file, tmp_path / "out", device="cpu", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense"]


def test_unsupported_router_is_refused():
    tokenizer = build_tokenizer()
    model = mixtral_with_unsupported_router(len(tokenizer))
    with pytest.raises(MoecacheError, match="unsupported router: ScoresAndIndicesRouter"):
        finetune_model(model, tokenizer, ["hello world the cache"], progress=False)


def test_settings_are_checked_and_typed(tmp_path):
    from moecache.capture.torch_env import dtype_name
    from moecache.remoe import FinetuneSettings
    from moecache.remoe.checkpoint import router_label

    settings = FinetuneSettings.of(None, {"locality_weight": 0, "steps": 3}, "finetune")
    assert settings == FinetuneSettings(locality_weight=0.0, steps=3)
    assert type(settings.locality_weight) is float and settings.loss_weights["locality"] == 0.0
    with pytest.raises(TypeError, match="finetune\\(\\) got an unexpected keyword argument 'stepz'"):
        FinetuneSettings.of(settings, {"stepz": 3}, "finetune")
    with pytest.raises(MoecacheError, match="--log-every must be an integer >= 1"):
        FinetuneSettings(log_every=0).check()
    assert dtype_name("bf16") == "bfloat16" and dtype_name(torch.float16, "--save-dtype") == "float16"
    with pytest.raises(MoecacheError, match="--save-dtype must be one of float32, float16, bfloat16, got 'a"):
        dtype_name("auto", "--save-dtype", ("float32", "float16", "bfloat16"))
    assert router_label(tmp_path) == "baseline"
    (tmp_path / "remoe.json").write_text("{}")
    assert router_label(tmp_path) == "remoe"
