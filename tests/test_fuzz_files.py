"""Hostile trace files: corrupted bytes, truncations and metadata values of every type.

Every case either loads with the ORIGINAL expert ids or fails with a one-line
MoecacheError naming the file; `moecache info` then exits 0 or 2 with one line on
stderr. Never other ids, another exception type or a traceback.
"""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

import moecache as mc
from moecache.cli import cli

META_KEYS = ("format_version", "num_experts", "top_k", "moe_layers", "expert_bytes", "partial", "num_layers",
             "num_shared_experts", "model", "router", "dtype", "capture")

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6)


class Original(tuple):
    """(trace, its file's bytes, its Arrow table, a scratch path); a short repr for hypothesis."""

    def __repr__(self) -> str:
        return "original"


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """A small trace with scores, saved."""
    folder = tmp_path_factory.mktemp("fuzz")
    trace = mc.synth(layers=3, experts=16, top_k=4, tokens=120, sequences=2, prompt_len=4, seed=3,
                     logits=True)
    path = trace.save(folder / "t.parquet")
    return Original((trace, path.read_bytes(), pq.read_table(path), folder / "case.parquet"))


def check_load(path, trace, *, logits=False):
    """'loaded' (with the original ids) or 'error' (one line naming the file)."""
    try:
        back = mc.Trace.load(path, logits=logits)
    except mc.MoecacheError as err:
        message = str(err)
        assert "\n" not in message and message.startswith(str(path)), message
        return "error"
    np.testing.assert_array_equal(back.experts, trace.experts)
    return "loaded"


def check_info(path):
    result = CliRunner().invoke(cli, ["info", str(path)])
    assert result.exit_code in (0, 2), result.output
    if result.exit_code == 2:
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("moecache: error: "), result.stderr
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)


@given(flips=st.lists(st.tuples(st.integers(0, 2**31), st.integers(1, 255)), min_size=1, max_size=4),
       logits=st.booleans())
def test_corrupted_bytes_load_the_original_ids_or_fail_in_one_line(original, flips, logits):
    trace, data, _, path = original
    corrupted = bytearray(data)
    for where, mask in flips:
        corrupted[where % len(data)] ^= mask
    path.write_bytes(bytes(corrupted))
    check_load(path, trace, logits=logits)


@given(cut=st.integers(0, 2**31))
def test_truncated_files_fail_in_one_line(original, cut):
    trace, data, _, path = original
    path.write_bytes(data[: cut % len(data)])
    assert check_load(path, trace) == "error"


@settings(max_examples=40)
@given(key=st.sampled_from(META_KEYS), value=json_values, drop=st.booleans())
def test_metadata_values_of_any_type(original, key, value, drop):
    trace, _, table, path = original
    meta = json.loads(table.schema.metadata[b"moecache"])
    if drop:
        meta.pop(key)
    else:
        meta[key] = value
    pq.write_table(table.replace_schema_metadata({b"moecache": json.dumps(meta)}), path)
    if check_load(path, trace) == "loaded" and not drop:
        assert mc.Trace.load(path).meta[key] == value
    check_info(path)


@settings(max_examples=20)
@given(meta=json_values.filter(lambda v: not isinstance(v, dict)))
def test_metadata_that_is_not_an_object(original, meta):
    trace, _, table, path = original
    pq.write_table(table.replace_schema_metadata({b"moecache": json.dumps(meta)}), path)
    assert check_load(path, trace) == "error"
    check_info(path)
