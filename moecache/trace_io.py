"""Parquet reading and writing of traces.

:func:`save_trace` writes a whole trace at once: to a temporary file renamed into
place, so an interruption leaves the previous file and nothing else.

:class:`TraceWriter` streams (capture) and is crash-safe: every flushed block becomes
a complete Parquet file in a part folder ``<out>.parts/`` (each written to a temporary
name, then renamed), and ``close()`` merges the parts into ``<out>`` the same way. A
process killed half-way therefore leaves a part folder that :func:`read_columns` loads
as a partial trace; an interrupted one that still runs ``close(partial=True)`` leaves
a normal file whose metadata says ``partial``. An existing part folder is never wiped:
it is refused, and with ``overwrite`` only moecache's own part files are removed.

Both hold the output's write lock (:func:`moecache.files.output_lock`) and write Parquet
page checksums, which the reader verifies.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .buffers import mapped_zeros
from .errors import MoecacheError, TraceError
from .files import atomic_write, first_line, output_lock, write_errors
from .parallel import read_ahead
from .storage import Location, locate
from .trace_format import (
    DECODE,
    FORMAT_VERSION,
    META_KEY,
    OPTIONAL_COLUMNS,
    PARQUET_MAGIC,
    PHASES,
    READ_VERSIONS,
    REQUIRED_COLUMNS,
    binary_ids,
    check_meta,
    ids_column,
    meta_json,
    schema,
)

if TYPE_CHECKING:  # the trace module builds on this one: no import at run time
    from .trace import Trace

PARTS_SUFFIX = ".parts"
# counters climb by small steps: delta encoding stores them in a few bits per row
_DELTA_COLUMNS = ("step", "token", "pos")
_WRITE_OPTIONS = {
    "compression": "zstd",
    "use_dictionary": ["seq", "token_id", "phase", "layer"],
    # ids: their bytes split into streams (low bytes, then high bytes), which zstd packs to
    # about one byte an id and which decode at memory speed
    "column_encoding": {**{name: "DELTA_BINARY_PACKED" for name in _DELTA_COLUMNS},
                        "experts": "BYTE_STREAM_SPLIT"},
    "write_page_checksum": True,  # verified on reading: a corrupted page is an error, never other ids
}
# what a part folder may hold: committed parts and the temporary files of unfinished ones
_OWN_PART = re.compile(r"part-\d{6}\.parquet|\.part-\d{6}\.parquet\..+\.tmp")


def parts_dir(path: str | os.PathLike) -> Path:
    """Folder where a streaming write keeps its committed blocks until it closes."""
    return Path(str(path) + PARTS_SUFFIX)


def check_output(path: Path, *, overwrite: bool, streaming: bool = False) -> None:
    """Refuse a trace output that would replace a user's file or folder without ``overwrite``.

    ``streaming`` writes also need the part folder: an existing one holds an interrupted
    trace and is refused; with ``overwrite`` it may hold only moecache's own part files.
    """
    if path.is_dir():
        raise TraceError(f"{path}: is a folder, expected a trace file path")
    if path.exists() and not overwrite:
        raise TraceError(f"{path}: already exists (pass --force to overwrite)")
    parts = parts_dir(path)
    if not streaming or not (parts.exists() or parts.is_symlink()):
        return
    if not parts.is_dir() or parts.is_symlink():
        raise TraceError(f"{parts}: exists and is not a part folder; move it away")
    if not overwrite:
        raise TraceError(f"{parts}: holds an interrupted trace (read it with `moecache info {parts}`); "
                         "move it away, or pass --force to replace it")
    foreign = sorted(p.name for p in parts.iterdir() if not _OWN_PART.fullmatch(p.name))
    if foreign:
        raise TraceError(f"{parts}: holds files moecache did not write ({foreign[0]}); move them away")


def _remove_parts(parts: Path) -> None:
    """Delete a part folder holding only moecache's own files (see :func:`check_output`)."""
    for part in parts.iterdir():
        if _OWN_PART.fullmatch(part.name):
            part.unlink()
    parts.rmdir()


