"""The command line: the worked example, JSON output, and one-line errors with exit code 2."""

import json

import numpy as np
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
    (["replay", "{sample}", "-p", "nosuch", "-c", "8"], "unknown policy 'nosuch'"),
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


@pytest.fixture(scope="module")
def odd_traces(tmp_path_factory):
    """A zero-row trace, a one-step trace and a trace with router scores."""
    root = tmp_path_factory.mktemp("odd")
    empty = mc.Trace.from_arrays(np.zeros((0, 2, 2), np.int16), num_experts=8, expert_bytes=1000)
    return {"empty": empty.save(root / "empty.parquet"),
            "one": mc.synth(layers=2, experts=8, top_k=2, tokens=1).save(root / "one.parquet"),
            "scored": mc.synth(layers=2, experts=8, top_k=2, tokens=30, logits=True).save(root / "l.parquet")}


BIG = str(2**63)


@pytest.mark.parametrize("args, message", [
    # numbers out of range: the option, the value and the range
    (["replay", "{sample}", "-c", BIG], f"Invalid value for '--capacity' / '-c': {BIG} is not in the range"),
    (["replay", "{sample}", "-c", "8", "--seed", BIG], f"'--seed': {BIG} is not in the range 0<=x"),
    (["replay", "{sample}", "-c", "8", "--seed", "-1"], "'--seed': -1 is not in the range 0<=x"),
    (["replay", "{sample}", "--memory", "1e400"], "'--memory': size '1e400' must be a finite number"),
    (["replay", "{sample}", "--memory", "1e30"], "'--memory': size '1e30' is too large"),
    (["replay", "{sample}", "-c", "8", "--bandwidth", "1e400"], "bandwidth '1e400' must be a finite number"),
    (["replay", "{sample}", "-c", "8", "--latency", "1e400s"], "duration '1e400s' must be a finite number"),
    (["curve", "{sample}", "--seed", "-1"], "'--seed': -1 is not in the range"),
    (["curve", "{sample}", "--capacities", BIG], "every value must fit a 64-bit integer"),
    (["synth", "--out", "{new}", "--layers", "40000"], "'--layers': 40000 is not in the range 1<=x<=32768"),
    (["synth", "--out", "{new}", "--experts", "40000"], "'--experts': 40000 is not in the range 1<=x<=32768"),
    (["synth", "--out", "{new}", "--seed", BIG], f"'--seed': {BIG} is not in the range"),
    (["synth", "--out", "{new}", "--seed", "-1"], "'--seed': -1 is not in the range"),
    (["synth", "--out", "{new}", "--prompt-len", "-5"], "'--prompt-len': -5 is not in the range 0<=x"),
    (["synth", "--out", "{new}", "--skew", "20"], "'--skew': 20.0 is not in the range 0<=x<=10"),
    (["synth", "--out", "{new}", "--skew", "inf"], "'--skew': 'inf' is not a finite number"),
    (["synth", "--out", "{new}", "--skew", "nan"], "'--skew': 'nan' is not a finite number"),
    (["synth", "--out", "{new}", "--expert-bytes", "0"], "size '0' must be at least 1 byte"),
    (["synth", "--out", "{new}", "--tokens", "1000000000000000"],
     "more than 2,147,483,647 tokens in a sequence"),
    # budgets, empty traces and options that do not apply
    (["replay", "{sample}", "--memory", "1MiB"],
     "memory 1.00 MiB split over 3 layers (341.33 KiB each) holds no expert of layer 2 (16.50 MiB each), "
     "whose largest step set needs 13; use a memory budget >= 643.50 MiB or per-token steps"),
    (["replay", "{empty}", "-c", "4"], "empty.parquet: the trace holds no tokens: nothing to replay"),
    (["curve", "{empty}"], "the trace holds no tokens: nothing to replay"),
    (["compare", "{empty}", "{empty}", "--capacity", "2"], "the trace holds no tokens"),
    (["compare", "{sample}", "{sample}", "--compute-ms", "nan"], "'--compute-ms': 'nan' is not a finite"),
    (["compare", "{sample}", "{sample}", "--compute-ms", "inf"], "'--compute-ms': 'inf' is not a finite"),
    (["compare", "{sample}", "{sample}", "--compute-ms", "-1"], "-1.0 is not in the range x>0"),
    (["compare", "{sample}", "{sample}", "--bandwidth", "ufs9"], "cannot read bandwidth 'ufs9'"),
    (["reroute", "{scored}", "--out", "{new}", "--capacity", "4"], "a capacity only applies to cache-aware"),
    (["reroute", "{scored}", "--out", "{new}", "--bias", "nan"], "'--bias': 'nan' is not a finite number"),
    (["reroute", "{scored}", "--out", "{new}", "--window", "0"], "'--window': 0 is not in the range 1<=x"),
])
def test_out_of_range_and_inapplicable_input(tmp_path, sample, odd_traces, args, message):
    names = {"sample": sample, "new": tmp_path / "new.parquet", **odd_traces}
    code, out, err = run(*[a.format(**names) for a in args])
    assert (code, out) == (2, ""), err
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "new.parquet").exists()


