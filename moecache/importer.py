"""``moecache import``: turn existing routing logs into trace format v1.

Two kinds of source are read:

*Row logs* (``.jsonl``/``.ndjson``, ``.json``, ``.csv``/``.tsv``, ``.parquet``; JSONL
and CSV may be ``.gz``/``.bz2``/``.zst`` compressed): one row per (token, MoE layer),
the shape most vLLM / SGLang router hooks write. A column mapping says which column
holds which *field* (``parse_mapping("experts=topk_ids,layer=layer,token=token_idx")``):

==========  ========  =======================================================================
field       needed    meaning
==========  ========  =======================================================================
experts     yes       routed expert ids in the router's rank order: a list column, a JSON list
                      string such as ``"[3, 7]"`` or ``"3 7"`` / ``"3;7"`` (CSV), or a plain
                      integer column (K = 1)
layer       yes       the model's layer index (MoE layers: ``layers=``, else the distinct values)
token       yes [1]   index of the token in the log; it identifies the token and orders tokens
seq         no        request id (integers, or strings such as vLLM request ids, numbered
                      0, 1, ... in trace order, labels kept in ``capture.seq_labels``);
                      absent: every token is in sequence 0
weights     no        gate weights, same shape as experts
pos         no        position in the sequence; absent: counted in trace order per sequence
step        no        serving step (tokens served together); see ``step=`` below
phase       no        ``prefill``/``decode`` strings, booleans meaning "is prefill", or 0/1
token_id    no        vocabulary id (nulls allowed)
==========  ========  =======================================================================

[1] without a token column the ``pos`` column is used (tokens are then told apart by
(seq, pos)). Fields missing from the mapping fall back to a column of the same name when
the log has one; :attr:`ImportReport.mapping` lists what was used and
:attr:`ImportReport.ignored_columns` what was not. Nested JSON objects are flattened,
so ``experts=routing.ids`` reaches ``{"routing": {"ids": [...]}}``.

A token is identified by its (seq, token) pair, so a token column that counts within
each request works as well as a global counter. Tokens are ordered by (step when a step
column is used, token value, first appearance in the file) - ``order="file"`` orders by
first appearance only (for per-request counters of requests served one after another).

*Arrays* (``.npy``: expert ids shaped (tokens, layers, K); ``.npz``: ``experts``
required, optional ``weights`` (same shape), ``seq``/``step``/``token_id`` (one per
token) and ``layers`` (the model layer id of each axis-1 entry)).

Problems are never merged silently. Every one below raises :class:`MoecacheError` with
one line naming the file, the count and the first example; with ``on_problem="drop"``
the affected rows/tokens are dropped instead and counted in :class:`ImportReport`
(``dropped_rows``/``dropped_tokens`` by reason, ``problems`` with the same one-line text)
and in the trace metadata (``capture.dropped``):

- ``warmup``: rows that belong to no real request - a null or negative seq, or a negative
  token index. vLLM's profile and warm-up runs (and CUDA-graph padding) log dummy
  batches like this. Counted in rows only (such rows have no meaningful token).
- ``conflict``: tokens with two different rows for one layer, or whose rows disagree on
  a per-token column (step, pos, phase, token_id). The whole token is dropped.
- ``duplicate``: identical copies of a (token, layer) row (a hook registered twice,
  every tensor-parallel rank logging). One copy is kept; the extra rows are counted.
- ``other_layers``: rows of a layer outside ``layers=`` (when given; e.g. dense layers a
  hook also logged). The rows are dropped.
- ``missing_layers``: tokens that lack a row for some MoE layer. The token is dropped -
  unless that would discard most tokens and ``layers=`` was not given: then one stray
  row of a bogus layer is the likelier problem, and it stays an error that says so.

``skip_warmup=N`` drops the first N tokens (in trace order, after the rows above) on
request - for warm-up prompts that look like real ones; counted under ``skip_warmup``.

Malformed data is always an error, whatever ``on_problem`` says: a missing or null
experts entry, K that differs between rows, a negative expert id, an id >=
``num_experts``, a repeated id inside one row, weights of the wrong length, values of the
wrong type. ``num_experts`` defaults to the largest id + 1; that guess is recorded in
``ImportReport.inferred`` and the metadata (pass the real E: an expert never routed to
in the log is otherwise invisible).

Row numbers in messages are 1-based data rows (JSONL: non-blank lines; CSV: lines after
the header; Parquet: table rows).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ._version import __version__
from .errors import MoecacheError, TraceError
from .trace import DECODE, PREFILL, Trace, now_iso
from .units import parse_bytes

FIELDS = ("experts", "weights", "layer", "token", "seq", "pos", "step", "phase", "token_id")
ON_PROBLEM = ("error", "drop")
STEP_MODES = ("column", "token", "prefill")
ORDERS = ("token", "file")
ROW_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv",
               ".parquet": "parquet", ".pq": "parquet"}
ARRAY_FORMATS = {".npy": "npy", ".npz": "npz"}
COMPRESSED = (".gz", ".bz2", ".zst")
NPZ_KEYS = ("experts", "weights", "seq", "layers", "step", "token_id")
_DROP_HINT = "rerun with --drop-problems (on_problem='drop') to drop and count them"
_MAX_SEQ_LABELS = 4096


@dataclass
class ImportReport:
    """What :func:`import_routing` read, wrote, inferred and dropped.

    ``dropped_rows`` and ``dropped_tokens`` map a reason (``warmup``, ``skip_warmup``,
    ``other_layers``, ``duplicate``, ``conflict``, ``missing_layers``) to a count; a
    reason that drops no whole token (``warmup``, ``other_layers``, ``duplicate``)
    appears in ``dropped_rows`` only.
    ``problems`` holds one line per problem handled by dropping.
    """

    source: str
    out: str
    format: str
    sha256: str
    rows_read: int
    tokens_written: int
    steps: int
    layers: list[int]
    top_k: int
    num_experts: int
    sequences: int
    mapping: dict[str, str] = field(default_factory=dict)
    ignored_columns: list[str] = field(default_factory=list)
    inferred: dict[str, str] = field(default_factory=dict)
    dropped_rows: dict[str, int] = field(default_factory=dict)
    dropped_tokens: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        """A few human-readable lines for the command line."""
        lines = [
            f"imported {self.source} ({self.format}, {self.rows_read} rows) -> {self.out}",
            f"  {self.tokens_written} tokens, {self.steps} steps, {self.sequences} sequences, "
            f"{len(self.layers)} MoE layers, E={self.num_experts}, K={self.top_k}",
        ]
        if self.mapping:
            lines.append("  mapping: " + ",".join(f"{k}={v}" for k, v in self.mapping.items()))
        if self.ignored_columns:
            lines.append("  ignored columns: " + ", ".join(self.ignored_columns))
        for name, how in self.inferred.items():
            lines.append(f"  inferred {name}: {how}")
        for reason, rows in self.dropped_rows.items():
            tokens = self.dropped_tokens.get(reason)
            counted = _n(rows, "row") + ("" if tokens is None else ", " + _n(tokens, "token"))
            lines.append(f"  dropped ({reason}): {counted}")
        lines.extend(f"  problem: {p}" for p in self.problems)
        return "\n".join(lines)


def parse_mapping(text: str | Mapping[str, str] | None) -> dict[str, str]:
    """``"experts=topk_ids,layer=layer"`` -> ``{"experts": "topk_ids", "layer": "layer"}``.

    Items are ``FIELD=COLUMN`` separated by commas (spaces around them are ignored);
    fields are those of :data:`FIELDS`, each at most once. Column names cannot contain
    ``,`` or ``=`` here (pass a dict to :func:`import_routing` for those). A dict is
    validated and returned as a copy; ``None`` or ``""`` give ``{}`` (identity mapping).
    """
    if text is None:
        return {}
    if isinstance(text, Mapping):
        items = [(str(k).strip(), str(v).strip()) for k, v in text.items()]
    else:
        items = []
        for raw in str(text).split(","):
            item = raw.strip()
            if not item:
                continue
            name, eq, column = item.partition("=")
            if not eq or "=" in column or not name.strip() or not column.strip():
                raise MoecacheError(f"bad --map item {item!r}: expected FIELD=COLUMN, e.g. experts=topk_ids")
            items.append((name.strip(), column.strip()))
    mapping: dict[str, str] = {}
    for name, column in items:
        if name not in FIELDS:
            raise MoecacheError(f"unknown field {name!r} in --map (fields: {', '.join(FIELDS)})")
        if name in mapping:
            raise MoecacheError(f"field {name!r} is mapped twice in --map")
        if not column:
            raise MoecacheError(f"field {name!r} is mapped to an empty column name in --map")
        mapping[name] = column
    return mapping


def import_routing(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    mapping: str | Mapping[str, str] | None = None,
    num_experts: int | None = None,
    model: str | None = None,
    router_label: str = "imported",
    expert_bytes: int | str | Sequence[int] | None = None,
    layers: Sequence[int] | None = None,
    step: str | None = None,
    order: str = "token",
    skip_warmup: int = 0,
    on_problem: str = "error",
    overwrite: bool = False,
) -> ImportReport:
    """Import a routing log or array file ``source`` as a trace file ``out``.

    See the module docstring for the formats, the fields and the problems reported.

    - ``mapping``: ``"FIELD=COLUMN,..."`` or a dict (row logs only); unmapped fields use
      a same-named column when present.
    - ``num_experts``: E; default largest id + 1 (recorded as inferred).
    - ``model``, ``router_label``: metadata labels (``model.name``, ``router``).
    - ``expert_bytes``: bytes of one expert (an int, a size such as ``"8MiB"``, or a list
      with one per MoE layer in ascending layer order), enabling byte and memory metrics.
    - ``layers``: the model's MoE layer ids. Row logs: rows of other layers are a problem
      (``other_layers``, e.g. dense layers a hook also logged) and a listed layer missing
      for a token is ``missing_layers``; default: every layer that appears. Arrays: the
      layer id of each axis-1 entry (like the ``.npz`` ``layers`` array).
    - ``step``: how tokens form steps. ``"column"``: the step field (tokens are then
      ordered by step first); ``"token"``: every token is its own step (decode-like, as
      ``--per-token`` replay would treat it); ``"prefill"``: each run of consecutive
      prefill tokens of one sequence is one step and every decode token its own (as
      ``moecache capture`` records; needs the phase field). Default: ``"column"`` when
      the log has a step field, else ``"token"``.
    - ``order``: ``"token"`` or ``"file"``, see the module docstring.
    - ``skip_warmup``: drop the first N tokens.
    - ``on_problem``: ``"error"`` (default) or ``"drop"``.
    - ``overwrite``: replace an existing ``out`` (the write is atomic either way).
    """
    path = Path(source)
    src = str(path)
    if on_problem not in ON_PROBLEM:
        raise MoecacheError(f"on_problem must be one of {', '.join(ON_PROBLEM)}, got {on_problem!r}")
    if step is not None and step not in STEP_MODES:
        raise MoecacheError(f"step must be one of {', '.join(STEP_MODES)}, got {step!r}")
    if order not in ORDERS:
        raise MoecacheError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
    if isinstance(skip_warmup, bool) or not isinstance(skip_warmup, (int, np.integer)) or skip_warmup < 0:
        raise MoecacheError(f"skip_warmup must be a non-negative number of tokens, got {skip_warmup!r}")
    integral = isinstance(num_experts, (int, np.integer)) and not isinstance(num_experts, bool)
    if num_experts is not None and (not integral or num_experts < 1):
        raise MoecacheError(f"num_experts must be a positive integer, got {num_experts!r}")
    declared = None
    if layers is not None:
        declared = np.asarray(list(layers))
        if (declared.ndim != 1 or not len(declared) or not np.issubdtype(declared.dtype, np.integer)
                or declared.min() < 0 or len(np.unique(declared)) != len(declared)):
            raise MoecacheError(f"layers must be distinct non-negative layer ids, got {list(layers)!r}")
    try:
        fields = parse_mapping(mapping)
    except MoecacheError as err:
        raise MoecacheError(f"{src}: {err}") from None
    fmt = _format_of(path)
    out_path = Path(out)
    if not path.exists():
        raise MoecacheError(f"{src}: no such file")
    if path.is_dir():
        raise MoecacheError(f"{src}: is a folder, not a routing log")
    if out_path.exists() and path.resolve() == out_path.resolve():
        raise MoecacheError(f"{out_path}: the output would overwrite the source log")
    if out_path.exists() and not overwrite:
        raise MoecacheError(f"{out_path}: already exists (pass --force to overwrite)")
    digest = _sha256(path)
    problems = _Problems(src, on_problem)
    if fmt in ARRAY_FORMATS.values():
        if fields:
            raise MoecacheError(f"{src}: --map applies to row logs (JSONL, CSV, Parquet), not {fmt} arrays")
        tokens = _from_arrays(path, fmt, src, problems, skip_warmup=int(skip_warmup), num_experts=num_experts,
                              declared=declared)
    else:
        table = _read_table(path, fmt, src)
        tokens = _from_rows(table, src, fields, problems, skip_warmup=int(skip_warmup), order=order,
                            step_mode=step, num_experts=num_experts, declared=declared)
    return _write(tokens, out_path, src, fmt, digest, problems, num_experts=num_experts, model=model,
                  router_label=router_label, expert_bytes=expert_bytes, step_mode=step,
                  skip_warmup=int(skip_warmup), order=order, overwrite=overwrite)


# -- problems ---------------------------------------------------------------------------

class _Problems:
    """Raise (on_problem="error") or count and record (on_problem="drop") each problem."""

    def __init__(self, source: str, on_problem: str) -> None:
        self.source, self.on_problem = source, on_problem
        self.rows: dict[str, int] = {}
        self.tokens: dict[str, int] = {}
        self.lines: list[str] = []

    def check(self, message: str) -> None:
        """Raise when problems are errors; otherwise the caller drops and records."""
        if self.on_problem == "error":
            raise MoecacheError(f"{self.source}: {message}; {_DROP_HINT}")

    def found(self, reason: str, message: str, *, rows: int, tokens: int | None) -> None:
        self.check(message)
        self.drop(reason, rows=rows, tokens=tokens)
        counted = _n(rows, "row") + ("" if tokens is None else f" ({_n(tokens, 'token')})")
        self.lines.append(f"{message}: dropped {counted}")

    def drop(self, reason: str, *, rows: int, tokens: int | None) -> None:
        self.rows[reason] = self.rows.get(reason, 0) + int(rows)
        if tokens is not None:
            self.tokens[reason] = self.tokens.get(reason, 0) + int(tokens)


# -- the token-level result both paths produce -----------------------------------------

@dataclass
class _Tokens:
    experts: np.ndarray                  # (n, L, K) int64
    layers: list[int]
    rows_read: int
    weights: np.ndarray | None = None    # (n, L, K) float32
    seq: np.ndarray | None = None        # (n,) int64
    step: np.ndarray | None = None
    pos: np.ndarray | None = None
    phase: np.ndarray | None = None      # (n,) int8, PREFILL / DECODE
    token_id: np.ndarray | None = None
    seq_labels: list | None = None       # original request ids when seq was renumbered
    mapping: dict[str, str] = field(default_factory=dict)
    ignored_columns: list[str] = field(default_factory=list)
    inferred: dict[str, str] = field(default_factory=dict)


# -- reading row logs -------------------------------------------------------------------

def _format_of(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSED:
        suffixes = suffixes[:-1]
        if suffixes and suffixes[-1] in (".jsonl", ".ndjson", ".json", ".csv", ".tsv"):
            return ROW_FORMATS[suffixes[-1]]
        raise MoecacheError(f"{path}: only JSONL and CSV logs may be compressed")
    suffix = suffixes[-1] if suffixes else ""
    if suffix in ROW_FORMATS:
        return ROW_FORMATS[suffix]
    if suffix in ARRAY_FORMATS:
        return ARRAY_FORMATS[suffix]
    known = ", ".join(sorted({*ROW_FORMATS, *ARRAY_FORMATS}))
    raise MoecacheError(f"{path}: unknown log format {suffix or '(no suffix)'!r} (known: {known})")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _n(count: int, noun: str) -> str:
    """``_n(1, "row")`` -> "1 row", ``_n(2, "row")`` -> "2 rows"."""
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _read_table(path: Path, fmt: str, src: str) -> pa.Table:
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            with open(path, "rb") as handle:
                if handle.read(4) != b"PAR1":
                    raise MoecacheError(f"{src}: not a Parquet file")
            table = pq.read_table(path)
        elif fmt in ("csv", "tsv"):
            import pyarrow.csv as pacsv

            try:
                table = pacsv.read_csv(
                    pa.input_stream(str(path), compression="detect"),
                    parse_options=pacsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ","),
                    convert_options=pacsv.ConvertOptions(strings_can_be_null=True))
            except pa.ArrowInvalid as err:
                if "empty" in str(err).lower():
                    raise MoecacheError(f"{src}: empty file: no rows to import") from None
                raise
        else:
            table = _read_json(path, fmt, src)
    except MoecacheError:
        raise
    except (pa.ArrowException, OSError, UnicodeDecodeError) as err:
        raise MoecacheError(f"{src}: cannot read {fmt}: {_first_line(err)}") from None
    while any(pa.types.is_struct(f.type) for f in table.schema):
        table = table.flatten()
    if table.num_rows == 0:
        raise MoecacheError(f"{src}: no rows to import")
    return table


def _read_json(path: Path, fmt: str, src: str) -> pa.Table:
    """JSON lines via pyarrow; a JSON array of objects, or a log pyarrow rejects, via json."""
    import pyarrow.json as pj

    with pa.input_stream(str(path), compression="detect") as stream:
        raw = stream.read()
    text_start = raw.lstrip()[:1]
    if not text_start:
        raise MoecacheError(f"{src}: empty file: no rows to import")
    if text_start == b"[":
        try:
            records = json.loads(raw)
        except json.JSONDecodeError as err:
            raise MoecacheError(f"{src}: not valid JSON: {err.msg} (line {err.lineno})") from None
        return _records_table(records, src, "element")
    try:
        return pj.read_json(pa.BufferReader(raw), read_options=pj.ReadOptions(block_size=1 << 24))
    except pa.ArrowInvalid:
        pass  # find the exact line, or accept logs whose column types pyarrow will not unify
    records = []
    for number, line in enumerate(raw.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise MoecacheError(f"{src}: line {number} is not valid JSON: {err.msg}") from None
    return _records_table(records, src, "line")


def _records_table(records: Any, src: str, unit: str) -> pa.Table:
    if not isinstance(records, list):
        raise MoecacheError(f"{src}: expected a JSON array of row objects or JSON lines")
    for number, record in enumerate(records, 1):
        if not isinstance(record, dict):
            raise MoecacheError(f"{src}: {unit} {number} is not a JSON object")
    try:
        return pa.Table.from_pylist(records)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        raise MoecacheError(f"{src}: column types vary between rows: {_first_line(err)}") from None


# -- column conversion ------------------------------------------------------------------

class _Columns:
    """The resolved mapping and typed column access with messages naming the column."""

    def __init__(self, table: pa.Table, src: str, mapping: dict[str, str]) -> None:
        self.table, self.src = table, src
        names = table.column_names
        shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
        for name, column in mapping.items():
            if column not in names:
                raise MoecacheError(f"{src}: no column {column!r} (mapped to {name}); columns: {shown}")
        self.mapping = {name: mapping.get(name, name) for name in FIELDS
                        if mapping.get(name, name) in names}
        if "token" not in self.mapping and "pos" not in self.mapping:
            raise MoecacheError(f"{src}: no token column: map token=COLUMN (the token's index in the log); "
                                f"columns: {shown}")
        for name in ("experts", "layer"):
            if name not in self.mapping:
                raise MoecacheError(f"{src}: no {name} column: map {name}=COLUMN; columns: {shown}")
        used = set(self.mapping.values())
        self.ignored = [n for n in names if n not in used]

    def label(self, name: str) -> str:
        column = self.mapping[name]
        return f"{column!r}" if column == name else f"{column!r} ({name})"

    def array(self, name: str) -> pa.Array:
        arr = self.table.column(self.mapping[name]).combine_chunks()
        if pa.types.is_dictionary(arr.type):
            arr = arr.dictionary_decode()
        return arr

    def ints(self, name: str, *, nulls: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(int64 values with 0 where null, null mask); nulls are an error unless allowed."""
        arr = self.array(name)
        values, null = _int_array(arr, lambda why: f"{self.src}: column {self.label(name)} {why}")
        if null.any() and not nulls:
            empty = _n(int(null.sum()), "row")
            raise MoecacheError(f"{self.src}: column {self.label(name)} is empty in {empty} "
                                f"(first: row {int(np.argmax(null)) + 1})")
        return values, null


