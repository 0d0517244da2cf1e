"""Synthetic traces: the in-memory trace keeps the shipped sample's numbers, the streamed
file equals it column for column whatever the block size, and streaming keeps memory
bounded; an interrupted `moecache synth` leaves a valid partial trace."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import moecache as mc
from moecache.cli import cli
from moecache.errors import MoecacheError
from moecache.synth import write_synth

COLUMNS = ("experts", "step", "seq", "pos", "token_id", "phase", "weights", "logits")
SAMPLE = Path(__file__).resolve().parents[1] / "traces" / "sample-synthetic.parquet"


def assert_same(got: mc.Trace, expected: mc.Trace) -> None:
    for name in COLUMNS:
        a, b = getattr(got, name), getattr(expected, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == b.dtype and np.array_equal(a, b), name
    assert got.meta == expected.meta


def test_in_memory_trace_is_the_shipped_sample():
    """`make sample-traces` still rebuilds traces/sample-synthetic.parquet bit for bit."""
    trace = mc.synth(8, 64, 8, 4096, sequences=4, stickiness=0.5, skew=0.8, seed=0, logits=True)
    assert_same(trace, mc.Trace.load(SAMPLE, logits=True))


def test_sequences_split_as_linspace():
    """Sequence i starts at int(linspace(0, tokens, sequences + 1)[i]), also across blocks."""
    rng = np.random.default_rng(0)
    pairs = [(1, 1), (10, 3), (10, 7), (10, 10), (97, 13), (1000, 999)]
    pairs += [(int(t), int(rng.integers(1, t + 1))) for t in rng.integers(1, 3000, 20)]
    for tokens, sequences in pairs:
        lengths = np.diff(np.linspace(0, tokens, sequences + 1).astype(np.int64))
        expected = np.repeat(np.arange(sequences), lengths)
        assert np.array_equal(mc.synth(1, 2, 1, tokens, sequences=sequences).seq, expected)


CASES = {
    "prefill": dict(layers=3, experts=16, top_k=4, tokens=101, sequences=7, prompt_len=5, seed=3),
    "scores": dict(layers=3, experts=16, top_k=4, tokens=101, sequences=7, prompt_len=5, seed=3,
                   logits=True),
    "one-token sequences": dict(layers=2, experts=8, top_k=8, tokens=50, sequences=50, prompt_len=2,
                                seed=1, logits=True),
    "sticky": dict(layers=2, experts=8, top_k=3, tokens=60, stickiness=1.0, seed=2),
    "skewed": dict(layers=4, experts=32, top_k=2, tokens=700, sequences=3, prompt_len=300, skew=10.0,
                   seed=9, expert_bytes=None),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("block_tokens", [1, 2, 7, 33, None])
def test_streamed_file_equals_in_memory_trace(tmp_path, case, block_tokens):
    """Blocks of 7 and 33 tokens split sequences and prefill steps (prompts of 5 and 300)."""
    args = CASES[case]
    path = write_synth(tmp_path / "s.parquet", **args, block_tokens=block_tokens)
    got = mc.Trace.load(path, logits=args.get("logits", False))
    assert_same(got, mc.synth(**args))
    assert not got.partial and not (tmp_path / "s.parquet.parts").exists()


def test_sticky_routing_carries_across_blocks(tmp_path):
    """Stickiness 1 keeps the first token's experts for good, through every block boundary."""
    trace = mc.Trace.load(write_synth(tmp_path / "s.parquet", 3, 16, 4, 40, stickiness=1.0,
                                      block_tokens=3))
    assert np.array_equal(trace.experts, np.broadcast_to(trace.experts[:1], trace.experts.shape))


def test_cli_streams_the_same_trace(tmp_path):
    out = tmp_path / "c.parquet"
    result = CliRunner().invoke(cli, ["synth", "--out", str(out), "--layers", "3", "--experts", "16",
                                      "--top-k", "4", "--tokens", "300", "--sequences", "4",
                                      "--prompt-len", "9", "--seed", "5", "--logits"])
    assert result.exit_code == 0, result.stderr
    assert result.stdout == f"wrote {out}: 300 tokens, 3 layers, E=16, K=4\n"
    expected = mc.synth(3, 16, 4, 300, sequences=4, prompt_len=9, seed=5, logits=True)
    assert_same(mc.Trace.load(out, logits=True), expected)


@pytest.mark.parametrize("streamed, args, message", [
    (True, dict(tokens=10, block_tokens=0), "block_tokens must be a positive whole number, got 0"),
    (True, dict(tokens=10, block_tokens=2.5), "block_tokens must be a positive whole number, got 2.5"),
    (True, dict(tokens=2**31), "more than 2,147,483,647 tokens in a sequence (positions are int32"),
    (True, dict(tokens=2**32, sequences=2**31 + 1), "2,147,483,649 sequences exceed 2,147,483,648"),
    (True, dict(tokens=2**52 + 1, sequences=2**30), "tokens 4,503,599,627,370,497 exceed 2**52"),
    (False, dict(tokens=10**15, sequences=10**7), "more than this machine has"),
], ids=["block", "fraction", "positions", "sequences", "tokens", "memory"])
def test_impossible_settings_are_one_line_errors(tmp_path, streamed, args, message):
    with pytest.raises(MoecacheError, match=re.escape(message)) as err:
        write_synth(tmp_path / "s.parquet", **args) if streamed else mc.synth(**args)
    assert "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


# peak resident memory from VmHWM, reset first: a child forked from the (large) test process
# inherits its high-water mark, which ru_maxrss keeps across exec
MEASURE = """
import json, sys
def peak():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
from moecache.synth import write_synth
out, tokens = sys.argv[1], int(sys.argv[2])
write_synth(out, 1, 64, 1, 1000, overwrite=True)  # imports and compiled kernels
warm = peak()
write_synth(out, 1, 64, 1, tokens, overwrite=True)
print(json.dumps({"warm": warm, "peak": peak()}))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/status")
def test_streaming_memory_does_not_grow_with_the_trace(tmp_path):
    """20M requests of one layer and K = 1 (20M rows): building them in memory and saving
    adds about 1.2 GB to the warmed-up process, streaming about 100 MB."""
    done = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path / "big.parquet"), "20000000"],
                          capture_output=True, text=True, timeout=300, check=True)
    rss = json.loads(done.stdout)
    assert rss["peak"] < 2**20  # KiB: within the bound of 1 GiB
    assert rss["peak"] - rss["warm"] < 400 * 2**10  # KiB: far below the 1.2 GB in-memory build
    assert pq.ParquetFile(tmp_path / "big.parquet").metadata.num_rows == 20_000_000


def test_sigterm_leaves_a_partial_trace_of_whole_blocks(tmp_path):
    """`moecache synth` stopped by SIGTERM after its first block: exit 130, and a trace marked
    partial holding a prefix of the trace (one sequence: the same as a shorter trace)."""
    out = tmp_path / "cut.parquet"
    proc = subprocess.Popen([sys.executable, "-m", "moecache.cli", "synth", "--out", str(out),
                             "--layers", "58", "--experts", "256", "--top-k", "8", "--tokens", "2000000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not any((tmp_path / "cut.parquet.parts").glob("part-*.parquet")):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no block was written"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert f"partial trace of every completed block in {out}" in err
    cut = mc.Trace.load(out)
    assert cut.partial and 0 < cut.num_tokens < 2_000_000 and cut.num_tokens % 9039 == 0
    expected = mc.synth(58, 256, 8, cut.num_tokens)
    assert np.array_equal(cut.experts, expected.experts) and np.array_equal(cut.step, expected.step)
    assert not os.path.exists(str(out) + ".parts")
