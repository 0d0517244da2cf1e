"""Fuzzing the commands' arguments: every run ends with exit 0 and sane output, or exit 2
with exactly one line on stderr; never a traceback, another exit code, a hang or a
partial output file.

Values are drawn from edge cases (0, -1, huge, 2**63, nan, inf, 1e400, empty strings,
junk units) over a tiny trace, a one-step trace, an empty trace and files that are not
traces. Each run is guarded by a wall clock: a hang dumps every thread's stack and ends
the test process (faulthandler), so it cannot pass silently.
"""

from __future__ import annotations

import faulthandler
import re

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

import moecache as mc
from moecache.cli import cli

GUARD_S = 120  # far above any single run here (well under a second each)

# (usual values, edge values) per kind of option; runs draw usual values 4 times as often
INTS = (["1", "2", "4", "8", "16"], ["0", "-1", str(2**31), str(2**63 - 1), str(2**63), str(-(2**63) - 1),
                                     "1e3", "1.5", "", "abc", "nan"])
FLOATS = (["0", "0.25", "1", "2.5"], ["-0.0", "-1", "20", "1e400", "-1e400", "nan", "inf", "-inf", "", "x"])
SIZES = (["1000", "1MiB", "16MiB", "1GiB"], ["1", "1e400", "1e30", "0", "0.4", "-1", "nan", "8 parsecs", "",
                                              "4GB/s", str(2**63), str(2**63 - 1)])
BANDWIDTHS = (["ufs4", "UFS4", "nvme5", "4GB/s", "900MiB/s"], ["1", "1e400", "0", "fast", "", "nan", "4GB"])
DURATIONS = (["0", "80us", "1.2ms"], ["1e400", "-1", "nan", "1MiB", "", str(2**63)])
LISTS = (["8", "4,8", "2:16:3", "2:1000000000"], ["1:3:0", "4:2", ",", "", "x", str(2**63), "-3", "0:4",
                                                  "1:9223372036854775807"])
POLICIES = (["lru", "fifo", "lfu", "opt", "random", "clock", "clock:bits=3"],
            ["nosuch", "", "clock:bits=99", "lru:x=1"])
SCOPES = (["layer", "global"], ["pool", ""])
TRACE_NAMES = (["tiny"], ["one", "empty", "text", "missing"])
FLAG = ([], [])
NUMBER_WORD = re.compile(r"(?<![A-Za-z])(nan|NaN|-?inf|Infinity)(x|%|\b)")  # also "nanx", "inf%"


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    text = root / "text.parquet"
    text.write_text("not a trace")
    empty = mc.Trace.from_arrays(np.zeros((0, 2, 2), np.int16), num_experts=8, expert_bytes=1000)
    return {
        "tiny": mc.synth(layers=2, experts=8, top_k=2, tokens=30, sequences=2, prompt_len=3, seed=1,
                         logits=True).save(root / "tiny.parquet"),
        "one": mc.synth(layers=2, experts=8, top_k=2, tokens=1).save(root / "one.parquet"),
        "empty": empty.save(root / "empty.parquet"),
        "text": text,
        "missing": root / "missing.parquet",
    }


