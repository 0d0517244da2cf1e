"""Hardware and model profiles: the shipped data is consistent with the models' config values
and the GGUF block sizes, user files load by path, and every bad file is one clear error."""

import json
from importlib import resources

import pytest
from click.testing import CliRunner

from moecache import profiles
from moecache.cli import cli
from moecache.errors import MoecacheError

# GGUF block formats: (weights per block, bytes per block), ggml/src/ggml-common.h.
BLOCKS = {"q8_0": (32, 34), "q6_k": (256, 210), "q5_k": (256, 176), "q5_1": (32, 24), "q5_0": (32, 22),
          "q4_k": (256, 144), "q4_1": (32, 20), "q4_0": (32, 18), "q3_k": (256, 110), "q2_k": (256, 84),
          "mxfp4": (32, 17)}

# Per model: vocabulary size and the published total parameter count the profile must add up to
# (DeepSeek-V2-Lite and Qwen3-30B-A3B: sums of their checkpoints' tensor shapes).
TOTALS = {"deepseek-v2-lite": (102400, 15_706_484_224), "qwen1.5-moe-a2.7b": (151936, 14_315_784_192),
          "qwen3-30b-a3b": (151936, 30_532_122_624), "mixtral-8x7b": (32000, 46_702_792_704),
          "olmoe-1b-7b": (50304, 6_919_161_856), "gpt-oss-20b": (201088, 20_914_757_184)}


def gqa_attention(h, heads, kv_heads, head_dim, qkv_bias=False, o_bias=False, qk_norm=0):
    q, kv = heads * head_dim, kv_heads * head_dim
    return (h * q + 2 * h * kv + q * h + (q + 2 * kv if qkv_bias else 0) + (h if o_bias else 0)
            + qk_norm)


# Non-expert weights read per token, from config values alone (docstring of profiles.Model).
NON_EXPERT = {
    # MLA without q_lora: q, kv_a, kv_a norm, kv_b, o, two layer norms
    "deepseek-v2-lite": 27 * (2048 * 16 * 192 + 2048 * 576 + 512 + 512 * 16 * 256 + 16 * 128 * 2048
                              + 2 * 2048)
    + 3 * 2048 * 10944 + 26 * (64 * 2048 + 3 * 2048 * 2 * 1408) + 2048 + 102400 * 2048 + 2048,
    "qwen1.5-moe-a2.7b": 24 * (gqa_attention(2048, 16, 16, 128, qkv_bias=True) + 2 * 2048 + 60 * 2048
                               + 3 * 2048 * 5632 + 2048) + 2048 + 151936 * 2048 + 2048,
    "qwen3-30b-a3b": 48 * (gqa_attention(2048, 32, 4, 128, qk_norm=256) + 2 * 2048 + 128 * 2048)
    + 2048 + 151936 * 2048 + 2048,
    "mixtral-8x7b": 32 * (gqa_attention(4096, 32, 8, 128) + 2 * 4096 + 8 * 4096) + 4096 + 32000 * 4096 + 4096,
    "olmoe-1b-7b": 16 * (gqa_attention(2048, 16, 16, 128, qk_norm=2 * 2048) + 2 * 2048 + 64 * 2048)
    + 2048 + 50304 * 2048 + 2048,
    "gpt-oss-20b": 24 * (gqa_attention(2880, 64, 8, 64, qkv_bias=True, o_bias=True) + 64 + 2 * 2880
                         + 32 * 2880 + 32) + 2880 + 201088 * 2880 + 2880,
}
# Attention FLOPs of one decoded token at 2048 positions: layers x 2 x heads x (d_qk + d_v) x positions.
ATTENTION = {
    "deepseek-v2-lite": 27 * 2 * 16 * (192 + 128) * 2048,
    "qwen1.5-moe-a2.7b": 24 * 2 * 16 * 256 * 2048,
    "qwen3-30b-a3b": 48 * 2 * 32 * 256 * 2048,
    "mixtral-8x7b": 32 * 2 * 32 * 256 * 2048,
    "olmoe-1b-7b": 16 * 2 * 16 * 256 * 2048,
    "gpt-oss-20b": 12 * 2 * 64 * 128 * 2048 + 12 * 2 * 64 * 128 * 128,
}

