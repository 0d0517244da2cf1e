"""Nothing a user made is lost: part folders, interrupted saves, concurrent writers,
unwritable paths, resumed sweeps and replaced figures.

Interruptions and concurrent writers use real subprocesses. A subprocess is held in the
middle of a write by wrapping ``pyarrow.parquet.write_table``: the temporary file is
complete, not yet renamed, when the test interrupts it (SIGINT) or kills it (SIGKILL).
Unwritable paths: a path whose parent is a regular file and a path under /proc (both
refuse root too); a full disk and a read-only folder are small tmpfs mounts, skipped
where mounting is not allowed.
"""

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

import moecache as mc
from moecache import sweep as sweep_module
from moecache.cli import cli
from moecache.sweep import sweep
from moecache.trace_io import TraceWriter, parts_dir

HELD_WRITE = """
import os, sys, time
import pyarrow.parquet as pq
real = pq.write_table
def held(table, where, **kwargs):
    real(table, where, **kwargs)
    open(os.environ["READY"], "w").close()
    time.sleep(120)
pq.write_table = held
from moecache.cli import cli
cli.main(sys.argv[1:], prog_name="moecache")
"""
SYNTH = ("--layers", 2, "--experts", 16, "--top-k", 2, "--tokens", 1000)  # over 4 KB of Parquet


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


PROGRESS = re.compile(r"\w+: +\d+%\|")  # a progress bar's line, drawn before an error


def one_error(stderr, *fragments):
    lines = [line for line in re.split(r"[\r\n]+", stderr.strip()) if not PROGRESS.match(line)]
    assert len(lines) == 1 and lines[0].startswith("moecache: error: "), stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def save_routing(path):
    """A routing log of 50 tokens x 2 layers x top-2 of 16 experts, as a .npy array."""
    rng = np.random.default_rng(0)
    np.save(path, np.array([[rng.permutation(16)[:2] for _ in range(2)] for _ in range(50)]))
    return path


def listing(folder):
    return sorted(p.name for p in Path(folder).iterdir())