def save_trace(trace: Trace, path: str | os.PathLike, *, overwrite: bool = True) -> Path:
    """Write a whole trace as one file, atomically: an interruption or a failed write
    leaves the previous file (if any) and nothing else."""
    path = Path(path)
    with output_lock(path):
        check_output(path, overwrite=overwrite)
        optional = {name: getattr(trace, name) for name in OPTIONAL_COLUMNS}
        table = _arrow_table(
            _schema(_written(trace.meta), [name for name, values in optional.items() if values is not None]),
            trace.layers.astype(np.int16), experts=trace.experts, step=trace.step, seq=trace.seq,
            pos=trace.pos, phase=trace.phase, token_id=trace.token_id, **optional)
        with atomic_write(path) as tmp:
            pq.write_table(table, tmp, **_WRITE_OPTIONS)
    return path


class TraceWriter:
    """Streams token blocks to a trace file; see the module docstring for crash safety.

    Use as a context manager: leaving it normally writes the final file; leaving it on
    an exception (KeyboardInterrupt included) writes what was completed, marked partial.
    The output's write lock is held from construction until :meth:`close`.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        meta: dict[str, Any],
        *,
        with_weights: bool = False,
        with_logits: bool = False,
        with_lookahead: bool = False,
        overwrite: bool = False,
        flush_tokens: int = 65536,
        flush_seconds: float = 2.0,
    ) -> None:
        self.path = Path(path)
        self.meta = _written(meta)
        self.layers = np.asarray(meta["moe_layers"], dtype=np.int16)
        self.optional = [name for name, wanted in zip(
            OPTIONAL_COLUMNS, (with_weights, with_logits, with_lookahead, with_lookahead), strict=True)
            if wanted]
        self.flush_tokens, self.flush_seconds = flush_tokens, flush_seconds
        self.parts = parts_dir(self.path)
        self._schema = _schema({**self.meta, "partial": True}, self.optional)
        self._lock = contextlib.ExitStack()
        with contextlib.ExitStack() as failed:
            failed.callback(self._lock.close)
            self._lock.enter_context(output_lock(self.path))
            check_output(self.path, overwrite=overwrite, streaming=True)
            with write_errors(self.path):
                if self.parts.exists():
                    _remove_parts(self.parts)
                self.parts.mkdir(parents=True)
            failed.pop_all()
        self._buffer: list[dict[str, np.ndarray | None]] = []
        self._buffered = 0
        self._num_parts = 0
        self._last_flush = time.monotonic()
        self.tokens_written = 0
        self.last_step = -1
        self.closed = False

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.closed:
            self.close(partial=exc_type is not None)

    def write(
        self,
        experts: np.ndarray,
        *,
        step: np.ndarray,
        seq: np.ndarray,
        pos: np.ndarray,
        phase: np.ndarray,
        token_id: np.ndarray | None = None,
        weights: np.ndarray | None = None,
        logits: np.ndarray | None = None,
        lookahead: np.ndarray | None = None,
        lookahead_weights: np.ndarray | None = None,
    ) -> None:
        """Append tokens: ``experts`` (n, layers, K) and per-token columns of length n."""
        n = len(experts)
        if n == 0:
            return
        step = np.asarray(step, np.int64)
        if step[0] < self.last_step or np.any(np.diff(step) < 0):
            raise TraceError(f"{self.path}: steps must be written in ascending order")
        optional = {"weights": weights, "logits": logits, "lookahead": lookahead,
                    "lookahead_weights": lookahead_weights}
        if [name for name in OPTIONAL_COLUMNS if optional[name] is not None] != self.optional:
            raise TraceError(f"{self.path}: every block must carry the same optional columns")
        if np.shape(experts)[1] != len(self.layers):
            raise TraceError(f"{self.path}: block has {np.shape(experts)[1]} layers, "
                             f"metadata lists {len(self.layers)}")
        self._buffer.append({
            "experts": np.asarray(experts, np.int16), "step": step,
            "seq": np.asarray(seq, np.int32), "pos": np.asarray(pos, np.int32),
            "phase": np.asarray(phase, np.int8),
            "token_id": None if token_id is None else np.asarray(token_id, np.int32),
            **{name: None if values is None else np.asarray(values, _OPTIONAL_TYPES[name])
               for name, values in optional.items()},
        })
        self._buffered += n
        self.last_step = int(step[-1])
        if (self._buffered >= self.flush_tokens
                or time.monotonic() - self._last_flush >= self.flush_seconds):
            self.flush()

    def flush(self) -> None:
        """Commit buffered tokens as one complete part file."""
        if not self._buffered:
            return

        def cat(name: str) -> np.ndarray | None:
            arrays = [b[name] for b in self._buffer]
            return None if arrays[0] is None else np.concatenate(arrays)

        table = _arrow_table(self._schema, self.layers, first_token=self.tokens_written,
                             **{name: cat(name) for name in self._buffer[0]})
        with atomic_write(self.parts / f"part-{self._num_parts:06d}.parquet", name=self.path) as tmp:
            pq.write_table(table, tmp, **_WRITE_OPTIONS)
        self._num_parts += 1
        self.tokens_written += self._buffered
        self._buffer, self._buffered = [], 0
        self._last_flush = time.monotonic()

    def close(self, *, partial: bool = False) -> Path:
        """Flush, merge the parts into the final file atomically, remove the part folder.

        If that fails (a full disk), the committed parts stay in the part folder (removed
        if there are none) and the error says where they are.
        """
        self.closed = True
        merged = False
        try:
            self.flush()
            final_meta = {**self.meta, "partial": bool(partial or self.meta.get("partial", False))}
            metadata = {META_KEY: meta_json(final_meta)}
            with atomic_write(self.path) as tmp:
                with pq.ParquetWriter(tmp, self._schema.with_metadata(metadata), **_WRITE_OPTIONS) as out:
                    for part in sorted(self.parts.glob("part-*.parquet")):
                        out.write_table(_open_one(part).read().replace_schema_metadata(metadata))
            merged = True
        except MoecacheError as err:
            if self._num_parts:
                raise TraceError(f"{err}; the completed steps are kept in {self.parts}") from None
            raise
        finally:
            if merged or not self._num_parts:
                with contextlib.suppress(OSError):
                    _remove_parts(self.parts)
            self._lock.close()
        return self.path


_OPTIONAL_TYPES = {"weights": np.float32, "logits": np.float16, "lookahead": np.int16,
                   "lookahead_weights": np.float32}


def _schema(meta: dict[str, Any], optional: list[str]) -> pa.Schema:
    """The schema of ``meta``'s format version with the ``optional`` columns."""
    return schema(meta, **{f"with_{name}": name in optional for name in OPTIONAL_COLUMNS})


