"""Capture through llama.cpp (GGUF) against the Hugging Face capture of the same weights.

Each tiny random model of :mod:`tests.tiny_gguf` is saved as a Hugging Face folder and
converted by llama.cpp's own converter at f32 and q8_0. At f32 llama.cpp's recorded
routing must EQUAL the Hugging Face capture (an independent implementation of the same
model): every row's tokens, positions, steps and experts, weights to float tolerance.
At q8_0 the agreement (share of token x layer rows with the same expert set, teacher
forced) is printed and must stay above a floor.
"""

from __future__ import annotations

import signal

import numpy as np
import pytest

pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")
pytest.importorskip("torch")
pytest.importorskip("transformers")

from click.testing import CliRunner  # noqa: E402

import moecache as mc  # noqa: E402
from moecache.capture import capture  # noqa: E402
from moecache.capture.gguf_file import read_gguf  # noqa: E402
from moecache.capture.gguf_runtime import LlamaRuntime  # noqa: E402
from moecache.capture.gguf_tap import MoeTap  # noqa: E402
from moecache.cli import cli  # noqa: E402
from moecache.errors import MoecacheError  # noqa: E402
from moecache.trace import DECODE, PREFILL  # noqa: E402

from .capture_process import start_long_capture  # noqa: E402
from .tiny_gguf import GGUF_ARCHS, convert, save_tiny_hf  # noqa: E402
from .tiny_models import PROMPTS  # noqa: E402