def values(kind: tuple[list[str], list[str]]) -> st.SearchStrategy[str]:
    """One value of ``kind``: a usual one 4 times in 5, else an edge case."""
    usual, edge = kind
    return st.sampled_from(usual * -(-4 * len(edge) // len(usual)) + edge)


def options(**kinds: tuple[list[str], list[str]]) -> st.SearchStrategy[list[str]]:
    """A random subset of the options, each with a value of its kind (``FLAG``: no value)."""
    def render(picked: dict[str, str | None]) -> list[str]:
        return [name if value is None else f"{name}={value}" for name, value in picked.items()]

    return st.dictionaries(st.sampled_from(sorted(kinds)), st.none(), max_size=len(kinds)).flatmap(
        lambda names: st.fixed_dictionaries(
            {name: values(kinds[name]) if kinds[name] != FLAG else st.none() for name in names}
        )).map(render)


def check(args: list[str], *outputs) -> None:
    """Run the command and assert the contract of the module docstring."""
    for out in outputs:
        out.unlink(missing_ok=True)
    faulthandler.dump_traceback_later(GUARD_S, exit=True)
    try:
        result = CliRunner().invoke(cli, [str(a) for a in args])
    finally:
        faulthandler.cancel_dump_traceback_later()
    detail = (args, result.exit_code, repr(result.exception), result.stderr)
    assert result.exit_code in (0, 2), detail
    assert "Traceback" not in result.output, detail
    if result.exit_code == 2:
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("moecache: error: "), detail
        assert result.stdout == "", detail
        assert not any(out.exists() for out in outputs), detail
    else:
        assert result.exception is None, detail
        assert result.stdout.strip() or any(out.exists() for out in outputs), detail
        assert not NUMBER_WORD.search(result.stdout), detail


@settings(max_examples=40)
@given(name=values(TRACE_NAMES), budget=st.sampled_from([["-c", "8"], ["-c", "16"], ["--memory", "1GiB"]]),
       args=options(
    **{"--policy": POLICIES, "--capacity": INTS, "--memory": SIZES, "--scope": SCOPES,
       "--bandwidth": BANDWIDTHS, "--latency": DURATIONS, "--per-token": FLAG, "--seed": INTS,
       "--per-layer": FLAG, "--json": FLAG}))
def test_replay(traces, name, budget, args):
    check(["replay", traces[name], *budget, *args])  # a later --capacity or --memory overrides


@settings(max_examples=40)
@given(name=values(TRACE_NAMES), args=options(
    **{"--policy": POLICIES, "--scope": SCOPES, "--capacities": LISTS, "--bandwidth": BANDWIDTHS,
       "--latency": DURATIONS, "--per-token": FLAG, "--seed": INTS, "--json": FLAG}))
def test_curve(traces, name, args):
    check(["curve", traces[name], *args])


@settings(max_examples=30)
@given(base=values(TRACE_NAMES), remoe=values(TRACE_NAMES), args=options(
    **{"--capacity": LISTS, "--policies": (["lru", "lru,opt"], [",", "x", ""]), "--scope": SCOPES,
       "--bandwidth": (["ufs4", "ufs4,2GB/s"], [",", "", "1e400", "x"]), "--compute-ms": FLOATS,
       "--per-token": FLAG, "--json": FLAG}))
def test_compare(traces, base, remoe, args):
    check(["compare", traces[base], traces[remoe], *args])


@settings(max_examples=40)
@given(name=values(TRACE_NAMES), args=options(
    **{"--mode": (["recent", "cache"], ["sticky", ""]), "--bias": FLOATS, "--window": INTS,
       "--capacity": INTS, "--label": (["x"], [""])}))
def test_reroute(traces, tmp_path_factory, name, args):
    out = tmp_path_factory.getbasetemp() / "rerouted.parquet"
    check(["reroute", traces[name], "--out", out, *args], out)


SMALL = (["1", "2", "3", "40"], ["0", "-1", str(2**63), "", "x"])


@settings(max_examples=60)
@given(args=options(
    **{"--layers": (["1", "2"], ["0", "-1", "40000", str(2**63), ""]),
       "--experts": (["2", "8", "32768"], ["0", "1", "40000", str(2**63), "nan"]), "--top-k": SMALL,
       "--tokens": SMALL, "--sequences": SMALL, "--prompt-len": SMALL, "--stickiness": FLOATS,
       "--skew": FLOATS, "--seed": INTS, "--expert-bytes": SIZES, "--logits": FLAG}))
def test_synth(tmp_path_factory, args):
    out = tmp_path_factory.getbasetemp() / "synth.parquet"
    check(["synth", "--out", out, *args], out)
