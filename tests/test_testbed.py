"""The testbed (moecache/testbed.py): a tiny trace replayed for real with O_DIRECT reads. Timing
accuracy is the benchmark's job (benchmarks/bench_testbed.py), not asserted here."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import moecache as mc
from moecache import profiles
from moecache.cli import cli
from moecache.errors import MoecacheError
from moecache.testbed import ALIGN, Schedule, calibrate, default_expert_bytes, expert_file, first_steps, walk
from moecache.testbed import testbed as run  # a name pytest does not collect

EXPERT_BYTES = 64 * 1024
LINK = profiles.Link(1e9, 1e-4, 2)
FAST = {"compute_us": 50.0, "dense_us": 20.0, "queue_depth": 2, "calibrate": LINK}


@pytest.fixture(scope="module")
def directory(tmp_path_factory):
    """A folder on the repository's disk (tmp_path may be a tmpfs) where O_DIRECT works."""
    here = Path(__file__).parent
    folder = Path(os.environ.get("MOECACHE_TESTBED_DIR", here))
    try:
        with expert_file(2, ALIGN, folder):
            pass
    except MoecacheError as err:
        pytest.skip(f"O_DIRECT is refused here: {err}")
    return folder


@pytest.fixture(scope="module")
def trace():
    return mc.synth(layers=2, experts=8, top_k=2, tokens=30, seed=1, expert_bytes=EXPERT_BYTES)


def test_replays_for_real_and_predicts(trace, directory):
    result = run(trace, "lru", 3, directory=directory, **{**FAST, "calibrate": True})
    out = result.to_dict()
    for key in ("measured_tpot_s", "predicted_tpot_s", "relative_error", "link", "observed_link",
                "measured_tpot_p50_s", "measured_tpot_p95_s", "direct_io"):
        assert key in out
    assert out["measured_tpot_s"] > 0 and out["predicted_tpot_s"] > 0
    assert out["direct_io"] is True
    assert out["file_bytes"] == 2 * 8 * EXPERT_BYTES
    replayed = mc.replay(trace, "lru", 3)
    assert (result.hits, result.misses, result.reads) == (replayed.hits, replayed.misses, replayed.misses)
    assert result.prediction.hits == replayed.hits
    assert len(result.step_seconds) == trace.num_steps
    assert np.all(np.diff(result.walked.ends) >= 0)
    assert np.all(result.walked.read_ends >= result.walked.read_starts)
    json.dumps(out)
    assert not list(directory.glob("moecache-testbed-*"))  # the expert file is removed


def test_prefetch_reads_are_issued_ahead(trace, directory):
    result = run(trace, "lru", 3, prefetch="oracle", directory=directory, **FAST)
    plain = mc.replay(trace, "lru", 3)
    assert result.prefetch_reads > 0
    assert result.prefetch_reads + result.reads <= plain.misses + result.prefetch_reads
    assert result.prediction.prefetched == result.prefetch_reads


def test_given_link_and_max_steps(trace, directory):
    result = run(trace, "lru", 4, max_steps=10, directory=directory, **FAST)
    assert result.link == LINK and result.steps == 10
    assert result.prediction.links[0]["bandwidth"] == 1e9


def test_calibration_is_positive(directory):
    with expert_file(16, EXPERT_BYTES, directory) as store:
        link = calibrate(store.path, EXPERT_BYTES, 2, seconds=0.05)
    assert link.bandwidth > 0 and link.latency >= 0 and link.queue_depth == 2


def test_walk_computes_after_reads(directory):
    """One position, one expert read: the expert's busy-wait starts after its read completed."""
    schedule = Schedule(np.zeros(1, np.int64), np.array([0, 1]), np.array([3]), np.array([True]),
                        np.zeros(2, np.int64), np.zeros(0, np.int64), 0, 1)
    with expert_file(4, EXPERT_BYTES, directory) as store:
        walked = walk(schedule, store, 1_000_000, 1, 1)
    assert walked.ends[0] >= walked.read_ends[0] + 1e-3
    assert walked.expert_s >= 1e-3


def test_defaults_and_cuts(trace):
    assert default_expert_bytes(trace) == EXPERT_BYTES
    big = mc.synth(layers=4, experts=32, top_k=2, tokens=5, expert_bytes=2**30)
    assert default_expert_bytes(big) * 4 * 32 <= 256 * 2**20
    assert default_expert_bytes(big) % ALIGN == 0
    assert first_steps(trace, 5).num_steps == 5
    assert first_steps(trace, 1000).num_steps == trace.num_steps


@pytest.mark.parametrize("call, message", [
    (lambda t, d: run(t, "lru", 1, directory=d), "below the largest step set"),
    (lambda t, d: run(t, "lru", 3, directory=d / "missing"), "not a directory"),
    (lambda t, d: run("trace.parquet", "lru", 3, directory=d), "needs a Trace"),
    (lambda t, d: run(t, "lru", 3, queue_depth=0, directory=d), "queue depth"),
    (lambda t, d: run(t, "lru", 3, compute_us=-1, directory=d), "compute_us"),
    (lambda t, d: run(t, "lru", 3, max_steps=0, directory=d), "max steps"),
    (lambda t, d: run(t, "lru", 3, calibrate=False, directory=d), "calibrate must be"),
    (lambda t, d: run(t, "lru", 3, prefetch="nope", directory=d), "unknown prefetcher"),
    (lambda t, d: run(t, "lru", 3, expert_bytes=2**50, directory=d), "cache needs .* of RAM"),
])
def test_bad_input_is_one_line(trace, directory, call, message):
    with pytest.raises(MoecacheError, match=message) as err:
        call(trace, directory)
    assert "\n" not in str(err.value)


def test_memory_filesystems_are_refused(tmp_path):
    if not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm")
    with pytest.raises(MoecacheError, match="tmpfs"), expert_file(2, ALIGN, "/dev/shm"):
        pass


def test_cli_json(trace, directory, tmp_path):
    path = tmp_path / "t.parquet"
    trace.save(path)
    runner = CliRunner()
    result = runner.invoke(cli, ["testbed", str(path), "-c", "3", "--json", "--directory", str(directory),
                                 "--compute-us", "50", "--dense-us", "20", "--max-steps", "10",
                                 "--link", "--bandwidth", "1GB/s", "--latency", "100us"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["measured_tpot_s"] > 0 and out["predicted_tpot_s"] > 0 and out["steps"] == 10
    bad = runner.invoke(cli, ["testbed", str(path), "-c", "1", "--directory", str(directory)])
    assert bad.exit_code == 2 and bad.output.count("\n") == 1 and "error" in bad.output
    link = runner.invoke(cli, ["testbed", str(path), "-c", "3", "--link", "--directory", str(directory)])
    assert link.exit_code == 2 and "--bandwidth" in link.output
    calibrated = runner.invoke(cli, ["testbed", str(path), "-c", "3", "--directory", str(directory),
                                     "--max-steps", "5", "--compute-us", "10"])
    assert calibrated.exit_code == 0 and "relative error" in calibrated.stdout


def test_an_expert_file_larger_than_the_free_disk_is_refused(tmp_path):
    from moecache.testbed import expert_file

    with pytest.raises(MoecacheError, match="the disk has .* free: give smaller --expert-bytes"):
        with expert_file(2**20, 2**40, tmp_path):
            pass
    assert not list(tmp_path.iterdir())
