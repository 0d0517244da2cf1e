"""Trace format (v2, and v1 read): round trips, validation, streaming and crash safety."""

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import moecache as mc
from moecache.trace_format import experts_type, ids_column
from moecache.trace_io import TraceWriter, parts_dir, storage_stats


@pytest.fixture()
def trace():
    rng = np.random.default_rng(0)
    experts = np.stack([[rng.permutation(16)[:4] for _ in range(3)] for _ in range(50)])
    weights = rng.random((50, 3, 4)).astype(np.float32)
    logits = rng.standard_normal((50, 3, 16)).astype(np.float16)
    return mc.Trace.from_arrays(
        experts, num_experts=16, weights=weights, seq=np.repeat([0, 1], 25),
        layers=[1, 3, 5], expert_bytes=[100, 100, 200], meta={"router": "baseline"},
        step=np.concatenate([[0] * 10, np.arange(1, 16), [16] * 10, np.arange(17, 32)]),
        phase=np.tile(np.r_[[0] * 10, [1] * 15], 2), token_id=np.arange(50) % 7 - 1,
        logits=logits)


def test_round_trip_keeps_every_column(tmp_path, trace):
    path = trace.save(tmp_path / "t.parquet")
    back = mc.Trace.load(path, logits=True)
    for name in ("experts", "step", "seq", "pos", "token_id", "phase", "weights", "logits"):
        np.testing.assert_array_equal(getattr(back, name), getattr(trace, name), err_msg=name)
    assert back.meta == trace.meta
    assert back.layers.tolist() == [1, 3, 5]
    assert back.num_steps == 32 and back.pos[:3].tolist() == [0, 1, 2] and back.pos[25] == 0
    light = mc.Trace.load(path, weights=False)
    assert light.weights is None and light.logits is None


def test_parquet_layout_is_one_row_per_token_and_layer(tmp_path, trace):
    table = pq.read_table(trace.save(tmp_path / "t.parquet"))
    assert table.num_rows == 50 * 3
    assert table.schema.field("experts").type == pa.binary(8)  # format v2: 4 little-endian int16
    ids = np.frombuffer(table["experts"].combine_chunks().buffers()[1], "<i2").reshape(50, 3, 4)
    np.testing.assert_array_equal(ids, trace.experts)
    assert table.schema.field("logits").type == pa.list_(pa.float16(), 16)
    assert table.column("layer").to_pylist()[:4] == [1, 3, 5, 1]
    assert table.column("phase").to_pylist()[9:11] == ["prefill", "prefill"]
    assert table.column("token_id").to_pylist()[:3] == [None, None, None]
    meta = json.loads(table.schema.metadata[b"moecache"])
    assert meta["format_version"] == 2 and meta["expert_bytes"] == [100, 100, 200]


def test_format_v1_files_are_read_and_rewritten_as_v2(tmp_path, trace):
    """A v1 file (experts as fixed_size_list<int16>[K], dictionary-encoded) loads to the
    same trace; saving it writes the current version; a v1 file with a v2 column is refused."""
    path = trace.save(tmp_path / "t.parquet")
    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[b"moecache"])
    v1_meta = {**meta, "format_version": 1}
    field, column = pa.field("experts", experts_type(4, 1), False), ids_column(_experts(table), version=1)
    v1 = table.set_column(table.schema.get_field_index("experts"), field, column)
    v1 = v1.replace_schema_metadata({b"moecache": json.dumps(v1_meta)})
    old = tmp_path / "v1.parquet"
    pq.write_table(v1, old, use_dictionary=["experts.list.element"], row_group_size=7)
    back = mc.Trace.load(old)
    np.testing.assert_array_equal(back.experts, trace.experts)
    np.testing.assert_array_equal(back.weights, trace.weights)
    assert back.meta["format_version"] == 1
    from click.testing import CliRunner

    from moecache.cli import cli
    shown = CliRunner().invoke(cli, ["info", str(old)]).output
    assert "format               v1 (read; saving it writes v2)" in shown
    assert "format               v2\n" in CliRunner().invoke(cli, ["info", str(path)]).output
    again = pq.read_table(back.save(tmp_path / "again.parquet"))
    assert again.schema.field("experts").type == pa.binary(8)
    assert json.loads(again.schema.metadata[b"moecache"])["format_version"] == 2
    mixed = tmp_path / "mixed.parquet"
    pq.write_table(table.replace_schema_metadata({b"moecache": json.dumps(v1_meta)}), mixed)
    with pytest.raises(mc.TraceError, match=r"column 'experts' is fixed_size_binary\[8\], trace format v1"):
        mc.Trace.load(mixed)
    wrong_k = tmp_path / "wrong-k.parquet"
    pq.write_table(table.replace_schema_metadata({b"moecache": json.dumps({**meta, "top_k": 2})}), wrong_k)
    with pytest.raises(mc.TraceError, match="inconsistent K"):
        mc.Trace.load(wrong_k)


