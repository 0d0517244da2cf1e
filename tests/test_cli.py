"""The command line: the worked example, JSON output, and one-line errors with exit code 2."""

import json

import pytest
from click.testing import CliRunner

import moecache as mc
from moecache.cli import cli
from moecache.synth import DEFAULT_EXPERT_BYTES


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "s.parquet"
    code, out, err = run("synth", "--out", path, "--layers", 3, "--experts", 16, "--top-k", 4,
                         "--tokens", 400, "--sequences", 2, "--prompt-len", 8, "--seed", 5)
    assert code == 0, err
    return path


def test_worked_example_replay_json_matches_api(sample):
    code, out, _ = run("replay", sample, "--policy", "lfu", "--capacity", 16, "--json",
                       "--bandwidth", "4GB/s", "--latency", "100us")
    assert code == 0
    got = json.loads(out)
    expected = mc.replay(mc.Trace.load(sample), "lfu", 16, bandwidth="4GB/s", latency="100us")
    for key in ("policy", "scope", "capacity", "requests", "hits", "misses", "cold_misses",
                "hit_rate", "reuse_rate", "miss_bytes", "bytes_per_token", "io_seconds",
                "io_seconds_per_token"):
        assert got[key] == getattr(expected, key), key
    assert got["io_seconds"] == pytest.approx(
        expected.miss_bytes / 4e9 + expected.misses * 100e-6)


def test_replay_table_and_per_layer(sample):
    code, out, _ = run("replay", sample, "-c", 16, "--per-layer", "--scope", "global")
    assert code == 0
    assert "hit rate" in out and "reuse rate" in out and "one pool for all layers" in out
    assert len([line for line in out.splitlines() if line.strip().startswith(("0 ", "1 ", "2 "))]) == 3


def test_memory_budget(sample):
    code, out, _ = run("replay", sample, "--memory", "1GiB", "--scope", "global", "--json")
    assert code == 0
    got = json.loads(out)
    assert got["memory_bytes"] == 2**30
    assert got["capacity"] == 2**30 // DEFAULT_EXPERT_BYTES
    assert got["miss_bytes"] == got["misses"] * DEFAULT_EXPERT_BYTES


def test_info(sample):
    code, out, _ = run("info", sample)
    assert code == 0
    for text in ("synthetic", "E = 16, top-K = 4", "steps", "400 (16 prefill, 384 decode)",
                 "bytes per expert id", "complete"):
        assert text in out


@pytest.mark.parametrize("args, message", [
    (["replay", "{sample}", "-c", "4"], "below the largest step set"),
    (["replay", "{sample}", "-c", "0", "--per-token"], "'--capacity' / '-c': 0 is not in the range 1<=x"),
    (["replay", "{sample}", "-c", "-3", "--per-token"], "'--capacity' / '-c': -3 is not in the range 1<=x"),
    (["replay", "{sample}", "-p", "clock", "-c", "8"], "'clock' is not one of"),
    (["replay", "{sample}"], "give --capacity"),
    (["replay", "{missing}", "-c", "8"], "no such file"),
    (["replay", "{text}", "-c", "8"], "not a Parquet file"),
    (["info", "{text}"], "not a Parquet file"),
    (["replay", "{sample}", "-c", "8", "--bandwidth", "fast"], "cannot read bandwidth"),
    (["synth", "--out", "{sample}"], "already exists"),
    (["synth", "--out", "{new}", "--top-k", "99", "--experts", "8"], "top_k 99 exceeds"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, sample, args, message):
    text = tmp_path / "x.parquet"
    text.write_text("not a trace")
    names = {"sample": sample, "missing": tmp_path / "nope.parquet", "text": text,
             "new": tmp_path / "new.parquet"}
    code, out, err = run(*[a.format(**names) for a in args])
    assert code == 2, (out, err)
    assert message in err
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err and out == ""
    assert not (tmp_path / "new.parquet").exists()


def test_per_token_allows_small_capacity(sample):
    code, out, _ = run("replay", sample, "-c", 4, "--per-token", "--json")
    assert code == 0 and json.loads(out)["steps"] == 400