def _written(meta: dict[str, Any]) -> dict[str, Any]:
    """``meta`` as written: in the current format, whatever version it was read from."""
    return {**meta, "format_version": FORMAT_VERSION}


def _arrow_table(table_schema: pa.Schema, layers: np.ndarray, *, experts: np.ndarray, step: np.ndarray,
                 seq: np.ndarray, pos: np.ndarray, phase: np.ndarray, token_id: np.ndarray | None,
                 first_token: int = 0, **optional: np.ndarray | None) -> pa.Table:
    """Rows of the current format for dense per-token arrays (tokens numbered from ``first_token``);
    ``optional`` maps the names of :data:`OPTIONAL_COLUMNS` to arrays (n, layers, width) or None."""
    n, num_layers, top_k = experts.shape
    rows = n * num_layers

    def per_row(values: np.ndarray) -> np.ndarray:
        return np.repeat(values, num_layers)

    token = np.arange(first_token, first_token + n, dtype=np.int64)
    columns: dict[str, pa.Array] = {
        "seq": pa.array(per_row(np.asarray(seq, np.int32))),
        "step": pa.array(per_row(np.asarray(step, np.int64))),
        "token": pa.array(per_row(token)),
        "pos": pa.array(per_row(np.asarray(pos, np.int32))),
        "token_id": pa.array(per_row(np.asarray(token_id, np.int32)), mask=per_row(token_id < 0))
        if token_id is not None else pa.nulls(rows, pa.int32()),
        "phase": pa.DictionaryArray.from_arrays(
            pa.array(per_row(np.asarray(phase, np.int8)), pa.int8()), pa.array(PHASES)),
        "layer": pa.array(np.tile(layers, n)),
        "experts": ids_column(np.asarray(experts).reshape(rows, top_k)),
    }
    for name, values in optional.items():
        if values is not None:
            columns[name] = pa.FixedSizeListArray.from_arrays(
                pa.array(np.asarray(values, _OPTIONAL_TYPES[name]).reshape(-1)), values.shape[2])
    return pa.Table.from_pydict(columns, schema=table_schema)