def test_ids_are_stored_compactly(tmp_path):
    trace = mc.synth(layers=2, experts=64, top_k=8, tokens=5000, seed=1)
    size, per_id = storage_stats(trace.save(tmp_path / "t.parquet"))
    assert per_id < 1.0  # int16 ids split into byte streams, zstd
    assert size < 5000 * 2 * 8


def test_writer_refuses_to_overwrite(tmp_path, trace):
    path = trace.save(tmp_path / "t.parquet")
    with pytest.raises(mc.TraceError, match="already exists"):
        trace.save(path, overwrite=False)


def _blocks(trace, size):
    for start in range(0, trace.num_tokens, size):
        part = slice(start, start + size)
        yield dict(experts=trace.experts[part], step=trace.step[part], seq=trace.seq[part],
                   pos=trace.pos[part], phase=trace.phase[part], token_id=trace.token_id[part])


def test_streaming_writer_flushes_parts_and_merges(tmp_path, trace):
    path = tmp_path / "s.parquet"
    with TraceWriter(path, trace.meta, flush_tokens=7) as writer:
        for block in _blocks(trace, 5):
            writer.write(**block)
        assert len(list(parts_dir(path).glob("part-*.parquet"))) >= 5
        assert not path.exists()
    assert not parts_dir(path).exists()
    back = mc.Trace.load(path)
    np.testing.assert_array_equal(back.experts, trace.experts)
    assert not back.partial
    assert pq.ParquetFile(path).num_row_groups >= 5


def test_interrupted_write_leaves_partial_trace_of_completed_blocks(tmp_path, trace):
    path = tmp_path / "s.parquet"
    with pytest.raises(KeyboardInterrupt):
        with TraceWriter(path, trace.meta, flush_tokens=1000) as writer:
            for i, block in enumerate(_blocks(trace, 10)):
                if i == 3:
                    raise KeyboardInterrupt
                writer.write(**block)
    back = mc.Trace.load(path)
    assert back.partial and back.num_tokens == 30
    np.testing.assert_array_equal(back.experts, trace.experts[:30])


def test_killed_write_leaves_loadable_parts(tmp_path, trace):
    """A SIGKILL skips close(): the part folder itself is a readable partial trace."""
    path = tmp_path / "s.parquet"
    writer = TraceWriter(path, trace.meta, flush_tokens=10)
    for block in _blocks(trace, 10):
        writer.write(**block)
    (parts_dir(path) / ".part-000099.parquet.tmp").write_bytes(b"PAR1 half written")
    with pytest.raises(mc.TraceError, match="interrupted write left"):
        mc.Trace.load(path)
    back = mc.Trace.load(parts_dir(path))
    assert back.partial and back.num_tokens == 50


def _rewrite(tmp_path, trace, change):
    path = trace.save(tmp_path / "t.parquet")
    table = change(pq.read_table(path))
    bad = tmp_path / "bad.parquet"
    pq.write_table(table, bad)
    return bad


def _set_experts(table, values):
    column = ids_column(np.asarray(values).reshape(table.num_rows, -1))
    return table.set_column(table.schema.get_field_index("experts"), "experts", column)


def _set_phase(table, value, dictionary):
    """The trace with row 7's phase set to ``value``, as a dictionary or a plain string column."""
    phases = table.column("phase").cast(pa.string()).to_pylist()
    phases[7] = value
    column = pa.array(phases, pa.string())
    column = column.dictionary_encode() if dictionary else column
    return table.set_column(table.schema.get_field_index("phase"), "phase", column)


def _experts(table):
    ids = np.frombuffer(table["experts"].combine_chunks().buffers()[1], "<i2")
    return ids.reshape(table.num_rows, -1).copy()


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.drop_columns(["experts"]), "missing column 'experts'"),
    (lambda t: t.drop_columns(["step"]), "missing column 'step'"),
    (lambda t: _set_experts(t, np.where(np.arange(t.num_rows * 4).reshape(-1, 4) == 5, 16, _experts(t))),
     "expert id 16 >= num_experts 16"),
    (lambda t: _set_experts(t, np.where(np.arange(t.num_rows * 4).reshape(-1, 4) == 5, -3, _experts(t))),
     "negative expert id -3"),
    (lambda t: _set_experts(t, np.concatenate([_experts(t)[:, :1], _experts(t)[:, :3]], axis=1)),
     "duplicate expert id in one row"),
    (lambda t: t.replace_schema_metadata({}), "not a moecache trace"),
    (lambda t: t.slice(0, t.num_rows - 1), "not a whole number of tokens"),
    (lambda t: t.set_column(1, "step", pa.array(np.repeat(np.arange(50)[::-1], 3))), "steps are not sorted"),
    (lambda t: _set_phase(t, "warmup", dictionary=True), "unknown phase 'warmup'"),
    (lambda t: _set_phase(t, "warmup", dictionary=False), "unknown phase 'warmup'"),
    (lambda t: _set_phase(t, None, dictionary=True), "unknown phase 'None'"),
])
def test_reader_names_the_problem(tmp_path, trace, edit, message):
    bad = _rewrite(tmp_path, trace, edit)
    with pytest.raises(mc.TraceError, match=message) as info:
        mc.Trace.load(bad)
    assert str(bad) in str(info.value)