def test_bandwidth_presets_work_everywhere(sample):
    code, out, _ = run("replay", sample, "-c", 16, "--bandwidth", "ufs4", "--json")
    assert code == 0 and json.loads(out)["bandwidth"] == 4.2e9
    code, out, _ = run("curve", sample, "--capacities", "16", "--bandwidth", "UFS4", "--json")
    assert code == 0 and json.loads(out)[0]["bandwidth"] == 4.2e9


def test_capacity_ranges_stop_where_every_expert_fits(sample):
    # E = 16 in layer scope, 48 in global scope: a range that far would be a billion rows
    code, out, _ = run("curve", sample, "--per-token", "--capacities", "4:1000000000", "--json")
    assert code == 0 and [row["capacity"] for row in json.loads(out)] == list(range(4, 17))
    code, out, _ = run("curve", sample, "--scope", "global", "--capacities", "40:1000000000:4", "--json")
    assert code == 0 and [row["capacity"] for row in json.loads(out)] == [40, 44, 48]
    code, out, _ = run("compare", sample, sample, "--capacity", "12:1000000000", "--policies", "lru",
                       "--per-token", "--json")
    assert code == 0 and {r["capacity"] for r in json.loads(out) if r["metric"] == "hit rate"} == {
        12, 13, 14, 15, 16}


def test_compare_of_one_step_traces_shows_no_reuse(odd_traces):
    code, out, err = run("compare", odd_traces["one"], odd_traces["one"], "--capacity", "2,4")
    assert code == 0, err
    assert out.splitlines()[1].split() == ["reuse", "rate", "-", "-", "-"]


def test_units_reject_what_traces_and_tables_cannot_hold():
    from moecache.units import parse_bandwidth, parse_bytes, parse_duration, parse_int_list

    assert parse_bytes("16MiB") == 16 * 2**20 and parse_bytes(2**63 - 1) == 2**63 - 1
    for text, message in [("1e30", "too large"), ("1e400", "finite"), (float("nan"), "finite"),
                          ("0.4", "at least 1 byte"), ("8 parsecs", "unknown unit")]:
        with pytest.raises(mc.MoecacheError, match=message):
            parse_bytes(text, "expert size")
    assert parse_bandwidth("NVMe4") == 7.0e9 and parse_bandwidth("2GB/s") == 2e9
    assert parse_bandwidth(1000000.5) == 1000000.5  # a rate keeps its fraction
    for parse in (parse_bytes, parse_bandwidth, parse_duration):  # no OverflowError from 400 digits
        with pytest.raises(mc.MoecacheError):
            parse("9" * 400)
    with pytest.raises(mc.MoecacheError, match="too long"):
        parse_duration("1e300s")
    with pytest.raises(mc.MoecacheError, match="finite"):
        parse_duration(float("inf"))
    assert parse_int_list("8:10,4", high=9) == [4, 8, 9]
    with pytest.raises(mc.MoecacheError, match="more than 1,000,000 values"):
        parse_int_list("1:2000000")


def test_huge_expert_sizes_are_errors_not_overflows(tmp_path):
    path = tmp_path / "big.parquet"
    assert run("synth", "--out", path, "--tokens", 10, "--expert-bytes", "4e18")[0] == 0
    for args, message in [(["-c", "8"], "metadata expert_bytes (up to 3637978.81 TiB) is too large"),
                          (["--memory", "8e18"], "holds no expert of layer 0 (3637978.81 TiB each)"),
                          (["--memory", "8e18", "--scope", "global"], "holds only 2 experts of layer 0")]:
        code, out, err = run("replay", path, *args)
        assert (code, out) == (2, "") and message in err and len(err.strip().splitlines()) == 1


def test_replay_curve_sweep_read_weights_for_policies_that_score(tmp_path):
    """replay, curve and sweep load the router weights when the policy reads them."""
    trace = mc.synth(layers=2, experts=8, top_k=2, tokens=60, logits=True, seed=2)
    path = trace.save(tmp_path / "w.parquet")
    runner = CliRunner()
    replayed = runner.invoke(cli, ["replay", str(path), "-p", "score-lru", "--capacity", "4", "--json"])
    assert replayed.exit_code == 0, replayed.output
    assert json.loads(replayed.output)["hits"] == mc.replay(trace, "score-lru", 4).hits
    curved = runner.invoke(cli, ["curve", str(path), "-p", "score-lru", "--capacities", "4", "--json"])
    assert curved.exit_code == 0, curved.output
    swept = runner.invoke(cli, ["sweep", str(path), "--policies", "score-lru", "--capacities", "4",
                                "--out", str(tmp_path / "s")])
    assert swept.exit_code == 0, swept.output