# -- reading ---------------------------------------------------------------------------

def open_parquet_files(
        path: str | os.PathLike | Location) -> tuple[list[pq.ParquetFile], dict[str, Any], str]:
    """The Parquet files of a trace (one, or the parts of an interrupted write) and its metadata;
    ``path`` may be a URI of any filesystem pyarrow knows (see :mod:`moecache.storage`)."""
    location = locate(path)
    source = location.name
    kind = location.kind()
    if kind == "folder":
        files = location.glob("part-*.parquet")
        if not files:
            raise TraceError(f"{source}: folder holds no trace parts (part-*.parquet)")
    elif kind == "missing":
        parts = location.sibling(PARTS_SUFFIX)
        hint = f" (an interrupted write left {parts.name}: load that)" if parts.kind() == "folder" else ""
        raise TraceError(f"{source}: no such file{hint}")
    else:
        files = [location]
    opened = [_open_one(f) for f in files]
    meta = _read_meta(opened[0], files[0].name)
    if kind == "folder":
        meta["partial"] = True
    return opened, meta, source


def has_weights(path: str | os.PathLike | Location) -> bool:
    """Whether the trace file (or part folder, local or a URI) holds router weights, read from its schema."""
    files, _, _ = open_parquet_files(path)
    return "weights" in files[0].schema_arrow.names


def _open_one(path: str | os.PathLike | Location) -> pq.ParquetFile:
    """Open a Parquet file (locally a regular file, never a pipe or device), its page checksums verified."""
    location = locate(path)
    handle = location.open("trace file")
    with location.failures("read"):
        size = handle.size()
        head = handle.read_at(min(size, 4), 0)
        tail = handle.read_at(4, size - 4) if size >= 4 else b""
    if head != PARQUET_MAGIC:
        raise TraceError(f"{location.name}: not a Parquet file")
    if tail != PARQUET_MAGIC:
        raise TraceError(f"{location.name}: truncated Parquet file (no footer): "
                         "it was not written completely")
    try:
        # pre_buffer keeps every range it read for the life of the file: memory would grow with
        # a streamed trace (pyarrow 26 turns it on by default)
        return pq.ParquetFile(handle, page_checksum_verification=True, pre_buffer=False)
    except (pa.ArrowException, OSError, UnicodeDecodeError) as err:  # names in a corrupted footer
        raise TraceError(f"{location.name}: unreadable Parquet file: {first_line(err)}") from None