def test_inconsistent_k_is_rejected(tmp_path, trace):
    path = trace.save(tmp_path / "t.parquet")
    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[b"moecache"])
    meta["top_k"] = 3
    pq.write_table(table.replace_schema_metadata({b"moecache": json.dumps(meta)}), tmp_path / "k.parquet")
    with pytest.raises(mc.TraceError, match="inconsistent K"):
        mc.Trace.load(tmp_path / "k.parquet")


def test_not_parquet_and_truncated(tmp_path, trace):
    text = tmp_path / "notes.parquet"
    text.write_text("hello\n")
    with pytest.raises(mc.TraceError, match="not a Parquet file"):
        mc.Trace.load(text)
    data = trace.save(tmp_path / "t.parquet").read_bytes()
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(mc.TraceError, match="truncated"):
        mc.Trace.load(cut)


@pytest.mark.parametrize("experts, message", [
    (np.array([[[0, 0]]]), "duplicate expert id"),
    (np.array([[[0, 9]]]), "expert id 9 >= num_experts 4"),
    (np.array([[[-1, 2]]]), "negative expert id"),
    (np.zeros((2, 2)), "shape"),
])
def test_from_arrays_validates(experts, message):
    with pytest.raises(mc.TraceError, match=message):
        mc.Trace.from_arrays(experts, num_experts=4)


# -- ids, column types and metadata types: errors, never casts -------------------------------------------

def _with_experts(table, array):
    return table.set_column(table.schema.get_field_index("experts"), "experts", array)


@pytest.mark.parametrize("values, value_type, message", [
    (lambda ids: ids.astype(np.int64) + 65536, pa.int64(),
     "column 'experts' is fixed_size_list<int64>\\[4\\]"),  # 65539 would read as 3 after a cast
    (lambda ids: ids + 0.5, pa.float64(), "column 'experts' is fixed_size_list<double>\\[4\\]"),
    (lambda ids: ids.astype(np.int32), pa.int32(), "column 'experts' is fixed_size_list<int32>\\[4\\]"),
])
def test_ids_of_another_type_are_an_error_not_a_cast(tmp_path, trace, values, value_type, message):
    def edit(table):
        ids = _experts(table)
        return _with_experts(table, pa.FixedSizeListArray.from_arrays(
            pa.array(values(ids).reshape(-1), value_type), 4))
    bad = _rewrite(tmp_path, trace, edit)
    with pytest.raises(mc.TraceError, match=f"{message}.*trace format v2 stores") as info:
        mc.Trace.load(bad)
    assert str(info.value).startswith(f"{bad}: ") and "\n" not in str(info.value)


def test_null_ids_are_an_error_not_zero(tmp_path, trace):
    def edit(table):
        rows = [row.tobytes() for row in _experts(table).astype("<i2")]
        rows[5] = None
        return _with_experts(table, pa.array(rows, pa.binary(8)))
    with pytest.raises(mc.TraceError, match="null expert id in some row"):
        mc.Trace.load(_rewrite(tmp_path, trace, edit))