HARDWARE = """\
[hardware.my-box]
description = "a test box"
flops = "10TFLOPS"
memory_bandwidth = "500GB/s"
memory_capacity = "16GiB"
host_flops = 1e12
host_memory_bandwidth = "50GB/s"

[hardware.my-box.sources]
flops = "measured"

[[hardware.my-box.tiers]]
name = "ram"
capacity = "64GiB"
bandwidth = "20GB/s"
latency = "10us"
queue_depth = 2

[[hardware.my-box.tiers]]
name = "ssd"
capacity = "1TB"
bandwidth = "3GB/s"
latency = "80us"
queue_depth = 32
source = "datasheet"
"""

MODEL = """\
[model.tiny]
description = "a test model"
moe_layers = 2
dense_layers = 0
experts = 8
top_k = 2
shared_experts = 0
hidden_size = 512
expert_intermediate = 256
non_expert_params = 1000000
"""


def write(tmp_path, text, name="p.toml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_names_list_the_profiles_the_issue_asks_for():
    assert set(profiles.hardware_names()) >= {"jetson-orin-nx-16gb", "phone-ufs4", "rtx4090-desktop",
                                              "apple-m-laptop", "h100-pcie5"}
    assert set(profiles.model_names()) >= set(TOTALS)


def test_the_data_file_ships_inside_the_package():
    assert resources.files("moecache").joinpath("data", "profiles.toml").is_file()


@pytest.mark.parametrize("name", profiles.hardware_names())
def test_shipped_hardware_is_consistent_and_sourced(name):
    hw = profiles.hardware(name)
    assert hw.description
    for figure in ("flops", "memory_bandwidth", "memory_capacity", "host_flops", "host_memory_bandwidth"):
        assert getattr(hw, figure) > 0, figure
        assert hw.sources.get(figure, "").strip(), f"{name}: no source for {figure}"
    assert hw.tiers and hw.link == hw.tiers[0].link
    for upper, lower in zip(hw.tiers, hw.tiers[1:], strict=False):
        assert upper.link.bandwidth >= lower.link.bandwidth
        assert upper.link.latency <= lower.link.latency
    for tier in hw.tiers:
        assert tier.capacity_bytes > 0 and tier.link.bandwidth > 0 and tier.link.latency >= 0
        assert tier.link.queue_depth >= 1
        assert hw.sources.get(f"tiers.{tier.name}", "").strip(), f"{name}: no source for tier {tier.name}"


def test_shipped_figures_in_units():
    jetson = profiles.hardware("jetson-orin-nx-16gb")
    assert jetson.link == profiles.Link(bandwidth=2.1e9, latency=pytest.approx(100e-6), queue_depth=32)
    assert jetson.memory_bandwidth == 102.4e9 and jetson.memory_capacity == 16 * 2**30
    h100 = profiles.hardware("h100-pcie5")
    assert h100.flops == 756e12 and [tier.name for tier in h100.tiers] == ["host-ram", "nvme-gen5"]


@pytest.mark.parametrize("name", list(TOTALS))
def test_shipped_models_match_their_config_values(name):
    m = profiles.model(name)
    h, i = m.hidden_size, m.expert_intermediate
    assert m.expert_params == 3 * h * i + m.expert_bias
    assert m.expert_flops == 2 * m.expert_params
    assert m.non_expert_params == NON_EXPERT[name]
    assert m.attention_flops == ATTENTION[name] and m.context_length == 2048
    assert m.non_expert_flops == 2 * m.non_expert_params + m.attention_flops
    vocab, total = TOTALS[name]
    assert m.non_expert_params - h + vocab * h + m.moe_layers * m.experts * m.expert_params == total
    assert 1 <= m.top_k <= m.experts and m.moe_layers >= 1
    assert m.sources.get("config") and m.sources.get("non_expert_params") and m.sources.get("attention_flops")


def test_expert_params_by_hand():
    # hidden x moe_intermediate x 3 (gate, up, down)
    assert profiles.model("deepseek-v2-lite").expert_params == 3 * 2048 * 1408 == 8_650_752
    assert profiles.model("qwen3-30b-a3b").expert_params == 3 * 2048 * 768 == 4_718_592
    assert profiles.model("mixtral-8x7b").expert_params == 3 * 4096 * 14336 == 176_160_768
    # plus gate_up and down biases
    assert profiles.model("gpt-oss-20b").expert_params == 3 * 2880 * 2880 + 3 * 2880 == 24_891_840


@pytest.mark.parametrize("name", list(TOTALS))
def test_expert_bytes_of_float_types(name):
    m = profiles.model(name)
    assert m.expert_bytes("bf16") == m.expert_bytes("f16") == 2 * m.expert_params
    assert m.expert_bytes("f32") == 4 * m.expert_params
    assert m.non_expert_bytes("bf16") == 2 * m.non_expert_params


@pytest.mark.parametrize("name", ["qwen3-30b-a3b", "mixtral-8x7b", "olmoe-1b-7b"])
@pytest.mark.parametrize("dtype", list(BLOCKS))
def test_expert_bytes_of_block_types_when_rows_fill_the_blocks(name, dtype):
    m = profiles.model(name)
    weights, size = BLOCKS[dtype]
    assert m.hidden_size % 256 == 0 and m.expert_intermediate % 256 == 0
    assert m.expert_bytes(dtype) == m.expert_params * size // weights


def test_k_quants_fall_back_like_llama_cpp_when_rows_do_not_fill_256():
    # DeepSeek-V2-Lite: gate/up rows hold 2048 weights (q4_k), down rows 1408 (-> q5_0, 22 B / 32).
    m = profiles.model("deepseek-v2-lite")
    assert m.expert_bytes("q4_k") == 2 * 1408 * 8 * 144 + 2048 * 44 * 22 == 5_226_496
    assert m.expert_bytes("q6_k") == 2 * 1408 * 8 * 210 + 2048 * 44 * 34
    assert m.expert_bytes("q8_0") == m.expert_params // 32 * 34
    # gpt-oss: 2880-weight rows take no 256-blocks; q2_k falls back to q4_0; biases stay f32.
    oss = profiles.model("gpt-oss-20b")
    assert oss.native_dtype == "mxfp4"
    assert oss.expert_bytes("mxfp4") == 3 * 2880 * 90 * 17 + 8640 * 4
    assert oss.expert_bytes("q2_k") == 3 * 2880 * 90 * 18 + 8640 * 4
    assert oss.expert_bytes("bf16") == 2 * oss.expert_params


def test_rows_that_fit_no_block_use_f16_for_k_quants_and_fail_otherwise(tmp_path):
    odd = profiles.model(write(tmp_path, MODEL.replace("hidden_size = 512", "hidden_size = 100")))
    i = odd.expert_intermediate
    # gate/up rows hold 100 weights: neither q4_k nor its fallback q5_0 fits, so f16;
    # down rows hold 256 and stay q4_k
    assert odd.expert_bytes("q4_k") == 2 * i * 100 * 2 + 100 * (i // 256) * 144
    with pytest.raises(MoecacheError, match="do not split into q4_0's blocks of 32"):
        odd.expert_bytes("q4_0")
    with pytest.raises(MoecacheError, match="unknown dtype 'int3'"):
        odd.expert_bytes("int3")


def test_user_files_load_by_path(tmp_path):
    hw = profiles.hardware(write(tmp_path, HARDWARE))
    assert hw.name == "my-box" and hw.flops == 10e12 and hw.host_flops == 1e12
    assert hw.link == profiles.Link(20e9, pytest.approx(10e-6), 2)
    assert [t.capacity_bytes for t in hw.tiers] == [64 * 2**30, 10**12]
    assert hw.sources == {"flops": "measured", "tiers.ssd": "datasheet"}
    m = profiles.model(write(tmp_path, MODEL, "m.toml"))
    assert m.expert_params == 3 * 512 * 256 and m.non_expert_flops == 2e6 and m.native_dtype == "bf16"


def test_unknown_names_list_the_known_ones():
    with pytest.raises(MoecacheError, match="unknown hardware 'tpu'.*jetson-orin-nx-16gb"):
        profiles.hardware("tpu")
    with pytest.raises(MoecacheError, match="unknown model 'gpt5'.*deepseek-v2-lite"):
        profiles.model("gpt5")


BAD_HARDWARE = [
    ("not TOML", lambda t: t + "\n[[[", "not valid TOML"),
    ("missing field", lambda t: t.replace('memory_bandwidth = "500GB/s"\n', ""), "memory_bandwidth: missing"),
    ("unit-less bandwidth", lambda t: t.replace('"20GB/s"', "20000000000"),
     r"tiers\[0\].bandwidth: give bytes"),
    ("bandwidth without /s", lambda t: t.replace('"20GB/s"', '"20GB"'), r"tiers\[0\].bandwidth: give bytes"),
    ("zero bandwidth", lambda t: t.replace('"20GB/s"', '"0GB/s"'), "at least 1 byte"),
    ("negative bandwidth", lambda t: t.replace('"500GB/s"', '"-500GB/s"'), "memory_bandwidth: cannot read"),
    ("negative latency", lambda t: t.replace('"10us"', '"-10us"'), r"tiers\[0\].latency"),
    ("unit-less latency", lambda t: t.replace('"10us"', "0.00001"), r"tiers\[0\].latency: give a string"),
    ("queue depth 0", lambda t: t.replace("queue_depth = 2", "queue_depth = 0"), "queue_depth: must be"),
    ("queue depth 2**63 - 1", lambda t: t.replace("queue_depth = 2", "queue_depth = 9223372036854775807"),
     "queue_depth: must be a whole number from 1 to 65536"),
    ("tiers out of order", lambda t: t.replace('"3GB/s"', '"30GB/s"'), "not ordered fastest first"),
    ("unknown key", lambda t: t.replace('flops = "10TFLOPS"', 'flops = "10TFLOPS"\nflop = 1'),
     "my-box.flop: unknown key"),
    ("unknown tier key", lambda t: t.replace("queue_depth = 2", "queue_depth = 2\nspeed = 1"),
     r"tiers\[0\].speed: unknown key"),
    ("unknown source", lambda t: t.replace('flops = "measured"', 'flopz = "measured"'), "sources.flopz"),
    ("bad flops unit", lambda t: t.replace('"10TFLOPS"', '"10TOPS"'), "flops: unknown unit"),
    ("negative flops", lambda t: t.replace("host_flops = 1e12", "host_flops = -1e12"), "host_flops: must be"),
    ("no tiers", lambda t: t.split("[[hardware.my-box.tiers]]")[0], "tiers: missing"),
    ("two tables", lambda t: t + '\n[hardware.other]\ndescription = "x"\n', "expected one"),
    ("unknown section", lambda t: "[gpu.x]\na = 1\n" + t, "unknown top-level key 'gpu'"),
]


@pytest.mark.parametrize("case, edit, message", BAD_HARDWARE, ids=[case[0] for case in BAD_HARDWARE])
def test_bad_hardware_files_are_one_line_naming_the_file(tmp_path, case, edit, message):
    path = write(tmp_path, edit(HARDWARE))
    with pytest.raises(MoecacheError, match=message) as err:
        profiles.hardware(path)
    assert str(err.value).startswith(path) and "\n" not in str(err.value)


BAD_MODEL = [
    ("bool count", lambda t: t.replace("experts = 8", "experts = true"), "experts: must be a whole number"),
    ("top_k above experts", lambda t: t.replace("top_k = 2", "top_k = 9"), "top_k: 9 is more than experts"),
    ("negative attention", lambda t: t + "attention_flops = -1\n", "attention_flops: must be a number"),
    ("attention without context", lambda t: t + "attention_flops = 5\n", "context_length: give"),
    ("unknown dtype", lambda t: t + 'native_dtype = "int3"\n', "native_dtype: unknown dtype"),
    ("missing field", lambda t: t.replace("hidden_size = 512\n", ""), "hidden_size: missing"),
    ("no model table", lambda t: HARDWARE, "expected one \\[model.NAME\\] table, found 0"),
]


@pytest.mark.parametrize("case, edit, message", BAD_MODEL, ids=[case[0] for case in BAD_MODEL])
def test_bad_model_files_are_one_line_naming_the_file(tmp_path, case, edit, message):
    path = write(tmp_path, edit(MODEL))
    with pytest.raises(MoecacheError, match=message) as err:
        profiles.model(path)
    assert str(err.value).startswith(path)


def test_missing_and_unreadable_files(tmp_path):
    missing = str(tmp_path / "none.toml")
    with pytest.raises(MoecacheError, match=f"^{missing}: cannot read profile file"):
        profiles.hardware(missing)
    with pytest.raises(MoecacheError, match="cannot read profile file"):
        profiles.model(str(tmp_path))
    binary = tmp_path / "b.toml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(MoecacheError, match=f"^{binary}: cannot read profile file"):
        profiles.hardware(str(binary))


def test_cli_profiles_json_and_table():
    result = CliRunner().invoke(cli, ["profiles", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [h["name"] for h in data["hardware"]] == profiles.hardware_names()
    deepseek = next(m for m in data["models"] if m["name"] == "deepseek-v2-lite")
    assert deepseek["expert_bytes"]["bf16"] == 2 * 8_650_752 and deepseek["sources"]["config"]
    table = CliRunner().invoke(cli, ["profiles"])
    assert table.exit_code == 0 and "jetson-orin-nx-16gb" in table.stdout and "gpt-oss-20b" in table.stdout