def _read_meta(pf: pq.ParquetFile, source: str) -> dict[str, Any]:
    raw = (pf.schema_arrow.metadata or {}).get(META_KEY)
    if raw is None:
        raise TraceError(f"{source}: no 'moecache' metadata: not a moecache trace (use `moecache import`)")
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise TraceError(f"{source}: 'moecache' metadata is not valid JSON") from None
    if isinstance(meta, dict):
        version = meta.get("format_version")
        if type(version) is not int or version not in READ_VERSIONS:
            raise TraceError(f"{source}: unsupported trace format_version {version!r} "
                             f"(this moecache reads {', '.join(map(str, READ_VERSIONS))}; a newer "
                             "moecache may read it)")
    check_meta(meta, source)
    return meta


def _check_columns(pf: pq.ParquetFile, columns: list[str], meta: dict[str, Any], source: str) -> None:
    """Each column read must have the type of the file's format version: ids of another
    type (int64, float) would otherwise be cast without a word. Phase is checked by value."""
    wanted = _schema(meta, list(OPTIONAL_COLUMNS))
    for name in columns:
        if name == "phase":
            continue
        actual, expected = pf.schema_arrow.field(name).type, wanted.field(name).type
        if actual == expected:
            continue
        same_kind = ((pa.types.is_fixed_size_list(actual) and pa.types.is_fixed_size_list(expected)
                      and actual.value_type == expected.value_type)
                     or (pa.types.is_fixed_size_binary(actual) and pa.types.is_fixed_size_binary(expected)))
        if name in ("experts", "weights", "lookahead", "lookahead_weights") and same_kind:
            raise TraceError(f"{source}: inconsistent K: {name} column is {_type_name(actual)}, "
                             f"metadata top_k={meta['top_k']}")
        raise TraceError(f"{source}: column {name!r} is {_type_name(actual)}, trace format "
                         f"v{meta['format_version']} stores {_type_name(expected)} "
                         "(convert other data with `moecache import`)")


def _type_name(kind: pa.DataType) -> str:
    if pa.types.is_fixed_size_list(kind):
        return f"fixed_size_list<{kind.value_type}>[{kind.list_size}]"
    if pa.types.is_fixed_size_binary(kind):
        return f"fixed_size_binary[{kind.byte_width}]"
    return str(kind)