@contextlib.contextmanager
def held_write(marker_dir, *args):
    """A moecache subprocess stopped inside its first Parquet write (temporary file complete)."""
    ready = marker_dir / f"ready-{time.monotonic_ns()}"
    # the default SIGINT disposition, which a background job would not inherit
    proc = subprocess.Popen([sys.executable, "-c", HELD_WRITE, *map(str, args)],
                            env={**os.environ, "READY": str(ready)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the subprocess never reached its write"
            time.sleep(0.05)
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


@pytest.fixture()
def markers(tmp_path_factory):
    return tmp_path_factory.mktemp("markers")


@pytest.fixture()
def trace_file(tmp_path):
    path = tmp_path / "t.parquet"
    code, _, err = run("synth", "--out", path, *SYNTH)
    assert code == 0, err
    return path


# -- interrupted one-shot saves: the old file and nothing else --------------------------------------

def test_interrupted_force_keeps_the_old_file_and_nothing_else(tmp_path, markers, trace_file):
    """A one-shot save (synth streams instead: an interrupt leaves a partial trace, tests/test_synth.py)."""
    before = trace_file.read_bytes()
    source = save_routing(markers / "routing.npy")
    args = ("import", source, "--out", trace_file, "--force")
    with held_write(markers, *args) as proc:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert trace_file.read_bytes() == before
    assert listing(tmp_path) == ["t.parquet"]  # no partial file, part folder, temporary or lock file
    assert not mc.Trace.load(trace_file).partial


# -- concurrent writers --------------------------------------------------------------------------------

def test_a_second_writer_is_locked_out_and_a_killed_one_blocks_nobody(tmp_path, markers, trace_file):
    before = trace_file.read_bytes()
    with held_write(markers, "synth", "--out", trace_file, "--force", *SYNTH, "--seed", 7) as proc:
        code, _, err = run("synth", "--out", trace_file, "--force", *SYNTH, "--seed", 8)
        assert code == 2
        one_error(err, str(trace_file), "another moecache process is writing it")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert trace_file.read_bytes() == before
    assert len(listing(tmp_path)) == 3  # the killed writer's lock and temporary file stay
    code, _, err = run("synth", "--out", trace_file, "--force", *SYNTH, "--seed", 9)
    assert code == 0, err
    assert listing(tmp_path) == ["t.parquet"]  # ... until the next writer takes them over
    assert trace_file.read_bytes() != before


def test_two_sweeps_to_one_table(tmp_path, markers, trace_file):
    out = tmp_path / "results"
    with held_write(markers, "sweep", trace_file, "--policies", "lru", "--out", out) as proc:
        code, _, err = run("sweep", trace_file, "--policies", "fifo", "--out", out, "--force")
        assert code == 2
        one_error(err, "results.parquet", "another moecache process is writing it")
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert listing(tmp_path) == ["t.parquet"]


# -- part folders: refused, or cleared of our own files only --------------------------------------------

def _blocks(trace, writer, size=40):
    for start in range(0, trace.num_tokens, size):
        part = slice(start, start + size)
        writer.write(trace.experts[part], step=trace.step[part], seq=trace.seq[part], pos=trace.pos[part],
                     phase=trace.phase[part])


@pytest.fixture()
def killed_capture(tmp_path):
    """The part folder a SIGKILLed capture leaves (the writer is never closed)."""
    trace = mc.synth(layers=2, experts=8, top_k=2, tokens=200, seed=1)
    out = tmp_path / "cap.parquet"
    writer = TraceWriter(out, trace.meta, flush_tokens=40)
    _blocks(trace, writer)
    parts = parts_dir(out)
    files = listing(parts)
    del writer
    return trace, out, parts, files


def test_a_part_folder_is_refused_without_force(tmp_path, killed_capture):
    trace, out, parts, files = killed_capture
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello\n")
    code, _, err = run("capture", tmp_path / "no-model", "--prompts", prompts, "--out", out)
    assert code == 2
    one_error(err, f"{parts}: holds an interrupted trace (read it with `moecache info {parts}`)", "--force")
    with pytest.raises(mc.TraceError, match="holds an interrupted trace"):
        TraceWriter(out, trace.meta)
    assert listing(parts) == files
    np.testing.assert_array_equal(mc.Trace.load(parts).experts, trace.experts)


def test_force_replaces_only_our_own_part_files(killed_capture):
    trace, out, parts, files = killed_capture
    (parts / "notes.txt").write_text("mine")
    with pytest.raises(mc.TraceError, match=r"holds files moecache did not write \(notes.txt\)"):
        TraceWriter(out, trace.meta, overwrite=True)
    assert listing(parts) == sorted([*files, "notes.txt"])
    (parts / "notes.txt").unlink()
    (parts / ".part-000099.parquet.abcd1234.tmp").write_bytes(b"half")
    with TraceWriter(out, trace.meta, overwrite=True) as writer:
        _blocks(trace, writer, 200)
    assert not parts.exists()
    assert mc.Trace.load(out).num_tokens == 200


def test_one_shot_saves_never_touch_a_part_folder(tmp_path):
    parts = parts_dir(tmp_path / "data")
    parts.mkdir()
    (parts / "notes.txt").write_text("mine")
    code, _, err = run("import", save_routing(tmp_path / "r.npy"), "--out", tmp_path / "data")
    assert code == 0, err
    assert (parts / "notes.txt").read_text() == "mine"
    code, _, err = run("synth", "--out", tmp_path / "other", *SYNTH)  # streamed: its own part folder
    assert code == 0, err
    assert (parts / "notes.txt").read_text() == "mine"


# -- unwritable paths: one line naming the path and the reason, nothing left behind ----------------------

def _writing_commands(trace_file, results, out):
    return {
        "synth": ("synth", "--out", out, *SYNTH),
        "import": ("import", trace_file.with_name("r.npy"), "--out", out),
        "curve": ("curve", trace_file, "--out", out.with_suffix(".csv")),
        "sweep": ("sweep", trace_file, "--policies", "lru", "--out", out),
        "plot": ("plot", results, "--out", out),
    }


@pytest.fixture()
def inputs(tmp_path, trace_file):
    save_routing(tmp_path / "r.npy")
    results = tmp_path / "sweep.parquet"
    sweep([trace_file], ("lru",), out=results, progress=False)
    return trace_file, results


@pytest.mark.parametrize("command", ["synth", "import", "curve", "sweep", "plot"])
@pytest.mark.parametrize("where", ["parent is a file", "/proc"])
def test_unwritable_paths_are_one_line(tmp_path, inputs, command, where):
    trace_file, results = inputs
    if where == "/proc":
        out, reason = Path("/proc/moecache-test/out.parquet"), "cannot write:"
    else:
        (tmp_path / "file").write_text("a file")
        out, reason = tmp_path / "file" / "sub" / "out.parquet", "is not a folder"
    before = listing(tmp_path)
    code, _, err = run(*_writing_commands(trace_file, results, out)[command])
    assert code == 2
    one_error(err, str(out.parent), reason)
    assert listing(tmp_path) == before


@contextlib.contextmanager
def tmpfs(folder, size):
    folder.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                                 capture_output=True).returncode == 0
    except OSError:
        mounted = False
    if not mounted:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, inputs):
    trace_file, results = inputs
    with tmpfs(tmp_path / "small", "4k") as small:  # one page: each output is larger
        for command in ("synth", "sweep", "plot"):
            code, _, err = run(*_writing_commands(trace_file, results, small / "out.parquet")[command])
            assert code == 2, (command, err)
            one_error(err, str(small), "No space left on device")
            assert listing(small) == [], command