def _int_array(arr: pa.Array, fail: Callable[[str], str]) -> tuple[np.ndarray, np.ndarray]:
    null = np.asarray(arr.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    kind = arr.type
    if pa.types.is_null(kind):
        return np.zeros(len(arr), np.int64), null
    if pa.types.is_boolean(kind):
        return np.asarray(arr.fill_null(False).to_numpy(zero_copy_only=False), np.int64), null
    if pa.types.is_integer(kind):
        return np.asarray(arr.fill_null(0).to_numpy(zero_copy_only=False), np.int64), null
    if pa.types.is_floating(kind):
        values = np.asarray(arr.to_numpy(zero_copy_only=False), np.float64)
        null |= np.isnan(values)
        bad = ~null & ((values != np.round(values)) | ~np.isfinite(values) | (np.abs(values) > 2**62))
        if bad.any():
            at = int(np.argmax(bad))
            raise MoecacheError(fail(f"holds non-integer value {values[at]!r} (row {at + 1})"))
        return np.where(null, 0, values).astype(np.int64), null
    raise MoecacheError(fail(f"must hold integers, got {kind}"))


def _lists(arr: pa.Array, value_type: pa.DataType, fail: Callable[[str], str]
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(flat values, per-row lengths with 0 for null, null mask) of a list-like column.

    Accepts list columns, scalars (one value per row, K = 1) and strings holding a JSON
    list or values separated by commas, semicolons or spaces.
    """
    kind = arr.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        cleaned = pc.utf8_trim_whitespace(pc.replace_substring_regex(arr.cast(pa.string()), r"[\[\]]", ""))
        cleaned = pc.if_else(pc.equal(cleaned, ""), pa.scalar(None, pa.string()), cleaned)
        arr = pc.split_pattern_regex(cleaned, r"[,;\s]+")
        kind = arr.type
    if pa.types.is_fixed_size_list(kind) or pa.types.is_large_list(kind):
        arr = arr.cast(pa.list_(kind.value_type))
        kind = arr.type
    if pa.types.is_null(kind):
        n = len(arr)
        return np.zeros(0, np.float64), np.zeros(n, np.int64), np.ones(n, bool)
    if not pa.types.is_list(kind):
        if not (pa.types.is_integer(kind) or pa.types.is_floating(kind)):
            raise MoecacheError(fail(f"must hold lists of numbers, got {kind}"))
        arr = pa.ListArray.from_arrays(pa.array(np.arange(len(arr) + 1, dtype=np.int32)), arr,
                                       mask=arr.is_null())
        kind = arr.type
    null = np.asarray(arr.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    lengths = np.asarray(pc.list_value_length(arr).fill_null(0).to_numpy(zero_copy_only=False), np.int64)
    flat = pc.list_flatten(arr)
    item = kind.value_type
    if pa.types.is_list(item) or pa.types.is_large_list(item) or pa.types.is_fixed_size_list(item):
        raise MoecacheError(fail("holds nested lists: import expects one row per (token, layer), "
                                 "not one row per batch"))
    if flat.null_count:
        at = int(np.argmax(np.asarray(flat.is_null().to_numpy(zero_copy_only=False))))
        row = int(np.searchsorted(np.cumsum(lengths), at, side="right"))
        raise MoecacheError(fail(f"has a null inside a list (row {row + 1})"))
    if not (pa.types.is_null(item) or pa.types.is_integer(item) or pa.types.is_floating(item)
            or pa.types.is_string(item) or pa.types.is_large_string(item)):
        raise MoecacheError(fail(f"must hold lists of numbers, got lists of {item}"))
    try:
        values = flat.cast(value_type) if not pa.types.is_null(item) else pa.array([], value_type)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
        raise MoecacheError(fail(f"holds a value that is not a number: {_first_line(err)}")) from None
    return np.asarray(values.to_numpy(zero_copy_only=False)), lengths, null


# -- row logs -> tokens -----------------------------------------------------------------

def _from_rows(table: pa.Table, src: str, mapping: dict[str, str], problems: _Problems, *,
               skip_warmup: int, order: str, step_mode: str | None, num_experts: int | None,
               declared: np.ndarray | None) -> _Tokens:
    cols = _Columns(table, src, mapping)
    if step_mode in ("token", "prefill") and "step" in cols.mapping:
        cols.ignored.append(cols.mapping.pop("step"))    # steps are derived: the column is unused
    num_rows = table.num_rows
    inferred: dict[str, str] = {}
    row = np.arange(num_rows, dtype=np.int64)
    layer, _ = cols.ints("layer")
    if "token" in cols.mapping:
        tok, _ = cols.ints("token")
    else:
        tok, _ = cols.ints("pos")
        inferred["token"] = f"tokens told apart by (seq, pos), from column {cols.mapping['pos']!r}"
    has_seq = "seq" in cols.mapping
    if has_seq:
        seq, seq_null, seq_labels, seq_shown = _seq_column(cols)
    else:
        seq, seq_null, seq_labels = np.zeros(num_rows, np.int64), np.zeros(num_rows, bool), None
        seq_shown = None
        inferred["seq"] = "one sequence (0) for every token"

    def tok_desc(r: int) -> str:
        return f"token {tok[r]}" + (f" (seq {seq_shown(r)})" if has_seq else "")

    # 1. warm-up rows: no request (null or negative seq) or a negative token index
    warm = seq_null | (seq < 0) | (tok < 0)
    if warm.any():
        at = int(np.argmax(warm))
        problems.found("warmup", f"{_n(int(warm.sum()), 'warm-up row')} without a real request (null or "
                       f"negative seq, or negative token; first: row {at + 1}, {tok_desc(at)})",
                       rows=int(warm.sum()), tokens=None)
    keep = ~warm
    if not keep.any():
        raise MoecacheError(f"{src}: every row is a warm-up row: nothing left to import")
    if declared is not None:
        other = keep & ~np.isin(layer, declared)
        if other.any():
            at = int(np.argmax(other))
            logged = np.unique(layer[other])
            shown = ", ".join(map(str, logged[:10].tolist())) + (", ..." if len(logged) > 10 else "")
            problems.found("other_layers", f"{_n(int(other.sum()), 'row')} of layers outside --layers "
                           f"(layers {shown}; first: row {at + 1}, {tok_desc(at)}, layer {layer[at]})",
                           rows=int(other.sum()), tokens=None)
            keep &= ~other
            if not keep.any():
                raise MoecacheError(f"{src}: no row belongs to the layers given with --layers")

    # 2. tokens = distinct (seq, token) pairs, in trace order
    idx = np.flatnonzero(keep)
    by_key = idx[np.lexsort((row[idx], tok[idx], seq[idx]))]
    new = np.ones(len(by_key), bool)
    new[1:] = (seq[by_key][1:] != seq[by_key][:-1]) | (tok[by_key][1:] != tok[by_key][:-1])
    tid = np.full(num_rows, -1, np.int64)
    tid[by_key] = np.cumsum(new) - 1
    first_row = by_key[new]                      # each key's rows are sorted by row number
    num_tokens = len(first_row)
    per_token: dict[str, np.ndarray] = {}
    tok_step = np.zeros(num_tokens, np.int64)
    if "step" in cols.mapping:
        per_token["step"] = cols.ints("step")[0]
        tok_step = np.full(num_tokens, np.iinfo(np.int64).max)
        np.minimum.at(tok_step, tid[idx], per_token["step"][idx])
    keys = (first_row,) if order == "file" else (first_row, tok[first_row])
    token_order = np.lexsort((*keys, tok_step))
    rank = np.empty(num_tokens, np.int64)
    rank[token_order] = np.arange(num_tokens)

    def of_tokens(mask: np.ndarray) -> np.ndarray:
        """Rows (as a mask) whose token is flagged in the per-token ``mask``."""
        return (tid >= 0) & mask[np.maximum(tid, 0)]

    # 3. explicit warm-up: the first N tokens
    if skip_warmup:
        if skip_warmup >= num_tokens:
            raise MoecacheError(f"{src}: --skip-warmup {skip_warmup} drops all {num_tokens} tokens")
        skipped = keep & of_tokens(rank < skip_warmup)
        problems.drop("skip_warmup", rows=int(skipped.sum()), tokens=skip_warmup)
        keep &= ~skipped

    # 4. per-row data: malformed data is always an error
    idx = np.flatnonzero(keep)
    experts = _row_experts(cols, idx, src)
    top_k = experts.shape[1]
    _check_ids(experts, num_experts, src, lambda i: f"row {idx[i] + 1}")
    weights = _row_weights(cols, idx, top_k, src) if "weights" in cols.mapping else None
    if "pos" in cols.mapping:
        per_token["pos"] = cols.ints("pos")[0]
    if "phase" in cols.mapping:
        per_token["phase"] = _phase_column(cols)
    if "token_id" in cols.mapping:
        values, null = cols.ints("token_id", nulls=True)
        per_token["token_id"] = np.where(null, -1, values)
    all_experts = np.zeros((num_rows, top_k), np.int64)
    all_experts[idx] = experts
    all_weights = None
    if weights is not None and not np.isnan(weights).all():
        all_weights = np.full((num_rows, top_k), np.nan, np.float32)
        all_weights[idx] = weights

    # 5. tokens whose rows disagree, duplicate (token, layer) rows
    bad_token = np.zeros(num_tokens, bool)
    by_token = idx[np.lexsort((row[idx], layer[idx], tid[idx]))]
    same_token = tid[by_token][1:] == tid[by_token][:-1]
    for name, values in per_token.items():
        differ = same_token & (values[by_token][1:] != values[by_token][:-1])
        if differ.any():
            at = int(np.argmax(differ))
            a, b = by_token[at], by_token[at + 1]
            flagged = np.zeros(num_tokens, bool)
            flagged[tid[by_token][1:][differ]] = True
            flagged &= ~bad_token
            message = (f"{_n(int(flagged.sum()), 'token')} whose rows disagree on {name} "
                       f"(first: {tok_desc(a)}: rows {a + 1} and {b + 1} say {values[a]} and {values[b]})")
            problems.found("conflict", message, rows=int((keep & of_tokens(flagged)).sum()),
                           tokens=int(flagged.sum()))
            bad_token |= flagged
    dup = same_token & (layer[by_token][1:] == layer[by_token][:-1])
    if dup.any():
        head_at = np.arange(len(by_token))
        head_at[1:][dup] = 0
        head_at = np.maximum.accumulate(head_at)   # position of each row's (token, layer) group head
        later = np.flatnonzero(dup) + 1
        head, copy = by_token[head_at[later]], by_token[later]
        same = (all_experts[head] == all_experts[copy]).all(axis=1)
        if all_weights is not None:
            wh, wc = all_weights[head], all_weights[copy]
            same &= ((wh == wc) | (np.isnan(wh) & np.isnan(wc))).all(axis=1)
        conflicting = np.zeros(num_tokens, bool)
        conflicting[tid[copy[~same]]] = True
        n_copies, n_conf = len(later), int((~same).sum())
        if n_conf:
            at = int(np.argmax(~same))
            a, b = head[at], copy[at]
            held = f"{all_experts[a].tolist()} and {all_experts[b].tolist()}"
            if all_experts[a].tolist() == all_experts[b].tolist():
                held += " with different weights"
            example = (f"first conflict: {tok_desc(a)}, layer {layer[a]}: rows {a + 1} and {b + 1} "
                       f"hold {held}")
        else:
            a, b = head[0], copy[0]
            example = f"first: {tok_desc(a)}, layer {layer[a]}: rows {a + 1} and {b + 1}"
        if n_conf:
            message = (f"{_n(n_copies, 'duplicate (token, layer) row')}: {n_copies - n_conf} identical, "
                       f"{n_conf} conflicting in {_n(int(conflicting.sum()), 'token')} ({example})")
        else:
            message = f"{_n(n_copies, 'duplicate (token, layer) row')}, all identical copies ({example})"
        problems.check(message)
        extra = copy[same & ~of_tokens(conflicting | bad_token)[copy]]
        fresh = conflicting & ~bad_token
        conf_rows = int((keep & of_tokens(fresh)).sum())
        if len(extra):
            problems.drop("duplicate", rows=len(extra), tokens=None)
        if fresh.any():
            problems.drop("conflict", rows=conf_rows, tokens=int(fresh.sum()))
        problems.lines.append(
            f"{message}: dropped {len(extra)} identical {'copy' if len(extra) == 1 else 'copies'}"
            + (f" and {_n(int(fresh.sum()), 'conflicting token')} ({_n(conf_rows, 'row')})"
               if fresh.any() else ""))
        bad_token |= conflicting
        keep[extra] = False
    keep &= ~of_tokens(bad_token)
    if not keep.any():
        raise MoecacheError(f"{src}: no tokens left after dropping problem rows")

    # 6. tokens missing some MoE layer (each (token, layer) now has one row)
    idx = np.flatnonzero(keep)
    layers = np.unique(layer[idx]) if declared is None else np.unique(declared)
    count = np.bincount(tid[idx], minlength=num_tokens)
    short = (count > 0) & (count < len(layers))
    if short.any():
        first = int(token_order[short[token_order]][0])
        lacks = np.setdiff1d(layers, layer[idx[tid[idx] == first]]).tolist()
        per_layer = np.bincount(np.searchsorted(layers, layer[idx]), minlength=len(layers))
        rare = int(np.argmin(per_layer))
        num_short, num_present = int(short.sum()), int((count > 0).sum())
        message = (f"{num_short} of {_n(num_present, 'token')} lack rows for some of the "
                   f"{len(layers)} MoE layers (first: {tok_desc(int(first_row[first]))} has no row for "
                   f"layer {', '.join(map(str, lacks))}; layer {layers[rare]} is logged for "
                   f"{_n(int(per_layer[rare]), 'token')})")
        if declared is None and problems.on_problem == "drop" and 2 * num_short > num_present:
            raise MoecacheError(f"{src}: {message}; not dropping: that would discard most tokens "
                                "(name the MoE layers with --layers to drop them anyway)")
        if declared is None and 2 * per_layer[rare] < num_present:
            message += f"; if layer {layers[rare]} is no MoE layer, name the MoE layers with --layers"
        problems.found("missing_layers", message, rows=int(count[short].sum()), tokens=num_short)
        keep &= ~of_tokens(short)
        idx = np.flatnonzero(keep)
        if not len(idx):
            raise MoecacheError(f"{src}: no tokens left after dropping problem rows")

    # 7. dense (tokens, layers, K) in trace order
    present = np.bincount(tid[idx], minlength=num_tokens) > 0
    kept_tokens = token_order[present[token_order]]
    new_index = np.full(num_tokens, -1, np.int64)
    new_index[kept_tokens] = np.arange(len(kept_tokens))
    t_at, l_at = new_index[tid[idx]], np.searchsorted(layers, layer[idx])
    n = len(kept_tokens)
    dense = np.zeros((n, len(layers), top_k), np.int64)
    dense[t_at, l_at] = all_experts[idx]
    dense_weights = None
    if all_weights is not None:
        dense_weights = np.zeros((n, len(layers), top_k), np.float32)
        dense_weights[t_at, l_at] = all_weights[idx]
    _, first_at = np.unique(t_at, return_index=True)
    head_row = idx[first_at]                    # first kept row of each token, in trace order
    if "pos" not in cols.mapping:
        inferred["pos"] = "index within its sequence in trace order"
    tok_seq = seq[head_row]
    if seq_labels is not None:                  # renumber 0, 1, ... in trace order
        codes, first_at = np.unique(tok_seq, return_index=True)
        by_first = codes[np.argsort(first_at)]
        renumber = np.zeros(int(codes.max()) + 1, np.int64)
        renumber[by_first] = np.arange(len(by_first))
        tok_seq, seq_labels = renumber[tok_seq], [seq_labels[c] for c in by_first]
        inferred["seq"] = f"request ids of column {cols.mapping['seq']!r} numbered 0, 1, ... in trace order"
    return _Tokens(
        experts=dense, layers=[int(v) for v in layers], rows_read=num_rows, weights=dense_weights,
        seq=tok_seq, seq_labels=seq_labels, mapping=dict(cols.mapping),
        ignored_columns=list(cols.ignored), inferred=inferred,
        **{name: values[head_row] for name, values in per_token.items()})


def _seq_column(cols: _Columns) -> tuple[np.ndarray, np.ndarray, list | None, Callable[[int], str]]:
    """(seq ids, null mask, original labels or None, row -> printable seq).

    Strings (vLLM request ids) and integers beyond int32 are renumbered 0, 1, ... in order
    of first appearance; negative integers stay negative (warm-up rows).
    """
    import pandas as pd

    arr = cols.array("seq")
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        text = np.asarray(arr.to_numpy(zero_copy_only=False), dtype=object)
        codes, labels = pd.factorize(text, use_na_sentinel=True)
        null = codes < 0
        return (np.where(null, 0, codes).astype(np.int64), null, [str(v) for v in labels],
                lambda r: "null" if null[r] else repr(text[r]))
    values, null = _int_array(arr, lambda why: f"{cols.src}: column {cols.label('seq')} {why}")

    def shown(r: int) -> str:
        return "null" if null[r] else str(values[r])

    info = np.iinfo(np.int32)
    real = ~null & (values >= 0)
    if real.any() and values[real].max() > info.max:
        codes, labels = pd.factorize(values[real])
        ids = np.where(null, 0, values)
        ids[real] = codes
        return ids.astype(np.int64), null, [int(v) for v in labels], shown
    return values, null, None, shown


def _phase_column(cols: _Columns) -> np.ndarray:
    """PREFILL/DECODE per row from strings, booleans ("is prefill") or 0/1."""
    arr = cols.array("phase")
    label = cols.label("phase")
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        text = np.asarray(pc.utf8_lower(pc.utf8_trim_whitespace(arr)).fill_null("")
                          .to_numpy(zero_copy_only=False), dtype=object)
        bad = (text != "prefill") & (text != "decode")
        if bad.any():
            at = int(np.argmax(bad))
            raise MoecacheError(f"{cols.src}: column {label} holds {text[at] or 'nothing'!r} at row "
                                f"{at + 1}; expected prefill or decode")
        return np.where(text == "prefill", PREFILL, DECODE).astype(np.int8)
    values, _ = cols.ints("phase")
    if pa.types.is_boolean(arr.type):
        return np.where(values == 1, PREFILL, DECODE).astype(np.int8)
    bad = (values != PREFILL) & (values != DECODE)
    if bad.any():
        at = int(np.argmax(bad))
        raise MoecacheError(f"{cols.src}: column {label} holds {values[at]} at row {at + 1}; "
                            f"expected {PREFILL} (prefill) or {DECODE} (decode)")
    return values.astype(np.int8)


def _rectangle(flat: np.ndarray, lengths: np.ndarray, null: np.ndarray, idx: np.ndarray,
               label: str, src: str, what: str, top_k: int | None = None) -> np.ndarray:
    """The rows ``idx`` of a list column as a (len(idx), K) array; all must hold K values."""
    if null[idx].any():
        at = idx[np.argmax(null[idx])]
        raise MoecacheError(f"{src}: {_n(int(null[idx].sum()), 'row')} without {what} (null or missing "
                            f"{label}; first: row {at + 1})")
    sizes = lengths[idx]
    if top_k is None:
        if (sizes == 0).any():
            at = idx[np.argmax(sizes == 0)]
            raise MoecacheError(f"{src}: empty {what} list in {label} (row {at + 1})")
        values, counts = np.unique(sizes, return_counts=True)
        top_k = int(values[np.argmax(counts)])
        if len(values) > 1:
            at = idx[np.argmax(sizes != top_k)]
            raise MoecacheError(f"{src}: inconsistent K: rows of {label} hold "
                                f"{' or '.join(map(str, values.tolist()))} {what} (K={top_k} in "
                                f"{int(counts.max())} rows; row {at + 1} holds {lengths[at]})")
    elif (sizes != top_k).any():
        at = idx[np.argmax(sizes != top_k)]
        raise MoecacheError(f"{src}: row {at + 1} holds {lengths[at]} {what} in {label}, "
                            f"but {top_k} experts")
    if (lengths == top_k).all():
        return flat.reshape(-1, top_k)[idx]
    offsets = np.concatenate(([0], np.cumsum(lengths)))
    return flat[offsets[idx][:, None] + np.arange(top_k)]


def _row_experts(cols: _Columns, idx: np.ndarray, src: str) -> np.ndarray:
    label = cols.label("experts")
    flat, lengths, null = _lists(cols.array("experts"), pa.float64(),
                                 lambda why: f"{src}: column {label} {why}")
    values = _rectangle(flat, lengths, null, idx, label, src, "experts")
    bad = ~np.isfinite(values) | (values != np.round(values))
    if bad.any():
        r = int(np.argwhere(bad)[0][0])
        raise MoecacheError(f"{src}: column {label} holds a non-integer expert id at row {idx[r] + 1}: "
                            f"{values[r].tolist()}")
    return values.astype(np.int64)


def _row_weights(cols: _Columns, idx: np.ndarray, top_k: int, src: str) -> np.ndarray:
    label = cols.label("weights")
    flat, lengths, null = _lists(cols.array("weights"), pa.float32(),
                                 lambda why: f"{src}: column {label} {why}")
    present = idx[~null[idx]]
    weights = np.full((len(idx), top_k), np.nan, np.float32)
    if len(present):
        weights[~null[idx]] = _rectangle(flat, lengths, null, present, label, src, "weights", top_k)
    return weights


def _check_ids(experts: np.ndarray, num_experts: int | None, src: str,
               where: Callable[[int], str]) -> None:
    """Negative ids, ids >= num_experts and ids repeated within a row: (rows, K) array."""
    if not experts.size:
        return
    low = experts.min(axis=1)
    if (low < 0).any():
        r = int(np.argmax(low < 0))
        raise MoecacheError(f"{src}: negative expert id {int(low[r])} ({where(r)}: {experts[r].tolist()})")
    if num_experts is not None:
        high = experts.max(axis=1)
        if (high >= num_experts).any():
            r = int(np.argmax(high >= num_experts))
            raise MoecacheError(f"{src}: expert id {int(high[r])} >= num_experts {num_experts} "
                                f"({where(r)}: {experts[r].tolist()})")
    if experts.shape[1] > 1:
        ordered = np.sort(experts, axis=1)
        repeated = (ordered[:, 1:] == ordered[:, :-1]).any(axis=1)
        if repeated.any():
            r = int(np.argmax(repeated))
            raise MoecacheError(f"{src}: expert id repeated within one row "
                                f"({where(r)}: {experts[r].tolist()})")


# -- arrays -> tokens -------------------------------------------------------------------

def _from_arrays(path: Path, fmt: str, src: str, problems: _Problems, *, skip_warmup: int,
                 num_experts: int | None, declared: np.ndarray | None) -> _Tokens:
    try:
        loaded = np.load(path, allow_pickle=False)
    except ValueError as err:
        message = "holds Python objects (pickled arrays are not read)" if "pickle" in str(err) else (
            f"not a readable {fmt} file: {_first_line(err)}")
        raise MoecacheError(f"{src}: {message}") from None
    except (OSError, EOFError) as err:
        raise MoecacheError(f"{src}: not a readable {fmt} file: {_first_line(err)}") from None
    if fmt == "npz":
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise MoecacheError(f"{src}: not an .npz archive")
        with loaded:
            unknown = sorted(set(loaded.files) - set(NPZ_KEYS))
            if unknown:
                raise MoecacheError(f"{src}: unknown array {unknown[0]!r} (accepted: {', '.join(NPZ_KEYS)})")
            if "experts" not in loaded.files:
                present = ", ".join(loaded.files) or "none"
                raise MoecacheError(f"{src}: no 'experts' array (arrays: {present})")
            try:
                arrays = {key: loaded[key] for key in loaded.files}
            except ValueError as err:
                raise MoecacheError(f"{src}: holds Python objects or is damaged: "
                                    f"{_first_line(err)}") from None
    else:
        if not isinstance(loaded, np.ndarray):
            raise MoecacheError(f"{src}: not an .npy array")
        arrays = {"experts": loaded}
    experts = arrays["experts"]
    name = "array" if fmt == "npy" else "'experts'"
    if experts.ndim != 3:
        hint = f"; for K = 1 reshape to {(*experts.shape, 1)}" if experts.ndim == 2 else ""
        raise MoecacheError(f"{src}: {name} must have shape (tokens, layers, K), got {experts.shape}{hint}")
    if not np.issubdtype(experts.dtype, np.integer):
        raise MoecacheError(f"{src}: expert ids must be integers, {name} has dtype {experts.dtype}")
    n, num_layers, top_k = experts.shape
    if n == 0 or num_layers == 0 or top_k == 0:
        raise MoecacheError(f"{src}: {name} is empty (shape {experts.shape})")
    experts = experts.astype(np.int64)
    weights = arrays.get("weights")
    if weights is not None:
        if weights.shape != experts.shape:
            raise MoecacheError(f"{src}: 'weights' has shape {weights.shape}, 'experts' {experts.shape}")
        if not (np.issubdtype(weights.dtype, np.floating) or np.issubdtype(weights.dtype, np.integer)):
            raise MoecacheError(f"{src}: 'weights' must be numbers, got dtype {weights.dtype}")
        weights = weights.astype(np.float32)
    per_token = {}
    for key in ("seq", "step", "token_id"):
        if key in arrays:
            values = arrays[key]
            if values.shape != (n,):
                raise MoecacheError(f"{src}: {key!r} must have shape ({n},) (one per token), "
                                    f"got {values.shape}")
            if not np.issubdtype(values.dtype, np.integer):
                raise MoecacheError(f"{src}: {key!r} must hold integers, got dtype {values.dtype}")
            per_token[key] = values.astype(np.int64)
    layers = list(range(num_layers))
    inferred = {}
    if declared is not None and "layers" in arrays and (
            sorted(arrays["layers"].tolist()) != sorted(declared.tolist())):
        raise MoecacheError(f"{src}: 'layers' array {arrays['layers'].tolist()} disagrees with --layers "
                            f"{declared.tolist()}")
    given = arrays.get("layers")
    if given is None and declared is not None:
        if len(declared) != num_layers:
            raise MoecacheError(f"{src}: --layers names {_n(len(declared), 'layer')}, "
                                f"the array has {num_layers}")
        given = declared
    if given is not None:
        if given.shape != (num_layers,) or not np.issubdtype(given.dtype, np.integer):
            raise MoecacheError(f"{src}: 'layers' must be {num_layers} integers (one per axis-1 entry), "
                                f"got shape {given.shape} dtype {given.dtype}")
        if len(np.unique(given)) != num_layers or given.min() < 0:
            raise MoecacheError(f"{src}: 'layers' must be distinct non-negative layer ids, "
                                f"got {given.tolist()}")
        by_layer = np.argsort(given, kind="stable")
        layers = [int(v) for v in given[by_layer]]
        experts = experts[:, by_layer]
        weights = None if weights is None else weights[:, by_layer]
    else:
        inferred["layers"] = f"0..{num_layers - 1} (no 'layers' array and no --layers)"
    keep = np.ones(n, bool)
    if "seq" in per_token and (per_token["seq"] < 0).any():
        warm = per_token["seq"] < 0
        at = int(np.argmax(warm))
        problems.found("warmup", f"{_n(int(warm.sum()), 'warm-up token')} with a negative seq "
                       f"(first: token {at}, seq {per_token['seq'][at]})",
                       rows=int(warm.sum()) * num_layers, tokens=None)
        keep &= ~warm
    if skip_warmup:
        kept = np.flatnonzero(keep)
        if skip_warmup >= len(kept):
            raise MoecacheError(f"{src}: --skip-warmup {skip_warmup} drops all {len(kept)} tokens")
        keep[kept[:skip_warmup]] = False
        problems.drop("skip_warmup", rows=skip_warmup * num_layers, tokens=skip_warmup)
    if not keep.any():
        raise MoecacheError(f"{src}: every token is a warm-up token: nothing left to import")
    experts = experts[keep]
    weights = None if weights is None else weights[keep]
    per_token = {key: values[keep] for key, values in per_token.items()}
    kept_index = np.flatnonzero(keep)
    _check_ids(experts.reshape(-1, top_k), num_experts, src,
               lambda i: f"token {kept_index[i // num_layers]}, layer {layers[i % num_layers]}")
    if "step" in per_token and (np.diff(per_token["step"]) < 0).any():
        at = int(np.argmax(np.diff(per_token["step"]) < 0)) + 1
        raise MoecacheError(f"{src}: 'step' must not decrease (token {kept_index[at]} has step "
                            f"{per_token['step'][at]} after {per_token['step'][at - 1]})")
    if "seq" not in per_token:
        inferred["seq"] = "one sequence (0) for every token"
    inferred["pos"] = "index within its sequence in trace order"
    return _Tokens(experts=experts, layers=layers, rows_read=n * num_layers, weights=weights,
                   inferred=inferred, **per_token)


# -- tokens -> trace file ---------------------------------------------------------------

def _write(tokens: _Tokens, out: Path, src: str, fmt: str, digest: str, problems: _Problems, *,
           num_experts: int | None, model: str | None, router_label: str,
           expert_bytes: int | str | Sequence[int] | None, step_mode: str | None, skip_warmup: int,
           order: str, overwrite: bool) -> ImportReport:
    experts = tokens.experts
    n, num_layers, top_k = experts.shape
    inferred = dict(tokens.inferred)
    if num_experts is None:
        num_experts = int(experts.max()) + 1
        inferred["num_experts"] = (f"largest expert id + 1 = {num_experts} "
                                   "(pass --num-experts: experts never routed to are invisible)")
    num_experts = int(num_experts)
    if top_k > num_experts:
        raise MoecacheError(f"{src}: K = {top_k} experts per row exceeds num_experts = {num_experts}")
    seq = np.zeros(n, np.int64) if tokens.seq is None else tokens.seq
    has_step = tokens.step is not None
    mode = step_mode or ("column" if has_step else "token")
    if mode == "column":
        if not has_step:
            raise MoecacheError(f"{src}: step='column' needs a step column (map step=COLUMN)")
        steps = tokens.step
    elif mode == "prefill":
        if tokens.phase is None:
            raise MoecacheError(f"{src}: step='prefill' needs a phase column (map phase=COLUMN)")
        prefill = tokens.phase == PREFILL
        joins = np.zeros(n, bool)
        joins[1:] = prefill[1:] & prefill[:-1] & (seq[1:] == seq[:-1])
        steps = np.cumsum(~joins) - 1
        inferred["step"] = "one step per run of prefill tokens of a sequence, one per decode token"
    else:
        steps = np.arange(n, dtype=np.int64)
        inferred["step"] = "one step per token (decode-like)"
    sizes = _expert_sizes(expert_bytes, num_layers, src)
    dropped = {"rows": dict(problems.rows), "tokens": dict(problems.tokens)}
    capture: dict[str, Any] = {
        "mode": "import",
        "source": src,
        "sha256": digest,
        "format": fmt,
        "mapping": tokens.mapping or None,
        "order": order if fmt not in ARRAY_FORMATS.values() else None,
        "step": mode,
        "skip_warmup": skip_warmup,
        "on_problem": problems.on_problem,
        "rows_read": tokens.rows_read,
        "dropped": dropped,
        "problems": list(problems.lines),
        "inferred": inferred,
        "moecache_version": __version__,
        "date": now_iso(),
    }
    if tokens.seq_labels is not None:
        labels = tokens.seq_labels
        capture["seq_labels"] = labels if len(labels) <= _MAX_SEQ_LABELS else None
        capture["seq_labels_count"] = len(labels)
    meta = {
        "model": {"name": model, "revision": None, "architecture": None},
        "router": router_label,
        "capture": capture,
    }
    try:
        trace = Trace.from_arrays(experts, num_experts=num_experts, weights=tokens.weights, seq=seq,
                                  layers=tokens.layers, expert_bytes=sizes, meta=meta, step=steps,
                                  phase=tokens.phase, token_id=tokens.token_id)
        if tokens.pos is not None:
            trace = dataclasses.replace(trace, pos=np.asarray(tokens.pos, np.int32))
        trace.save(out, overwrite=overwrite)
    except TraceError as err:  # checks of the in-memory trace: name the source log instead
        text = str(err)
        if not text.startswith("<memory>: "):
            raise
        raise MoecacheError(f"{src}: {text.removeprefix('<memory>: ')}") from None
    return ImportReport(
        source=src, out=str(out), format=fmt, sha256=digest, rows_read=tokens.rows_read,
        tokens_written=n, steps=trace.num_steps, layers=list(tokens.layers), top_k=top_k,
        num_experts=num_experts, sequences=len(np.unique(seq)), mapping=dict(tokens.mapping),
        ignored_columns=list(tokens.ignored_columns), inferred=inferred,
        dropped_rows=dict(problems.rows), dropped_tokens=dict(problems.tokens), problems=list(problems.lines))


def _expert_sizes(expert_bytes: int | str | Sequence[int] | None, num_layers: int, src: str
                  ) -> list[int] | None:
    if expert_bytes is None:
        return None
    if isinstance(expert_bytes, (str, int, float, np.integer)) and not isinstance(expert_bytes, bool):
        return [parse_bytes(expert_bytes, "expert size")] * num_layers
    sizes = [parse_bytes(v, "expert size") for v in expert_bytes]
    if len(sizes) != num_layers:
        raise MoecacheError(f"{src}: {len(sizes)} expert sizes given for {num_layers} MoE layers")
    return sizes