MAX_NEW = 6
Q8_FLOOR = 0.85  # share of rows whose expert set survives q8_0 quantization


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """{arch: (hf folder, f32 gguf, q8_0 gguf)} plus "dense": a tiny dense Llama at f32."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    root = tmp_path_factory.mktemp("gguf")
    found, jobs = {}, []
    for arch in GGUF_ARCHS:
        hf = save_tiny_hf(arch, root / arch)
        found[arch] = (hf, root / f"{arch}-f32.gguf", root / f"{arch}-q8_0.gguf")
        jobs += [(hf, found[arch][1], "f32"), (hf, found[arch][2], "q8_0")]
    dense = save_tiny_hf("mixtral", root / "dense")  # its tokenizer, then a dense model over it
    config = LlamaConfig(vocab_size=AutoModelForCausalLM.from_pretrained(dense).config.vocab_size,
                         hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    AutoModelForCausalLM.from_config(config).save_pretrained(dense)
    found["dense"] = (dense, root / "dense-f32.gguf", None)
    jobs.append((dense, found["dense"][1], "f32"))
    convert(jobs)
    return found


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


@pytest.fixture(scope="module")
def hf_traces(models, prompts, tmp_path_factory):
    """Hugging Face captures, {(arch, mode): Trace}, made on demand once each."""
    root = tmp_path_factory.mktemp("hf")
    made = {}

    def get(arch, mode):
        if (arch, mode) not in made:
            out = capture(models[arch][0], prompts, root / f"{arch}-{mode}.parquet", mode=mode,
                          max_new_tokens=MAX_NEW, device="cpu", progress=False)
            made[arch, mode] = mc.Trace.load(out)
        return made[arch, mode]

    return get


def gguf_trace(path, prompts, out, **options):
    return mc.Trace.load(capture(path, prompts, out, max_new_tokens=MAX_NEW, device="cpu",
                                 progress=False, **options))


# -- llama.cpp == Hugging Face at f32 -----------------------------------------------------

@pytest.mark.parametrize("mode", ["generate", "forward"])
@pytest.mark.parametrize("arch", list(GGUF_ARCHS))
def test_f32_routing_equals_hugging_face(models, prompts, hf_traces, tmp_path, arch, mode):
    ours = gguf_trace(models[arch][1], prompts, tmp_path / "g.parquet", mode=mode)
    theirs = hf_traces(arch, mode)
    assert not ours.partial
    assert ours.experts.shape == theirs.experts.shape  # rows = tokens x MoE layers x K
    for column in ("token_id", "seq", "pos", "step", "phase"):
        np.testing.assert_array_equal(getattr(ours, column), getattr(theirs, column), column)
    np.testing.assert_array_equal(ours.experts, theirs.experts)
    # llama.cpp keeps its KV cache in f16 by default: weights agree to ~1e-3
    np.testing.assert_allclose(ours.weights, theirs.weights, rtol=0, atol=1e-2)
    for key in ("num_experts", "top_k", "moe_layers", "num_layers", "num_shared_experts",
                "expert_bytes", "dtype"):
        assert ours.meta[key] == theirs.meta[key], key
    assert ours.meta["model"]["architecture"] == GGUF_ARCHS[arch]
    assert ours.meta["capture"]["runtime"] == "llama.cpp"
    if mode == "generate":  # per prompt: one prefill step, then decode steps of one token
        assert (ours.phase == DECODE).any()
        for seq in range(len(PROMPTS)):
            rows = ours.seq == seq
            assert len(np.unique(ours.step[rows & (ours.phase == PREFILL)])) == 1
            assert (ours.phase[rows] == DECODE).sum() <= MAX_NEW - 1
    else:
        assert (ours.phase == PREFILL).all() and len(np.unique(ours.step)) == ours.num_tokens


@pytest.mark.parametrize("arch", list(GGUF_ARCHS))
def test_q8_0_agreement(models, prompts, hf_traces, tmp_path, arch):
    ours = gguf_trace(models[arch][2], prompts, tmp_path / "q.parquet", mode="forward")
    theirs = hf_traces(arch, "forward")
    np.testing.assert_array_equal(ours.token_id, theirs.token_id)
    same = (np.sort(ours.experts, axis=2) == np.sort(theirs.experts, axis=2)).all(axis=2)
    print(f"\n{arch} q8_0: {same.mean():.3f} of {same.size} token x layer rows pick the "
          "same experts as the f32 Hugging Face model")
    assert same.mean() >= Q8_FLOOR
    assert ours.meta["dtype"] == "q8_0"
    f32 = read_gguf(models[arch][1])
    # q8_0 stores blocks of 32 values in 34 bytes (an f16 scale + 32 int8)
    assert ours.meta["expert_bytes"] == [b * 34 // (32 * 4) for b in f32.expert_bytes]


def test_prompt_longer_than_a_ubatch(models, tmp_path):
    """A 600-token prompt runs as two llama.cpp ubatches (512 + 88): rows stay in order."""
    text = " ".join(PROMPTS * 14)
    hf = mc.Trace.load(capture(models["olmoe"][0], [text], tmp_path / "h.parquet",
                               mode="forward", device="cpu", progress=False))
    ours = gguf_trace(models["olmoe"][1], [text], tmp_path / "g.parquet", mode="forward")
    assert ours.num_tokens == hf.num_tokens > 512
    np.testing.assert_array_equal(ours.token_id, hf.token_id)
    same = (ours.experts == hf.experts).all(axis=2).mean()
    print(f"\n600-token prompt: {same:.4f} of the rows equal the Hugging Face capture")
    assert same >= 0.98  # far positions: f16 KV-cache rounding may flip a near-tie


# -- sampling, interrupts, CLI -------------------------------------------------------------

def test_sampling_is_seeded(models, prompts, tmp_path):
    path = models["olmoe"][1]
    one = gguf_trace(path, prompts, tmp_path / "a.parquet", do_sample=True, seed=3)
    two = gguf_trace(path, prompts, tmp_path / "b.parquet", do_sample=True, seed=3)
    np.testing.assert_array_equal(one.token_id, two.token_id)
    np.testing.assert_array_equal(one.experts, two.experts)
    assert one.meta["capture"]["do_sample"] and one.meta["capture"]["seed"] == 3


def test_interrupt_keeps_completed_steps(models, prompts, tmp_path, monkeypatch):
    samples, decodes = [], []
    sample_, decode_ = LlamaRuntime.sample, LlamaRuntime.decode

    def sample(self):
        samples.append(1)
        if len(samples) == 8:
            raise KeyboardInterrupt
        return sample_(self)

    def decode(self, *args, **kwargs):
        decodes.append(1)
        return decode_(self, *args, **kwargs)

    monkeypatch.setattr(LlamaRuntime, "sample", sample)
    monkeypatch.setattr(LlamaRuntime, "decode", decode)
    out = tmp_path / "p.parquet"
    with pytest.raises(KeyboardInterrupt):
        capture(models["olmoe"][1], prompts, out, max_new_tokens=MAX_NEW, device="cpu",
                progress=False)
    trace = mc.Trace.load(out)
    assert trace.partial and trace.num_steps == len(decodes) > 1  # one step per completed decode


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_leaves_partial_trace(models, tmp_path, sig):
    """A signal that lands while llama.cpp computes (inside the graph callback) still stops
    the capture cleanly, with the completed steps kept."""
    proc, out = start_long_capture(models["qwen3_moe"][1], tmp_path, PROMPTS * 400)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "partial trace" in stderr and "Traceback" not in stderr and "ignored" not in stderr
    trace = mc.Trace.load(out)
    assert trace.partial and trace.num_tokens > 0


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def test_cli_capture(models, prompts, tmp_path):
    out = tmp_path / "c.parquet"
    code, stdout, stderr = run("capture", models["qwen3_moe"][1], "--prompts", prompts,
                               "--out", out, "--max-new-tokens", 3, "--device", "cpu")
    assert code == 0, stderr
    trace = mc.Trace.load(out)
    assert f"{trace.num_tokens} tokens" in stdout and trace.meta["moe_layers"] == [0, 1, 2, 3]
    code, _, stderr = run("capture", models["qwen3_moe"][1], "--prompts", prompts, "--out",
                          tmp_path / "d.parquet", "--save-logits")
    assert code == 2 and stderr.strip().count("\n") == 0 and "--save-logits" in stderr


def test_bad_files(models, prompts, tmp_path):
    dense = models["dense"][1]
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(models["olmoe"][1].read_bytes()[:100_000])
    text = tmp_path / "text.gguf"
    text.write_text("not a model\n")
    for path, words in ((dense, "dense model"), (truncated, "GGUF file"),
                        (text, "not a readable GGUF"), (tmp_path / "none.gguf", "no such")):
        code, _, stderr = run("capture", path, "--prompts", prompts, "--out",
                              tmp_path / "x.parquet")
        assert code == 2 and words in stderr and stderr.strip().count("\n") == 0, stderr
        assert not (tmp_path / "x.parquet").exists()


def test_tap_names_missing_moe_tensors(models):
    """An architecture whose graph names no MoE weights for a router layer is refused
    (here: a tap told of a MoE block 5 the 2-block model does not have)."""
    path = models["olmoe"][1]
    tap = MoeTap([0, 1, 5], 2, capacity=16)
    with LlamaRuntime(path, n_ctx=32, n_batch=16, cb_eval=tap.callback,
                      cb_eval_user_data=tap.user_data, device="cpu") as run_:
        run_.decode(run_.tokenize("hello world"), 0, every_output=True)
        with pytest.raises(MoecacheError, match="no ffn_moe_weights tensor for MoE layer 5"):
            tap.take(len(run_.tokenize("hello world")))


def test_without_compiler_the_python_callback_records_the_same(models, prompts, tmp_path,
                                                               monkeypatch):
    from moecache.capture import gguf_native

    fast = gguf_trace(models["qwen2_moe"][1], prompts, tmp_path / "fast.parquet")
    assert fast.meta["capture"]["notes"] == []  # the compiled tap was used here
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # nothing built there
    monkeypatch.setattr(gguf_native, "_LOADED", {})
    monkeypatch.setattr(gguf_native, "_compiler", lambda: None)
    slow = gguf_trace(models["qwen2_moe"][1], prompts, tmp_path / "slow.parquet")
    assert "no C compiler" in slow.meta["capture"]["notes"][0]
    np.testing.assert_array_equal(slow.experts, fast.experts)
    np.testing.assert_array_equal(slow.weights, fast.weights)
    np.testing.assert_array_equal(slow.token_id, fast.token_id)


def test_read_gguf_layout(models):
    info = read_gguf(models["deepseek_v2"][1])
    assert (info.architecture, info.moe_layers, info.num_layers) == ("deepseek2", [1, 2], 3)
    assert (info.num_experts, info.top_k, info.num_shared_experts) == (8, 2, 2)
    # gate, up, down of one expert: 3 x hidden 32 x moe_intermediate 32 floats
    assert info.expert_bytes == [3 * 32 * 32 * 4] * 2 and info.expert_types == ["F32"]


def test_hostile_headers_are_one_line(tmp_path):
    """Arrays of arrays nested past Python's stack, and a tensor whose shape overflows 64
    bits, are refused in one line (no RecursionError, no size wrapped around)."""
    import struct

    def header(keys: bytes, n_keys: int, tensors: bytes = b"", n_tensors: int = 0) -> bytes:
        return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_keys) + keys + tensors

    def name(text: str) -> bytes:
        return struct.pack("<Q", len(text)) + text.encode()

    array, f32 = 9, 0  # a GGUF value type, a ggml tensor type
    nested = name("x") + struct.pack("<I", array) + struct.pack("<IQ", array, 1) * 5000
    deep = tmp_path / "deep.gguf"
    deep.write_bytes(header(nested, 1) + bytes(64))
    huge = tmp_path / "huge.gguf"
    arch = name("general.architecture") + struct.pack("<I", 8) + name("olmoe")
    shape = struct.pack("<I", 2) + struct.pack("<QQ", 2**40, 2**40)
    huge.write_bytes(header(arch, 1, name("blk.0.ffn_gate_inp.weight") + shape
                            + struct.pack("<IQ", f32, 0), 1) + bytes(64))
    for path, words in ((deep, "nested too deep"), (huge, "truncated GGUF file")):
        with pytest.raises(MoecacheError, match=words) as info:
            read_gguf(path)
        assert "\n" not in str(info.value)


def test_a_context_past_32_bits_is_one_line(models, prompts, tmp_path):
    """--max-new-tokens 2**63 - 1 made llama.cpp abort (a core dump); now one line, nothing written."""
    out = tmp_path / "x.parquet"
    code, _, stderr = run("capture", models["olmoe"][1], "--prompts", prompts, "--out", out,
                          "--max-new-tokens", 2**63 - 1)
    assert code == 2 and "more than llama.cpp takes" in stderr and stderr.strip().count("\n") == 0
    assert not out.exists()