def test_a_read_only_folder_is_one_line(tmp_path, inputs):
    trace_file, _ = inputs
    with tmpfs(tmp_path / "ro", "1m") as folder:
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        code, _, err = run("synth", "--out", folder / "x.parquet", *SYNTH)
        assert code == 2
        one_error(err, f"{folder / 'x.parquet'}: cannot write: Read-only file system")


def test_a_failed_capture_write_keeps_its_committed_parts(tmp_path):
    trace = mc.synth(layers=2, experts=8, top_k=2, tokens=200, seed=1)
    out = tmp_path / "cap.parquet"
    writer = TraceWriter(out, trace.meta, flush_tokens=40)
    _blocks(trace, writer)
    (tmp_path / "cap.parquet").mkdir()  # the final rename cannot replace a folder
    with pytest.raises(mc.MoecacheError, match=f"the completed steps are kept in {parts_dir(out)}"):
        writer.close()
    assert mc.Trace.load(parts_dir(out)).num_tokens == 200


# -- readers open regular files only -----------------------------------------------------------------------

@pytest.mark.parametrize("command", [("info",), ("replay", "--capacity", 4), ("sweep", "--out", "x"),
                                     ("plot", "--out", "figures")])
def test_a_named_pipe_is_refused_not_read(tmp_path, command):
    pipe = tmp_path / ("p.parquet" if command[0] != "plot" else "p.csv")
    os.mkfifo(pipe)
    name, *options = command
    proc = subprocess.run([sys.executable, "-m", "moecache.cli", name, str(pipe), *map(str, options)],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 2
    one_error(proc.stderr, str(pipe), "not a regular file")


# -- sweeps ------------------------------------------------------------------------------------------------

def test_resume_refuses_other_settings_and_keeps_same_ones(tmp_path, trace_file):
    out = tmp_path / "r"
    code, _, err = run("sweep", trace_file, "--policies", "lru", "--capacities", "2:8", "--out", out)
    assert code == 0, err
    for option, message in [(("--bandwidth", "4GB/s"), "made with --bandwidth (bytes/s) (not given), "
                              "this sweep has 4000000000.0"),
                             (("--per-token",), "made with --per-token false, this sweep has true"),
                             (("--capacities", "2:16"), "made with --capacities [2, 3, ..., 8] (7 values), "
                              "this sweep has [2, 3, ..., 16] (15 values)")]:
        args = ("--capacities", "2:8", *option) if option[0] != "--capacities" else option
        code, _, err = run("sweep", trace_file, "--policies", "lru,fifo", "--out", out, "--resume", *args)
        assert code == 2
        one_error(err, f"{out}.parquet: {message}")
    code, _, err = run("sweep", trace_file, "--policies", "lru,fifo", "--capacities", "2:8", "--out", out,
                       "--resume")
    assert code == 0, err
    table = pd.read_parquet(f"{out}.parquet")
    assert len(table) == 14 and not table.duplicated(["trace", "policy", "scope", "capacity"]).any()


@pytest.mark.parametrize("args, message", [
    (("--resume", "--force"), "--resume keeps an existing table and --force replaces it"),
    (("--policies", ","), "--policies names none"),
    (("--scopes", " , "), "--scopes names none"),
    (("--workers", "-1"), "--workers must be an integer of at least 1, got -1"),
    (("--workers", "0"), "--workers must be an integer of at least 1, got 0"),
])
def test_sweep_options_are_checked(tmp_path, trace_file, args, message):
    code, _, err = run("sweep", trace_file, "--out", tmp_path / "r", *args)
    assert code == 2
    one_error(err, message)
    assert listing(tmp_path) == ["t.parquet"]


def test_a_trace_given_twice_is_an_error(tmp_path, trace_file):
    code, _, err = run("sweep", trace_file, tmp_path / "." / "t.parquet", "--out", tmp_path / "r")
    assert code == 2
    one_error(err, "trace given twice (also as")


def test_resume_refuses_a_foreign_table(tmp_path, trace_file):
    pd.DataFrame({"trace": ["x"], "capacity": [1]}).to_parquet(tmp_path / "r.parquet")
    code, _, err = run("sweep", trace_file, "--out", tmp_path / "r", "--resume")
    assert code == 2
    one_error(err, "not a table written by `moecache sweep`")
    (tmp_path / "r.csv").write_text("mine\n")
    code, _, err = run("sweep", trace_file, "--out", tmp_path / "q.parquet")
    assert code == 0, err
    (tmp_path / "q.parquet").unlink()
    (tmp_path / "q.csv").write_text("mine\n")
    code, _, err = run("sweep", trace_file, "--out", tmp_path / "q.parquet")
    assert code == 2
    one_error(err, "q.csv: already exists")
    assert (tmp_path / "q.csv").read_text() == "mine\n"


def test_a_huge_capacity_range_is_bounded_by_the_traces(tmp_path, trace_file):
    started = time.monotonic()
    table = sweep([trace_file], ("lru",), ("layer", "global"), "2:1000000000", out=tmp_path / "r",
                  progress=False)
    assert time.monotonic() - started < 30
    assert table.groupby("scope")["capacity"].max().to_dict() == {"global": 32, "layer": 16}


def test_an_unreachable_dask_scheduler_is_one_line(tmp_path, trace_file, monkeypatch):
    pytest.importorskip("dask.distributed")
    monkeypatch.setattr(sweep_module, "CONNECT_TIMEOUT", 1)
    started = time.monotonic()
    code, _, err = run("sweep", trace_file, "--out", tmp_path / "r", "--executor", "dask",
                       "--scheduler", "tcp://127.0.0.1:1")
    assert code == 2
    one_error(err, "--scheduler tcp://127.0.0.1:1: cannot connect:")
    assert time.monotonic() - started < 30
    assert listing(tmp_path) == ["t.parquet"]


# -- plots ---------------------------------------------------------------------------------------------------

def test_plot_replaces_figures_only_with_force_and_removes_stale_ones(tmp_path, inputs):
    trace_file, results = inputs
    figures = tmp_path / "fig"
    code, _, err = run("plot", results, "--out", figures)
    assert code == 0, err
    first = {name: (figures / name).read_bytes() for name in listing(figures)}
    assert len(first) == 8
    code, _, err = run("plot", results, "--out", figures, "--format", "svg")
    assert code == 2
    one_error(err, f"{figures}: holds figures of an earlier plot", "--force")
    assert {name: (figures / name).read_bytes() for name in listing(figures)} == first
    (figures / "notes.txt").write_text("mine")
    code, _, err = run("plot", results, "--out", figures, "--format", "svg", "--force")
    assert code == 0, err
    assert listing(figures) == sorted(["notes.txt", "bytes_per_token_vs_capacity.svg",
                                       "hit_rate_vs_capacity.svg", "per_layer_reuse.svg",
                                       "reuse_vs_window.svg"])


@pytest.mark.parametrize("args, message", [
    (("--traces", "other.parquet"), "--traces other.parquet: not a trace of the results table (it holds "),
    (("--window", "100000000"), "--window must be from 1 to 4096 steps, got 100000000"),
    (("--bootstrap", "1000000000"), "--bootstrap must be from 0 to 100000 resamples, got 1000000000"),
    (("--seed", "-1"), "Invalid value for '--seed'"),
])
def test_plot_options_are_checked(tmp_path, monkeypatch, inputs, args, message):
    _, results = inputs
    mc.synth(layers=2, experts=8, top_k=2, tokens=30).save(tmp_path / "other.parquet")
    monkeypatch.chdir(tmp_path)  # restored after the test
    code, _, err = run("plot", results, "--out", tmp_path / "fig", *args)
    assert code == 2
    one_error(err, message)
    assert not (tmp_path / "fig").exists()


def test_atomic_folder_replaces_only_when_complete(tmp_path):
    from moecache.errors import MoecacheError
    from moecache.files import atomic_folder

    out = tmp_path / "ckpt"
    with atomic_folder(out, overwrite=False) as staging:
        (staging / "a.txt").write_text("one")
        assert not out.exists()
    assert (out / "a.txt").read_text() == "one"
    with pytest.raises(MoecacheError, match="already exists"), atomic_folder(out, overwrite=False) as staging:
        (staging / "a.txt").write_text("two")
    with pytest.raises(RuntimeError), atomic_folder(out, overwrite=True) as staging:
        (staging / "a.txt").write_text("two")
        raise RuntimeError("failed half-way")
    assert (out / "a.txt").read_text() == "one"
    with atomic_folder(out, overwrite=True) as staging:
        (staging / "b.txt").write_text("two")
    assert [p.name for p in out.iterdir()] == ["b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no staging, backup or lock left