class TraceReader:
    """A trace file (or part folder) opened for reading: its metadata, row count and the
    columns asked for (``lookahead``: that column if the file has it, and its weights too
    with ``weights``), checked against its format version before any data is read."""

    def __init__(self, path: str | os.PathLike | Location, *, weights: bool = True, logits: bool = False,
                 lookahead: bool = True) -> None:
        self.files, self.meta, self.source = open_parquet_files(path)
        names = set(self.files[0].schema_arrow.names)
        missing = [c for c in REQUIRED_COLUMNS if c not in names]
        if missing:
            raise TraceError(f"{self.source}: missing column {missing[0]!r}")
        if logits and "logits" not in names:
            raise TraceError(f"{self.source}: trace has no 'logits' column (capture with --save-logits)")
        top_k = self.meta["top_k"]
        self.num_layers = max(len(self.meta["moe_layers"]), 1)
        self.widths = {"experts": top_k, "weights": top_k, "logits": int(self.meta["num_experts"]),
                       "lookahead": top_k, "lookahead_weights": top_k}
        grids = ["experts"] + ["weights"] * (weights and "weights" in names) + ["logits"] * logits
        grids += ["lookahead"] * (lookahead and "lookahead" in names)
        grids += ["lookahead_weights"] * (lookahead and weights and "lookahead_weights" in names)
        self.grids = grids
        self.rows = sum(pf.metadata.num_rows for pf in self.files)
        if self.rows % self.num_layers:
            raise TraceError(f"{self.source}: {self.rows} rows is not a whole number of tokens x "
                             f"{self.num_layers} MoE layers")
        self.num_tokens = self.rows // self.num_layers

    def tables(self, batch_rows: int | None = None) -> Iterator[pa.Table]:
        """The rows in order, a row group (or ``batch_rows`` rows) at a time, checked."""
        columns = [*REQUIRED_COLUMNS, *self.grids[1:]]
        read = 0
        try:
            for pf in self.files:
                if pf.schema_arrow.names != self.files[0].schema_arrow.names:
                    raise TraceError(f"{self.source}: parts disagree on columns")
                _check_columns(pf, columns, self.meta, self.source)
                if batch_rows is None:
                    batches = (pf.read_row_group(g, columns=columns, use_threads=False)
                               for g in range(pf.num_row_groups))
                else:
                    batches = (pa.Table.from_batches([batch])
                               for batch in pf.iter_batches(batch_rows, columns=columns, use_threads=False))
                for table in batches:
                    read += table.num_rows
                    if read > self.rows:
                        break
                    yield table
        except (pa.ArrowException, OSError) as err:
            raise TraceError(f"{self.source}: corrupt or truncated data: {first_line(err)}") from None
        if read != self.rows:
            raise TraceError(f"{self.source}: the row groups hold {read} rows, the footer says {self.rows}")

    def token_blocks(self, batch_rows: int) -> Iterator[dict[str, np.ndarray]]:
        """Whole tokens, about ``batch_rows`` rows at a time: per-token columns, and each
        grid column as (tokens, layers, width); memory holds one block."""
        reader = _TokenRows(self.source, np.asarray(self.meta["moe_layers"], np.int16))
        waiting: dict[str, np.ndarray] = {}  # grid rows of a token split across batches
        for table in self.tables(batch_rows):
            tokens = reader.add({name: _column(table, name, self.source) for name in _PER_ROW})
            block = {}
            for name in self.grids:
                values = _column(table, name, self.source).reshape(table.num_rows, self.widths[name])
                if name in waiting:
                    values = np.concatenate([waiting[name], values])
                whole = len(tokens["step"]) * self.num_layers
                waiting[name] = values[whole:]
                block[name] = values[:whole].reshape(-1, self.num_layers, self.widths[name])
            if len(tokens["step"]):
                yield {**tokens, **block}


def read_columns(path: str | os.PathLike | Location, *, weights: bool = True, logits: bool = False,
                 lookahead: bool = True) -> dict[str, Any]:
    """The fields of a :class:`~moecache.trace.Trace` read from a trace file (or part folder):
    only the columns asked for (see :class:`TraceReader`), one row group at a time straight
    into the arrays of the result, so memory holds the result and one row group.
    ``Trace.load`` validates them."""
    reader = TraceReader(path, weights=weights, logits=logits, lookahead=lookahead)
    rows, widths, grids, num_layers = reader.rows, reader.widths, reader.grids, reader.num_layers
    folder = _TokenRows(reader.source, np.asarray(reader.meta["moe_layers"], np.int16))
    tokens = {name: np.empty(reader.num_tokens, kind) for name, kind in _TOKEN_TYPES.items()}
    out: dict[str, np.ndarray] = {}
    filled = done = 0
    for table in read_ahead(reader.tables()):
        for name in grids:
            values = _column(table, name, reader.source)
            if name not in out:
                out[name] = mapped_zeros((rows, widths[name]), values.dtype)
            out[name][filled:filled + table.num_rows] = values.reshape(table.num_rows, widths[name])
        folded = folder.add({name: _column(table, name, reader.source) for name in _PER_ROW})
        count = len(folded["step"])
        for name, values in tokens.items():
            values[done:done + count] = folded[name]
        filled += table.num_rows
        done += count
    pa.default_memory_pool().release_unused()  # the row groups' buffers, which the pool would keep
    n = reader.num_tokens

    def grid(name: str) -> np.ndarray | None:
        if name not in grids:
            return None
        return out.get(name, np.zeros((0, widths[name]))).reshape(n, num_layers, widths[name])
    return dict(
        experts=grid("experts").astype(np.int16, copy=False),
        **tokens,
        meta=reader.meta,
        weights=grid("weights"),
        logits=grid("logits"),
        lookahead=grid("lookahead"),
        lookahead_weights=grid("lookahead_weights"),
        source=reader.source,
    )