def test_nulls_read_as_their_stand_ins_without_pandas(tmp_path, trace):
    """Null weights read as NaN (a whole row, or one weight), null token ids as -1, a null
    phase is an error; read from the buffers, so loading does not import pandas."""
    rows = 50 * 3

    def edit(table):
        weights = table.column("weights").combine_chunks()
        flat = weights.values.to_numpy().astype(object)
        flat[5 * 4 + 1] = None  # row 5, second weight
        valid = np.ones(rows, bool)
        valid[7] = False  # row 7: no weights
        column = pa.FixedSizeListArray.from_arrays(pa.array(flat.tolist(), pa.float32()), 4,
                                                   mask=pa.array(~valid))
        return table.set_column(table.schema.get_field_index("weights"), "weights", column)
    back = mc.Trace.load(_rewrite(tmp_path, trace, edit))
    expected = trace.weights.reshape(rows, 4).copy()
    expected[5, 1] = np.nan
    expected[7] = np.nan
    np.testing.assert_array_equal(back.weights.reshape(rows, 4), expected)
    np.testing.assert_array_equal(back.token_id, trace.token_id)  # -1 is stored as null
    phase = pq.read_table(trace.save(tmp_path / "p.parquet"))
    words = phase.column("phase").to_pylist()
    words[4 * 3:5 * 3] = [None] * 3
    bad = tmp_path / "null-phase.parquet"
    pq.write_table(phase.set_column(phase.schema.get_field_index("phase"), "phase",
                                    pa.array(words).dictionary_encode().cast(phase.schema.field("phase").type)),
                   bad)
    with pytest.raises(mc.TraceError, match="unknown phase 'None'"):
        mc.Trace.load(bad)
    script = (f"import sys, moecache as mc; mc.Trace.load({str(tmp_path / 'p.parquet')!r}); "
              "print('pandas' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


def test_other_columns_of_another_type_are_an_error(tmp_path, trace):
    bad = _rewrite(tmp_path, trace, lambda t: t.set_column(1, "step", t.column("step").cast(pa.float64())))
    with pytest.raises(mc.TraceError, match="column 'step' is double, trace format v2 stores int64"):
        mc.Trace.load(bad)


def _with_meta(tmp_path, trace, change):
    def edit(table):
        meta = json.loads(table.schema.metadata[b"moecache"])
        return table.replace_schema_metadata({b"moecache": json.dumps(change(meta))})
    return _rewrite(tmp_path, trace, edit)


@pytest.mark.parametrize("key, value, message", [
    ("num_experts", "sixteen", "'num_experts' must be an integer from 1 to 32768, got \"sixteen\""),
    ("num_experts", 16.0, "'num_experts' must be an integer"),
    ("num_experts", True, "'num_experts' must be an integer"),
    ("top_k", 0, "'top_k' must be an integer from 1"),
    ("moe_layers", [1, "3", 5], "'moe_layers' must be a non-empty list of layer indices"),
    ("moe_layers", 3, "'moe_layers' must be a non-empty list"),
    ("moe_layers", [], "'moe_layers' must be a non-empty list"),
    ("expert_bytes", ["100", 100, 200], "'expert_bytes' must be null or a list of positive integers"),
    ("expert_bytes", [100, 2**63, 200], "'expert_bytes' must be null or a list of positive integers"),
    ("expert_bytes", [100, 0, 200], "'expert_bytes' must be null or a list of positive integers"),
    ("partial", "no", "'partial' must be true or false, got \"no\""),
    ("model", "mixtral", "'model' must be null or a JSON object"),
    ("router", ["a"], "'router' must be null or a string"),
])
def test_metadata_of_the_wrong_type_names_file_and_key(tmp_path, trace, key, value, message):
    bad = _with_meta(tmp_path, trace, lambda meta: {**meta, key: value})
    with pytest.raises(mc.TraceError, match=message) as info:
        mc.Trace.load(bad)
    assert str(info.value).startswith(f"{bad}: metadata '{key}'")


def test_null_expert_bytes_and_a_list_as_metadata(tmp_path, trace):
    assert mc.Trace.load(_with_meta(tmp_path, trace, lambda meta: {**meta, "expert_bytes": None})
                         ).expert_bytes is None
    with pytest.raises(mc.TraceError, match="'moecache' metadata must be a JSON object, got list"):
        mc.Trace.load(_with_meta(tmp_path, trace, lambda meta: [meta]))
    with pytest.raises(mc.TraceError, match="unsupported trace format_version True"):
        mc.Trace.load(_with_meta(tmp_path, trace, lambda meta: {**meta, "format_version": True}))


def test_in_memory_metadata_is_checked_too():
    with pytest.raises(mc.TraceError, match="<memory>: metadata 'partial' must be true or false"):
        mc.Trace.from_arrays(np.zeros((2, 1, 1), np.int16), num_experts=4, meta={"partial": "no"})


def test_a_corrupted_page_is_an_error_not_other_ids(tmp_path, trace):
    path = trace.save(tmp_path / "t.parquet")
    chunk = pq.ParquetFile(path).metadata.row_group(0).column(
        pq.ParquetFile(path).schema_arrow.get_field_index("experts") + 0)
    data = bytearray(path.read_bytes())
    data[chunk.data_page_offset + chunk.total_compressed_size - 8] ^= 0x10  # inside the page data
    path.write_bytes(bytes(data))
    with pytest.raises(mc.TraceError, match="CRC|checksum"):
        mc.Trace.load(path)


def test_format_schema_lists_the_required_columns_in_order():
    from moecache.trace_format import REQUIRED_COLUMNS, schema

    meta = mc.Trace.from_arrays(np.zeros((1, 1, 2), np.int16) + [[[0, 1]]], num_experts=4).meta
    assert tuple(schema(meta, with_weights=False, with_logits=False).names) == REQUIRED_COLUMNS
    assert schema(meta, with_weights=True, with_logits=True).names[-2:] == ["weights", "logits"]
