"""Traces by URI (moecache.storage) and sweeps on a dask.distributed cluster whose workers
read the traces from storage themselves."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
import pytest
from click.testing import CliRunner

import moecache as mc
from moecache import storage
from moecache import sweep as sweep_module
from moecache.cli import cli
from moecache.storage import Location, locate, redact
from moecache.sweep import sweep
from moecache.trace_io import has_weights, open_parquet_files, storage_stats

SHIPPED = Path(__file__).resolve().parent.parent / "traces"
TRACES = ("toy-baseline.parquet", "toy-remoe.parquet")
POLICIES = ("lru", "fifo")
CAPACITIES = "4,8,16"


def run(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.output


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


@pytest.fixture()
def copies(tmp_path: Path) -> list[Path]:
    """The two shipped toy traces copied into a folder of their own."""
    out = []
    for name in TRACES:
        shutil.copyfile(SHIPPED / name, tmp_path / name)
        out.append(tmp_path / name)
    return out


@pytest.fixture()
def memory():
    """An in-memory pyarrow filesystem (fsspec's) and a fresh folder on it, removed afterwards."""
    fsspec_memory = pytest.importorskip("fsspec.implementations.memory")
    backing = fsspec_memory.MemoryFileSystem()
    root = f"/moecache-{uuid.uuid4().hex}"
    filesystem = pafs.PyFileSystem(pafs.FSSpecHandler(backing))
    filesystem.create_dir(root)
    yield filesystem, root
    backing.rm(root, recursive=True)


def put(filesystem: pafs.FileSystem, path: str, data: bytes) -> Location:
    with filesystem.open_output_stream(path) as out:
        out.write(data)
    return Location(path, filesystem, f"memory:/{path}")


def local_table(paths: list[str], **options: object) -> pd.DataFrame:
    return sweep(paths, POLICIES, ("layer", "global"), CAPACITIES, progress=False, workers=2, **options)


# -- the storage module on a filesystem that is not the OS one -----------------------------------------

def test_a_trace_on_an_in_memory_filesystem_reads_as_the_local_file(memory):
    filesystem, root = memory
    local = SHIPPED / TRACES[0]
    where = put(filesystem, f"{root}/a.parquet", local.read_bytes())
    assert where.kind() == "file" and where.size() == local.stat().st_size
    assert Location(root, filesystem).kind() == "folder"
    assert Location(f"{root}/none", filesystem).kind() == "missing"

    remote, reference = mc.Trace.load(where), mc.Trace.load(local)
    assert remote.source == f"memory:/{root}/a.parquet"
    assert remote.meta == reference.meta
    for name in ("experts", "weights", "step", "seq", "pos", "phase", "token_id"):
        np.testing.assert_array_equal(getattr(remote, name), getattr(reference, name))
    assert storage_stats(where) == storage_stats(local)
    assert has_weights(where)
    assert remote.partial is False


def test_a_part_folder_on_an_in_memory_filesystem(memory):
    filesystem, root = memory
    data = (SHIPPED / TRACES[0]).read_bytes()
    filesystem.create_dir(f"{root}/t.parquet.parts")
    put(filesystem, f"{root}/t.parquet.parts/part-000000.parquet", data)
    put(filesystem, f"{root}/t.parquet.parts/notes.txt", b"not a part")
    folder = Location(f"{root}/t.parquet.parts", filesystem, f"memory:/{root}/t.parquet.parts")
    parts = folder.glob("part-*.parquet")
    assert [p.name for p in parts] == [f"memory:/{root}/t.parquet.parts/part-000000.parquet"]
    loaded = mc.Trace.load(folder)
    assert loaded.partial and loaded.num_tokens == mc.Trace.load(SHIPPED / TRACES[0]).num_tokens
    assert storage_stats(folder)[0] == len(data)

    missing = Location(f"{root}/t.parquet", filesystem, f"memory:/{root}/t.parquet")
    with pytest.raises(mc.TraceError) as err:
        mc.Trace.load(missing)
    assert str(err.value) == (f"memory:/{root}/t.parquet: no such file (an interrupted write left "
                              f"memory:/{root}/t.parquet.parts: load that)")
    filesystem.create_dir(f"{root}/empty")
    with pytest.raises(mc.TraceError, match=r"empty: folder holds no trace parts \(part-\*\.parquet\)$"):
        mc.Trace.load(Location(f"{root}/empty", filesystem, f"memory:/{root}/empty"))


@pytest.mark.parametrize(("cut", "message"), [
    (lambda data: data[:len(data) // 2], "truncated Parquet file (no footer): it was not written completely"),
    (lambda data: b"", "not a Parquet file"),
    (lambda data: b"PAR1" + b"\0" * 100 + b"PAR1", "unreadable Parquet file: "),
])
def test_a_damaged_object_is_one_line_naming_it(memory, cut, message):
    filesystem, root = memory
    where = put(filesystem, f"{root}/bad.parquet", cut((SHIPPED / TRACES[0]).read_bytes()))
    with pytest.raises(mc.TraceError) as err:
        mc.Trace.load(where)
    assert str(err.value).startswith(f"memory:/{root}/bad.parquet: {message}")
    assert "\n" not in str(err.value)


def test_a_parquet_object_that_is_not_a_trace(memory, tmp_path):
    filesystem, root = memory
    pd.DataFrame({"x": [1, 2]}).to_parquet(tmp_path / "x.parquet")
    where = put(filesystem, f"{root}/x.parquet", (tmp_path / "x.parquet").read_bytes())
    with pytest.raises(mc.TraceError, match=r"x\.parquet: no 'moecache' metadata: not a moecache trace"):
        open_parquet_files(where)


# -- URIs -------------------------------------------------------------------------------------------------

def test_file_uris_load_everywhere_a_path_does(copies):
    uri = copies[0].as_uri()
    assert uri.startswith("file:///")
    by_uri, by_path = mc.Trace.load(uri), mc.Trace.load(copies[0])
    assert by_uri.source == uri
    np.testing.assert_array_equal(by_uri.experts, by_path.experts)
    assert storage_stats(uri) == storage_stats(copies[0])

    code, out = run("info", uri)
    assert code == 0, out
    assert out.splitlines()[0].split() == ["trace", uri]
    code, by_uri_json = run("replay", uri, "--capacity", 8, "--json")
    code_path, by_path_json = run("replay", copies[0], "--capacity", 8, "--json")
    assert code == code_path == 0, by_uri_json
    assert by_uri_json.replace(uri, "T") == by_path_json.replace(str(copies[0]), "T")


def test_a_file_uri_keeps_the_local_checks(tmp_path):
    fifo = tmp_path / "pipe.parquet"
    os.mkfifo(fifo)
    with pytest.raises(mc.TraceError) as err:
        mc.Trace.load(fifo.as_uri())  # refused, never opened (which would block)
    assert str(err.value) == (f"{fifo.as_uri()}: not a regular file (a pipe or a device): "
                              "expected a trace file")
    cut = tmp_path / "cut.parquet"
    cut.write_bytes((SHIPPED / TRACES[0]).read_bytes()[:1000])
    code, out = run("info", cut.as_uri())
    assert code == 2
    assert one_line(out) == (f"moecache: error: {cut.as_uri()}: truncated Parquet file (no footer): "
                             "it was not written completely")
    code, out = run("replay", (tmp_path / "none.parquet").as_uri(), "--capacity", 4)
    assert code == 2
    assert one_line(out) == f"moecache: error: {(tmp_path / 'none.parquet').as_uri()}: no such file"


def test_an_unknown_scheme_is_one_line_without_credentials():
    uri = "nosuch://reader:hunter2@bucket/t.parquet?secret_key=s3cr3t&region=x"
    code, out = run("info", uri)
    assert code == 2
    line = one_line(out)
    assert line.startswith("moecache: error: nosuch://***@bucket/t.parquet?secret_key=***&region=x: "
                           "cannot open: ")
    assert "Unrecognized filesystem type" in line
    assert "hunter2" not in line and "s3cr3t" not in line and "reader" not in line


def test_unreachable_object_storage_is_one_line_without_credentials(monkeypatch):
    """S3 at an address nothing listens on: pyarrow's S3 filesystem gives up after its retries."""
    pytest.importorskip("pyarrow._s3fs")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    uri = ("s3://AKIAEXAMPLE:hunter2@bucket/t.parquet?region=us-east-1&endpoint_override=127.0.0.1:1"
           "&scheme=http")
    code, out = run("replay", uri, "--capacity", 4)
    assert code == 2
    line = one_line(out)
    assert line.startswith("moecache: error: s3://***@bucket/t.parquet?region=us-east-1&"
                           "endpoint_override=127.0.0.1:1&scheme=http: cannot open: ")
    assert "hunter2" not in line and "AKIAEXAMPLE" not in line


def test_redact_keeps_what_is_not_a_credential():
    assert redact("s3://AKIAEXAMPLE:pw@b/k?region=us-east-1&endpoint_override=h:9000") == (
        "s3://***@b/k?region=us-east-1&endpoint_override=h:9000")
    assert redact("s3://bucket/key.parquet") == "s3://bucket/key.parquet"
    assert redact("gs://u@b/k?access_key=a&session_token=t") == "gs://***@b/k?access_key=***&session_token=***"
    assert locate("file:///tmp/a.parquet") == Location("/tmp/a.parquet", None, "file:///tmp/a.parquet")
    assert locate("rel/../a.parquet") == Location("rel/../a.parquet")
    assert storage.os_path("file:///tmp/a.parquet") == "/tmp/a.parquet"
    assert storage.os_path("s3://bucket/a.parquet") is None and storage.os_path("a/b") == "a/b"
    assert storage.is_uri("hdfs://host/a") and not storage.is_uri("a:b/c") and not storage.is_uri(Path("x"))


# -- sweeps -----------------------------------------------------------------------------------------------

def test_a_sweep_of_uris_on_local_threads_equals_one_of_paths(copies):
    uris = [p.as_uri() for p in copies]
    by_path = local_table([str(p) for p in copies])
    by_uri = local_table(uris)
    assert set(by_uri["trace"]) == set(uris)
    renamed = by_uri.assign(trace=by_uri["trace"].map(dict(zip(uris, map(str, copies), strict=True))))
    pd.testing.assert_frame_equal(renamed.sort_values(sweep_module.KEY_COLUMNS, ignore_index=True), by_path)
    assert len(by_path) == 2 * 2 * (3 + 3)  # traces x policies x (layer: 4,8,16 + global: 4,8,16)


def test_a_trace_given_by_path_and_by_file_uri_is_given_twice(copies):
    with pytest.raises(mc.MoecacheError, match="trace given twice"):
        local_table([str(copies[0]), copies[0].as_uri()])


def test_resume_keys_rows_by_the_trace_as_given(copies, tmp_path, monkeypatch):
    uris = [p.as_uri() for p in copies]
    out = tmp_path / "results" / "sweep"
    sweep(uris, ("lru",), ("layer", "global"), CAPACITIES, out=out, progress=False, workers=2)
    calls = []
    real = sweep_module.run_cell

    def counted(path, policy, scope, settings):
        calls.append((path, policy, scope))
        return real(path, policy, scope, settings)

    monkeypatch.setattr(sweep_module, "run_cell", counted)
    resumed = sweep(uris, POLICIES, ("layer", "global"), CAPACITIES, out=out, resume=True, progress=False,
                    workers=2)
    assert sorted(calls) == sorted((u, "fifo", s) for u in uris for s in ("layer", "global"))
    pd.testing.assert_frame_equal(resumed, local_table(uris))
    pd.testing.assert_frame_equal(pd.read_parquet(out.with_suffix(".parquet")), resumed)


def test_a_sweep_on_a_dask_cluster_reads_traces_on_the_workers(copies, tmp_path, monkeypatch):
    """A real LocalCluster (two worker processes): the workers read the traces by their URIs,
    the client reads no trace data, and the table equals the local executor's."""
    distributed = pytest.importorskip("dask.distributed")
    uris = [p.as_uri() for p in copies]
    expected = local_table(uris)

    def no_reading(self, what="file"):
        raise AssertionError(f"the client read {self.name}")

    out = tmp_path / "sweep.parquet"
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        with monkeypatch.context() as patch:
            patch.setattr(Location, "open", no_reading)  # this process only, not the workers
            table = sweep(uris, POLICIES, ("layer", "global"), CAPACITIES, out=out, progress=False,
                          executor="dask", scheduler=cluster.scheduler_address)
        pd.testing.assert_frame_equal(table, expected)
        pd.testing.assert_frame_equal(pd.read_parquet(out), expected)

        # a bad trace fails before any cell, as one line naming it, and writes nothing
        missing = (tmp_path / "none.parquet").as_uri()
        code, text = run("sweep", uris[0], missing, "--policies", "lru", "--out", tmp_path / "bad",
                         "--executor", "dask", "--scheduler", cluster.scheduler_address)
        assert code == 2
        assert one_line(text) == f"moecache: error: {missing}: no such file"
        assert not (tmp_path / "bad.parquet").exists()