# the columns with one value per (token, layer) row that a trace keeps once per token
_PER_ROW = ("token", "step", "seq", "pos", "token_id", "phase", "layer")
_TOKEN_TYPES = {"step": np.int64, "seq": np.int32, "pos": np.int32, "token_id": np.int32, "phase": np.int8}


class _TokenRows:
    """Folds the per-row columns into per-token arrays as batches arrive, checking that
    each token's rows hold the MoE layers in order and agree on token, step, seq and pos,
    and that tokens ascend; rows of a token split across batches wait for the rest."""

    def __init__(self, source: str, layers: np.ndarray) -> None:
        self.source, self.layers = source, layers
        self.done = 0  # tokens folded
        self.carry: dict[str, np.ndarray] = {}
        self.last_token: int | None = None

    def add(self, columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The per-token columns of the tokens this batch completes."""
        width = len(self.layers)
        folded = []
        if self.carry:  # finish the token split across batches without copying the batch
            need = width - len(self.carry["layer"])
            head = {name: np.concatenate([self.carry[name], values[:need]])
                    for name, values in columns.items()}
            columns = {name: values[need:] for name, values in columns.items()}
            self.carry = {}
            if len(head["layer"]) < width:
                self.carry = head
                return _no_tokens()
            folded.append(self._fold(head))
        whole = len(columns["layer"]) // width * width
        if whole < len(columns["layer"]):
            self.carry = {name: values[whole:].copy() for name, values in columns.items()}
        if whole:
            folded.append(self._fold({name: values[:whole] for name, values in columns.items()}))
        if len(folded) < 2:
            return folded[0] if folded else _no_tokens()
        return {name: np.concatenate([part[name] for part in folded]) for name in _TOKEN_TYPES}

    def _fold(self, columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The per-token columns of rows that hold whole tokens, checked."""
        width = len(self.layers)
        count = len(columns["layer"]) // width
        layer_grid = columns["layer"].reshape(count, width)
        if not np.array_equal(layer_grid, np.broadcast_to(self.layers, layer_grid.shape)):
            bad = np.flatnonzero((layer_grid != self.layers).any(axis=1))[0]
            row = (self.done + bad) * width
            raise TraceError(
                f"{self.source}: token rows {row}..{row + width - 1} hold layers "
                f"{layer_grid[bad].tolist()}, expected the MoE layers {self.layers.tolist()} in order")
        for name in ("token", "step", "seq", "pos"):
            grid = columns[name].reshape(count, width)
            if not np.array_equal(grid[:, 1:], np.broadcast_to(grid[:, :1], (count, width - 1))):
                split = np.flatnonzero((grid != grid[:, :1]).any(axis=1))[0]
                raise TraceError(f"{self.source}: rows of token {grid[split, 0]} disagree on {name}")
        tokens = columns["token"][::width]
        previous = [] if self.last_token is None else [self.last_token]
        if np.any(np.diff(np.concatenate([previous, tokens])) <= 0):
            raise TraceError(f"{self.source}: rows are not sorted by token")
        self.last_token = int(tokens[-1])
        self.done += count
        return {name: columns[name][::width].astype(kind, copy=False) for name, kind in _TOKEN_TYPES.items()}


def _no_tokens() -> dict[str, np.ndarray]:
    return {name: np.zeros(0, kind) for name, kind in _TOKEN_TYPES.items()}


def _column(table: pa.Table, name: str, source: str) -> np.ndarray:
    """One column of a row group as a flat NumPy array (lists flattened)."""
    col = table.column(name).combine_chunks()
    if name == "phase":  # codes through the (small) dictionary, never a Python string per row
        coded = col if pa.types.is_dictionary(col.type) else col.dictionary_encode()
        words = coded.dictionary.to_pylist()
        indices = as_numpy(coded.indices, null=len(words))
        if coded.null_count or any(word not in PHASES for word in words):  # which are used?
            used = np.unique(indices)
            unknown = sorted(str(words[i]) if i < len(words) else "None" for i in used
                             if i >= len(words) or words[i] not in PHASES)
            if unknown:
                raise TraceError(f"{source}: unknown phase {unknown[0]!r} (expected prefill or decode)")
        is_decode = np.array([word == PHASES[DECODE] for word in words] + [False], np.int8)
        return is_decode[indices]
    if name == "token_id":
        return as_numpy(col, null=-1)
    if pa.types.is_fixed_size_binary(col.type):  # v2 ids: K little-endian int16 per row
        if col.null_count:
            raise TraceError(f"{source}: null expert id in some row")
        return binary_ids(col)
    if pa.types.is_fixed_size_list(col.type):
        width = col.type.list_size
        values = col.values.slice(col.offset * width, len(col) * width)  # the child's values of these rows
        if name in ("experts", "lookahead") and (col.null_count or values.null_count):
            where = "" if name == "experts" else f" of {name}"
            raise TraceError(f"{source}: null expert id in some row{where}")
        flat = as_numpy(values, null=np.nan)
        if col.null_count:  # a row without weights: NaN throughout
            flat = flat.copy()
            flat.reshape(len(col), width)[~_valid(col)] = np.nan
        return flat
    if col.null_count:
        raise TraceError(f"{source}: column {name!r} has nulls")
    return as_numpy(col)


_NUMPY_TYPES = {pa.int8(): np.int8, pa.int16(): np.int16, pa.int32(): np.int32, pa.int64(): np.int64,
                pa.uint8(): np.uint8, pa.uint16(): np.uint16, pa.uint32(): np.uint32, pa.uint64(): np.uint64,
                pa.float16(): np.float16, pa.float32(): np.float32, pa.float64(): np.float64}


def as_numpy(array: pa.Array, null: float | None = None) -> np.ndarray:
    """A fixed-width number Arrow array as NumPy: a view of its buffer, or with ``null``
    where it holds nulls; other arrays through ``to_numpy`` (which imports pandas, half
    a second of a load that needs none)."""
    kind = _NUMPY_TYPES.get(array.type)
    if kind is None or (array.null_count and null is None):
        return array.to_numpy(zero_copy_only=False)
    itemsize = np.dtype(kind).itemsize
    values = np.frombuffer(array.buffers()[1], kind, count=len(array), offset=array.offset * itemsize)
    if array.null_count:
        values = np.where(_valid(array), values, np.asarray(null).astype(kind))
    return values


def _valid(array: pa.Array) -> np.ndarray:
    """True where ``array`` holds a value (its validity bitmap, unpacked)."""
    if array.buffers()[0] is None:
        return np.ones(len(array), bool)
    bits = np.unpackbits(np.frombuffer(array.buffers()[0], np.uint8), bitorder="little")
    return bits[array.offset:array.offset + len(array)].astype(bool)


def storage_stats(path: str | os.PathLike | Location) -> tuple[int, float]:
    """(bytes in storage, compressed bytes per expert id in the experts column)."""
    location = locate(path)
    files = location.glob("part-*.parquet") if location.kind() == "folder" else [location]
    id_bytes = ids = 0
    for file in files:
        metadata = _open_one(file).metadata
        for group in range(metadata.num_row_groups):
            row_group = metadata.row_group(group)
            for index in range(row_group.num_columns):
                column = row_group.column(index)
                if column.path_in_schema.split(".")[0] == "experts":
                    id_bytes += column.total_compressed_size
                    # v2: a value per row, of K int16 (its length in bytes); v1: a value per id
                    binary = column.physical_type == "FIXED_LEN_BYTE_ARRAY"
                    ids += column.num_values * (metadata.schema.column(index).length // 2 if binary else 1)
    return sum(f.size() for f in files), (id_bytes / ids if ids else 0.0)
