"""``moecache import``: turn existing routing logs into a trace (the current format).

Three kinds of source are read:

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
token       yes [1]   index of the token: a global counter or one counting within each request
seq         no        request id (integers, or strings such as vLLM request ids, numbered
                      0, 1, ... in trace order, labels kept in ``capture.seq_labels``);
                      absent: every token is in sequence 0
weights     no        gate weights, same shape as experts
pos         no        position in the sequence; absent: counted in trace order per sequence
step        no        serving step (tokens served together); see ``step=`` below
time        no        a timestamp per row (numbers, or timestamps); orders tokens (see below)
phase       no        ``prefill``/``decode`` strings, booleans meaning "is prefill", or 0/1
token_id    no        vocabulary id (nulls allowed)
==========  ========  =======================================================================

[1] a ``pos`` column may stand in for the token column (tokens are then told apart by
(seq, pos)). Fields missing from the mapping fall back to a column of the same name when
the log has one; :attr:`ImportReport.mapping` lists what was used and
:attr:`ImportReport.ignored_columns` what was not. Nested JSON objects are flattened,
so ``experts=routing.ids`` reaches ``{"routing": {"ids": [...]}}``.

*Order of tokens.* A token is identified by its (seq, token) pair (with
``token_restarts="batch"``: its (seq, batch, token) triple). ``order`` says how tokens
follow each other in the trace:

- ``"sequence"`` (default): sequence-major; each sequence's tokens are contiguous,
  sequences follow in order of first appearance in the log, and a sequence's tokens are
  ordered by token index (batches first, with ``token_restarts="batch"``).
- ``"token"``: by token index across all sequences (for a global counter that records
  the order tokens were served in).
- ``"file"``: by first appearance in the log.

A step column (used unless ``step="token"``/``"prefill"``) says how sequences were
interleaved, so tokens are ordered by step first; a time column orders tokens by their
earliest timestamp (after the step); ``order`` then only breaks ties. The trace
metadata records the choice (``capture.order``) and one sentence on how the steps were
formed (``capture.steps_formed``, shown by ``moecache info``).

*Restarting token indices.* Some hooks count the token index within each forward batch,
so it restarts under one request id. ``token_restarts="batch"`` (CLI ``--token-restarts
batch``) numbers batches: for each request and layer, in file order, a new batch begins
at a row whose token index is not larger than the previous row's. Batches follow each
other in file order.

*Rows that are not routing rows* are skipped and counted (:attr:`ImportReport.skipped_rows`,
``capture.skipped``): rows without experts, layer and token fields (e.g. a
``{"type": "meta", ...}`` header line), and rows whose ``type`` column (when the log has
an unmapped one) holds a value that no row with experts holds.

*Arrays* (``.npy``: expert ids shaped (tokens, layers, K); ``.npz``: ``experts``
required, optional ``weights`` (same shape), ``logits`` (tokens, layers, E router
scores), ``seq``/``step``/``token_id`` (one per token), ``layers`` (the model layer id of
each axis-1 entry) and ``num_experts`` (a 0-d integer)). The formats of
:mod:`moecache.log_formats` (recognized by :func:`moecache.log_formats.sniff`) are read
into the same arrays. Tokens keep the order of the token axis.

Warm-up and profiling rows are detected and never merged: each kind raises
:class:`MoecacheError` with one line naming the file, the count and the first example;
with ``on_warmup="drop"`` they are dropped instead, before duplicates are resolved, and
counted in :class:`ImportReport` and the trace metadata (``capture.dropped``):

- ``warmup``: rows that belong to no real request - a null or negative seq, or a negative
  token index. vLLM's profile and warm-up runs (and CUDA-graph padding) log dummy
  batches like this.
- ``warmup_uniform``: tokens whose gate weights are exactly 1/K in every MoE layer (K > 1),
  as dummy inputs route. Only those rows are dropped, so a real token logged under the same
  (seq, token) keeps its rows.
- ``warmup_repeated``: runs of at least :data:`REPEAT_RUN` consecutive tokens of one
  sequence routed identically in every layer (the same ids in the same order, and the same
  weights when logged): implausible for real text, typical of profiling on dummy input.

Other problems are never merged silently either; with ``on_problem="drop"`` the affected
rows/tokens are dropped and counted (``dropped_rows``/``dropped_tokens`` by reason,
``problems`` with the same one-line text):

- ``conflict``: tokens with two different rows for one layer, or whose rows disagree on
  a per-token column (step, pos, phase, token_id). The whole token is dropped.
- ``duplicate``: identical copies of a (token, layer) row (a hook registered twice,
  every tensor-parallel rank logging). One copy is kept; the extra rows are counted.
- ``other_layers``: rows of a layer outside ``layers=`` (when given; e.g. dense layers a
  hook also logged). The rows are dropped.
- ``missing_layers``: tokens that lack a row for some MoE layer. The token is dropped -
  unless that would discard most tokens and ``layers=`` was not given: then one stray
  row of a bogus layer is the likelier problem, and it stays an error that says so.

``skip_warmup=N`` drops the first N tokens (in trace order, after warm-up rows) on
request - for warm-up prompts that look like real ones; counted under ``skip_warmup``.

Malformed data is always an error, whatever ``on_problem`` says: a missing or null
experts entry, K that differs between rows, a negative expert id, an id >=
``num_experts``, a repeated id inside one row, weights of the wrong length, values of the
wrong type. ``num_experts`` defaults to the value the log records, else the router
scores' width, else the largest id + 1; that guess is recorded in
``ImportReport.inferred`` and the metadata (pass the real E: an expert never routed to
in the log is otherwise invisible).

Messages name the command-line flags (``--drop-problems``, ``--drop-warmup``); they are
``on_problem="drop"`` and ``on_warmup="drop"`` here. Row numbers in messages are 1-based
data rows (JSONL: non-blank lines; CSV: lines after the header; Parquet: table rows).
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import log_formats
from ._version import __version__
from .errors import MoecacheError, TraceError
from .files import first_line
from .trace import Trace
from .trace_format import DECODE, PREFILL, now_iso, with_id_lists
from .units import parse_bytes

FIELDS = ("experts", "weights", "layer", "token", "seq", "pos", "step", "time", "phase", "token_id")
ON_PROBLEM = ("error", "drop")
STEP_MODES = ("column", "token", "prefill")
ORDERS = ("sequence", "token", "file")
TOKEN_RESTARTS = ("none", "batch")
REPEAT_RUN = 32
"""Consecutive identically routed tokens of one sequence that make a ``warmup_repeated`` run."""
ROW_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv",
               ".parquet": "parquet", ".pq": "parquet"}
ARRAY_FORMATS = {".npy": "npy", ".npz": "npz"}
COMPRESSED = (".gz", ".bz2", ".zst")
ARRAY_KEYS = ("experts", "weights", "logits", "seq", "layers", "step", "token_id", "num_experts")
WARMUP_REASONS = ("warmup", "warmup_uniform", "warmup_repeated")
_HINTS = {"problem": "rerun with --drop-problems to drop and count them",
          "warmup": "rerun with --drop-warmup to drop and count them"}
_MAX_SEQ_LABELS = 4096


@dataclass
class ImportReport:
    """What :func:`import_routing` read, wrote, inferred, skipped and dropped.

    ``dropped_rows`` and ``dropped_tokens`` map a reason (``warmup``, ``warmup_uniform``,
    ``warmup_repeated``, ``skip_warmup``, ``other_layers``, ``duplicate``, ``conflict``,
    ``missing_layers``) to a count; a reason that drops no whole token (``warmup``,
    ``other_layers``, ``duplicate``) appears in ``dropped_rows`` only.
    ``skipped_rows`` counts rows that are not routing rows (``non_routing``).
    ``problems`` holds one line per problem handled by dropping or skipping;
    ``steps_formed`` says in one sentence how the trace's steps were formed.
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
    steps_formed: str = ""
    mapping: dict[str, str] = field(default_factory=dict)
    ignored_columns: list[str] = field(default_factory=list)
    inferred: dict[str, str] = field(default_factory=dict)
    skipped_rows: dict[str, int] = field(default_factory=dict)
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
            f"  {self.steps_formed}",
        ]
        if self.mapping:
            lines.append("  mapping: " + ",".join(f"{k}={v}" for k, v in self.mapping.items()))
        if self.ignored_columns:
            lines.append("  ignored columns: " + ", ".join(self.ignored_columns))
        for name, how in self.inferred.items():
            lines.append(f"  inferred {name}: {how}")
        for reason, rows in self.skipped_rows.items():
            lines.append(f"  skipped ({reason}): {_n(rows, 'row')}")
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
    top_k: int | None = None,
    model: str | None = None,
    router_label: str = "imported",
    expert_bytes: int | str | Sequence[int] | None = None,
    layers: Sequence[int] | None = None,
    step: str | None = None,
    order: str | None = None,
    token_restarts: str = "none",
    skip_warmup: int = 0,
    on_problem: str = "error",
    on_warmup: str = "error",
    overwrite: bool = False,
) -> ImportReport:
    """Import a routing log or array file ``source`` as a trace file ``out``.

    See the module docstring for the formats, the fields, the order of tokens and the
    problems reported.

    - ``mapping``: ``"FIELD=COLUMN,..."`` or a dict (row logs only); unmapped fields use
      a same-named column when present.
    - ``num_experts``: E; default: recorded by the log, else the router scores' width,
      else the largest id + 1 (recorded as inferred).
    - ``top_k``: K, experts per token: passed to the readers of formats that do not record
      it (RTRACE01), checked against the others.
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
    - ``order``: ``"sequence"`` (default for row logs), ``"token"`` or ``"file"``; arrays
      keep the order of their token axis (only ``"file"`` is accepted for them).
    - ``token_restarts``: ``"none"`` or ``"batch"`` (the token index restarts at every
      forward batch of a request).
    - ``skip_warmup``: drop the first N tokens.
    - ``on_problem``: ``"error"`` (default) or ``"drop"`` for duplicate, conflicting,
      incomplete and other-layer rows.
    - ``on_warmup``: ``"error"`` (default) or ``"drop"`` for warm-up rows.
    - ``overwrite``: replace an existing ``out`` (the write is atomic either way).
    """
    path = Path(source)
    src = str(path)
    for name, value, choices in (("on_problem", on_problem, ON_PROBLEM), ("on_warmup", on_warmup, ON_PROBLEM),
                                 ("token_restarts", token_restarts, TOKEN_RESTARTS)):
        if value not in choices:
            raise MoecacheError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    if step is not None and step not in STEP_MODES:
        raise MoecacheError(f"step must be one of {', '.join(STEP_MODES)}, got {step!r}")
    if order is not None and order not in ORDERS:
        raise MoecacheError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
    if isinstance(skip_warmup, bool) or not isinstance(skip_warmup, (int, np.integer)) or skip_warmup < 0:
        raise MoecacheError(f"skip_warmup must be a non-negative number of tokens, got {skip_warmup!r}")
    for name, value in (("num_experts", num_experts), ("top_k", top_k)):
        integral = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
        if value is not None and (not integral or value < 1):
            raise MoecacheError(f"{name} must be a positive integer, got {value!r}")
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
    out_path = Path(out)
    if not path.exists():
        raise MoecacheError(f"{src}: no such file")
    if path.is_dir():
        raise MoecacheError(f"{src}: is a folder, not a routing log")
    if out_path.exists() and path.resolve() == out_path.resolve():
        raise MoecacheError(f"{out_path}: the output would overwrite the source log")
    if out_path.exists() and not overwrite:
        raise MoecacheError(f"{out_path}: already exists (pass --force to overwrite)")
    reader = log_formats.sniff(path)
    fmt = reader or _format_of(path)
    digest = _sha256(path)
    problems = _Problems(src, on_problem, on_warmup)
    if reader is not None or fmt in ARRAY_FORMATS.values():
        for given, flag in ((fields, "--map"), (order not in (None, "file"), f"--order {order}"),
                            (token_restarts != "none", f"--token-restarts {token_restarts}")):
            if given:
                raise MoecacheError(f"{src}: {flag} applies to row logs (JSONL, CSV, Parquet), not {fmt} "
                                    "arrays (their tokens keep the order of the token axis)")
        if reader is None:
            arrays = _load_arrays(path, fmt, src)
        else:
            read = log_formats.READERS[reader]
            wants_k = top_k is not None and "top_k" in inspect.signature(read).parameters
            arrays = read(path, src, top_k=top_k) if wants_k else read(path, src)
        tokens = _from_arrays(arrays, src, problems, name="the array" if fmt == "npy" else "'experts'",
                              skip_warmup=int(skip_warmup), num_experts=num_experts, declared=declared)
    else:
        table = _read_table(path, fmt, src)
        tokens = _from_rows(table, src, fields, problems, skip_warmup=int(skip_warmup),
                            order=order or "sequence", token_restarts=token_restarts, step_mode=step,
                            num_experts=num_experts, declared=declared)
    tokens = _drop_repeated_runs(tokens, src, problems)
    if top_k is not None and tokens.experts.shape[2] != top_k:
        raise MoecacheError(f"{src}: the log holds {tokens.experts.shape[2]} experts per row, "
                            f"but --top-k is {top_k}")
    return _write(tokens, out_path, src, fmt, digest, problems, num_experts=num_experts, model=model,
                  router_label=router_label, expert_bytes=expert_bytes, step_mode=step,
                  skip_warmup=int(skip_warmup), token_restarts=token_restarts, overwrite=overwrite)


# -- problems ---------------------------------------------------------------------------

class _Problems:
    """Raise (``"error"``) or count and record (``"drop"``) each problem; count skipped rows.

    Warm-up reasons follow ``on_warmup``, all others ``on_problem``.
    """

    def __init__(self, source: str, on_problem: str, on_warmup: str) -> None:
        self.source, self.on_problem, self.on_warmup = source, on_problem, on_warmup
        self.rows: dict[str, int] = {}
        self.tokens: dict[str, int] = {}
        self.skipped: dict[str, int] = {}
        self.lines: list[str] = []

    def check(self, reason: str, message: str) -> None:
        """Raise when this reason's problems are errors; otherwise the caller drops and records."""
        kind = "warmup" if reason in WARMUP_REASONS else "problem"
        if (self.on_warmup if kind == "warmup" else self.on_problem) == "error":
            raise MoecacheError(f"{self.source}: {message}; {_HINTS[kind]}")

    def found(self, reason: str, message: str, *, rows: int, tokens: int | None) -> None:
        self.check(reason, message)
        self.drop(reason, rows=rows, tokens=tokens)
        counted = _n(rows, "row") + ("" if tokens is None else f" ({_n(tokens, 'token')})")
        self.lines.append(f"{message}: dropped {counted}")

    def drop(self, reason: str, *, rows: int, tokens: int | None) -> None:
        self.rows[reason] = self.rows.get(reason, 0) + int(rows)
        if tokens is not None:
            self.tokens[reason] = self.tokens.get(reason, 0) + int(tokens)

    def skip(self, reason: str, message: str, rows: int) -> None:
        """Rows that are no routing data: never an error, always counted."""
        self.skipped[reason] = self.skipped.get(reason, 0) + int(rows)
        self.lines.append(f"{message}: skipped {_n(rows, 'row')}")


# -- the token-level result both paths produce -----------------------------------------

@dataclass
class _Tokens:
    experts: np.ndarray                  # (n, L, K) int64
    layers: list[int]
    rows_read: int
    order: str                           # capture.order: "sequence", "token", "file" or "axis"
    order_phrase: str                    # how tokens follow each other, for steps_formed
    weights: np.ndarray | None = None    # (n, L, K) float32
    logits: np.ndarray | None = None     # (n, L, E) float
    num_experts: int | None = None       # recorded by the log
    seq: np.ndarray | None = None        # (n,) int64
    step: np.ndarray | None = None
    pos: np.ndarray | None = None
    phase: np.ndarray | None = None      # (n,) int8, PREFILL / DECODE
    token_id: np.ndarray | None = None
    seq_labels: list | None = None       # original request ids when seq was renumbered
    first_row: np.ndarray | None = None  # (n,) first row of each token in a row log, for messages
    mapping: dict[str, str] = field(default_factory=dict)
    ignored_columns: list[str] = field(default_factory=list)
    inferred: dict[str, str] = field(default_factory=dict)

    def subset(self, keep: np.ndarray) -> _Tokens:
        """The tokens where the (n,) mask ``keep`` is true."""
        per_token = {f.name: getattr(self, f.name)[keep] for f in dataclasses.fields(self)
                     if f.name in ("experts", "weights", "logits", "seq", "step", "pos", "phase", "token_id",
                                   "first_row")
                     and getattr(self, f.name) is not None}
        return dataclasses.replace(self, **per_token)


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



def _read_table(path: Path, fmt: str, src: str) -> pa.Table:
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            with open(path, "rb") as handle:
                if handle.read(4) != b"PAR1":
                    raise MoecacheError(f"{src}: not a Parquet file")
            table = with_id_lists(pq.read_table(path))  # a moecache trace is a row log too
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
        raise MoecacheError(f"{src}: cannot read {fmt}: {first_line(err)}") from None
    while any(pa.types.is_struct(f.type) for f in table.schema):
        table = table.flatten()
    if table.num_rows == 0:
        raise MoecacheError(f"{src}: no rows to import")
    return table


def _read_json(path: Path, fmt: str, src: str) -> pa.Table:
    """JSON lines via pyarrow; a JSON array of objects, or a log pyarrow rejects, via json."""
    import pyarrow.json as pj

    with pa.input_stream(str(path), compression="detect") as stream:
        head = b""
        while not head.lstrip() and (block := stream.read(1 << 16)):
            head += block
    text_start = head.lstrip()[:1]
    if not text_start:
        raise MoecacheError(f"{src}: empty file: no rows to import")
    if text_start == b"[":
        try:
            records = json.loads(_read_all(path))
        except json.JSONDecodeError as err:
            raise MoecacheError(f"{src}: not valid JSON: {err.msg} (line {err.lineno})") from None
        return _records_table(records, src, "element")
    try:  # streamed from the file: the log is never held whole as bytes
        with pa.input_stream(str(path), compression="detect") as stream:
            return pj.read_json(stream, read_options=pj.ReadOptions(block_size=1 << 24))
    except pa.ArrowInvalid:
        pass  # find the exact line, or accept logs whose column types pyarrow will not unify
    raw = _read_all(path)
    records = []
    for number, line in enumerate(raw.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise MoecacheError(f"{src}: line {number} is not valid JSON: {err.msg}") from None
    return _records_table(records, src, "line")


def _read_all(path: Path) -> bytes:
    with pa.input_stream(str(path), compression="detect") as stream:
        return stream.read()


def _records_table(records: Any, src: str, unit: str) -> pa.Table:
    if not isinstance(records, list):
        raise MoecacheError(f"{src}: expected a JSON array of row objects or JSON lines")
    for number, record in enumerate(records, 1):
        if not isinstance(record, dict):
            raise MoecacheError(f"{src}: {unit} {number} is not a JSON object")
    try:
        return pa.Table.from_pylist(records)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        raise MoecacheError(f"{src}: column types vary between rows: {first_line(err)}") from None


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
            raise MoecacheError(f"{src}: no token column: map token=COLUMN (the token's index) or "
                                f"pos=COLUMN (its position in the sequence); columns: {shown}")
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

    def null(self, name: str) -> np.ndarray:
        """The rows where field ``name`` is null (all rows when the field is not mapped)."""
        if name not in self.mapping:
            return np.ones(self.table.num_rows, bool)
        return np.asarray(self.table.column(self.mapping[name]).is_null().to_numpy(zero_copy_only=False),
                          dtype=bool)

    def ints(self, name: str, *, nulls: bool = False, rows: np.ndarray | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
        """(int64 values with 0 where null, null mask); nulls (in the ``rows`` mask, when
        given) are an error unless allowed."""
        arr = self.array(name)
        values, null = _int_array(arr, lambda why: f"{self.src}: column {self.label(name)} {why}")
        empty = null if rows is None else null & rows
        if empty.any() and not nulls:
            count = _n(int(empty.sum()), "row")
            raise MoecacheError(f"{self.src}: column {self.label(name)} is empty in {count} "
                                f"(first: row {int(np.argmax(empty)) + 1})")
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
        raise MoecacheError(fail(f"holds a value that is not a number: {first_line(err)}")) from None
    return np.asarray(values.to_numpy(zero_copy_only=False)), lengths, null


# -- row logs -> tokens -----------------------------------------------------------------

def _from_rows(table: pa.Table, src: str, mapping: dict[str, str], problems: _Problems, *,
               skip_warmup: int, order: str, token_restarts: str, step_mode: str | None,
               num_experts: int | None, declared: np.ndarray | None) -> _Tokens:
    """The tokens of a row log: its rows checked, grouped into tokens and ordered, stage by stage."""
    log = _RowLog(table, src, mapping, problems, token_restarts=token_restarts, step_mode=step_mode,
                  declared=declared)
    log.drop_warmup_rows()
    log.drop_other_layers()
    log.number_tokens(order)
    log.skip_first_tokens(skip_warmup)
    log.read_routing(num_experts)
    log.drop_uniform_tokens()
    log.drop_conflicts()
    log.drop_incomplete_tokens()
    return log.tokens(order)


class _RowLog:
    """A row log on its way to tokens; each method is one stage of :func:`_from_rows`.

    Arrays have one entry per row of the log: ``keep`` marks the rows still in, ``tid``
    numbers each row's token (-1: none) once :meth:`number_tokens` ran. Per-token arrays
    are indexed by those numbers; ``token_order`` lists them in trace order.
    """

    def __init__(self, table: pa.Table, src: str, mapping: dict[str, str], problems: _Problems, *,
                 token_restarts: str, step_mode: str | None, declared: np.ndarray | None) -> None:
        cols = _Columns(table, src, mapping)
        if step_mode in ("token", "prefill") and "step" in cols.mapping:
            cols.ignored.append(cols.mapping.pop("step"))    # steps are derived: the column is unused
        self.cols, self.src, self.problems, self.declared = cols, src, problems, declared
        self.num_rows = num_rows = table.num_rows
        self.inferred: dict[str, str] = {}
        self.row = np.arange(num_rows, dtype=np.int64)
        self.token_field = "token" if "token" in cols.mapping else "pos"
        if self.token_field == "pos":
            self.inferred["token"] = f"tokens told apart by (seq, pos), from column {cols.mapping['pos']!r}"
        # rows that are not routing rows (a header line, a profile record): skipped, counted
        self.routing = _routing_rows(cols, self.token_field, problems)
        self.layer, _ = cols.ints("layer", rows=self.routing)
        self.tok, _ = cols.ints(self.token_field, rows=self.routing)
        if "seq" in cols.mapping:
            self.seq, self.seq_null, self.seq_labels, self.seq_shown = _seq_column(cols)
        else:
            self.seq, self.seq_null = np.zeros(num_rows, np.int64), np.zeros(num_rows, bool)
            self.seq_labels, self.seq_shown = None, None
            self.inferred["seq"] = "one sequence (0) for every token"
        self.batched = token_restarts == "batch"
        self.batch = np.zeros(num_rows, np.int64)
        self.per_token: dict[str, np.ndarray] = {}   # per-row values that must agree within a token

    def tok_desc(self, r: int) -> str:
        """Row ``r``'s token for messages: ``token 5 (seq 'a', batch 1)``."""
        where = (([f"seq {self.seq_shown(r)}"] if self.seq_shown else [])
                 + ([f"batch {self.batch[r]}"] if self.batched else []))
        return f"token {self.tok[r]}" + (f" ({', '.join(where)})" if where else "")

    def of_tokens(self, mask: np.ndarray) -> np.ndarray:
        """Rows (as a mask) whose token is flagged in the per-token ``mask``."""
        return (self.tid >= 0) & mask[np.maximum(self.tid, 0)]

    def drop_warmup_rows(self) -> None:
        """Warm-up rows: no request (null or negative seq) or a negative token index."""
        warm = self.routing & (self.seq_null | (self.seq < 0) | (self.tok < 0))
        if warm.any():
            at = int(np.argmax(warm))
            self.problems.found("warmup", f"{_n(int(warm.sum()), 'warm-up row')} without a real request "
                                f"(null or negative seq, or negative token; first: row {at + 1}, "
                                f"{self.tok_desc(at)})", rows=int(warm.sum()), tokens=None)
        self.keep = self.routing & ~warm
        if not self.keep.any():
            raise MoecacheError(f"{self.src}: every routing row is a warm-up row: nothing left to import")

    def drop_other_layers(self) -> None:
        """Rows of layers outside ``--layers``; then the forward batches of the rows left."""
        layer, keep = self.layer, self.keep
        if self.declared is not None:
            other = keep & ~np.isin(layer, self.declared)
            if other.any():
                at = int(np.argmax(other))
                logged = np.unique(layer[other])
                shown = ", ".join(map(str, logged[:10].tolist())) + (", ..." if len(logged) > 10 else "")
                self.problems.found("other_layers", f"{_n(int(other.sum()), 'row')} of layers outside "
                                    f"--layers (layers {shown}; first: row {at + 1}, {self.tok_desc(at)}, "
                                    f"layer {layer[at]})", rows=int(other.sum()), tokens=None)
                keep &= ~other
                if not keep.any():
                    raise MoecacheError(f"{self.src}: no row belongs to the layers given with --layers")
        restarts, self.went_back = _batches(self.seq, layer, self.tok, keep)
        if self.batched:
            self.batch = restarts

    def number_tokens(self, order: str) -> None:
        """Tokens = distinct (seq, batch, token) keys, numbered, and their trace order."""
        seq, batch, tok, row, cols = self.seq, self.batch, self.tok, self.row, self.cols
        idx = np.flatnonzero(self.keep)
        by_key = idx[np.lexsort((row[idx], tok[idx], batch[idx], seq[idx]))]
        new = np.ones(len(by_key), bool)
        new[1:] = ((seq[by_key][1:] != seq[by_key][:-1]) | (batch[by_key][1:] != batch[by_key][:-1])
                   | (tok[by_key][1:] != tok[by_key][:-1]))
        self.tid = tid = np.full(self.num_rows, -1, np.int64)
        tid[by_key] = np.cumsum(new) - 1
        self.first_row = first_row = by_key[new]          # each key's rows are sorted by row number
        self.num_tokens = num_tokens = len(first_row)
        keys: tuple[np.ndarray, ...] = (first_row,)
        if order != "file":
            keys += (tok[first_row], batch[first_row])
        if order == "sequence":
            _, seq_of = np.unique(seq[first_row], return_inverse=True)
            seq_first = np.full(seq_of.max() + 1, self.num_rows, np.int64)
            np.minimum.at(seq_first, seq_of, first_row)
            keys += (seq_first[seq_of],)
        if "time" in cols.mapping:
            keys += (_per_token_min(_time_column(cols, self.keep), tid, idx, num_tokens),)
        if "step" in cols.mapping:
            self.per_token["step"] = cols.ints("step", rows=self.keep)[0]
            keys += (_per_token_min(self.per_token["step"], tid, idx, num_tokens),)
        self.token_order = np.lexsort(keys)
        self.rank = np.empty(num_tokens, np.int64)
        self.rank[self.token_order] = np.arange(num_tokens)

    def skip_first_tokens(self, count: int) -> None:
        """Explicit warm-up (``skip_warmup``): the first ``count`` tokens in trace order."""
        if not count:
            return
        if count >= self.num_tokens:
            raise MoecacheError(f"{self.src}: --skip-warmup {count} drops all {self.num_tokens} tokens")
        skipped = self.keep & self.of_tokens(self.rank < count)
        self.problems.drop("skip_warmup", rows=int(skipped.sum()), tokens=count)
        self.keep &= ~skipped

    def read_routing(self, num_experts: int | None) -> None:
        """Experts, weights and the per-token columns of the rows left: malformed data is
        always an error."""
        cols, keep = self.cols, self.keep
        idx = np.flatnonzero(keep)
        experts = _row_experts(cols, idx, self.src)
        self.top_k = top_k = experts.shape[1]
        _check_ids(experts, num_experts, self.src, lambda i: f"row {idx[i] + 1}")
        self.weights = _row_weights(cols, idx, top_k, self.src) if "weights" in cols.mapping else None
        if "pos" in cols.mapping:
            self.per_token["pos"] = self.tok if self.token_field == "pos" else cols.ints("pos", rows=keep)[0]
        if "phase" in cols.mapping:
            self.per_token["phase"] = _phase_column(cols, keep)
        if "token_id" in cols.mapping:
            values, null = cols.ints("token_id", nulls=True)
            self.per_token["token_id"] = np.where(null, -1, values)
        self.all_experts = np.zeros((self.num_rows, top_k), np.int64)
        self.all_experts[idx] = experts
        self.all_weights = None
        if self.weights is not None and not np.isnan(self.weights).all():
            self.all_weights = np.full((self.num_rows, top_k), np.nan, np.float32)
            self.all_weights[idx] = self.weights

    def drop_uniform_tokens(self) -> None:
        """Warm-up tokens: weights exactly 1/K in every layer. Only those rows go, so a real
        token logged under the same key keeps its rows (before duplicates are resolved)."""
        if self.all_weights is None:
            return
        idx, layer, tid = np.flatnonzero(self.keep), self.layer, self.tid
        layers = np.unique(layer[idx]) if self.declared is None else np.unique(self.declared)
        uniform = np.zeros(self.num_rows, bool)
        uniform[idx] = _uniform_rows(self.weights)
        if not uniform.any():
            return
        at = np.flatnonzero(uniform)
        pairs = np.unique(tid[at] * len(layers) + np.searchsorted(layers, layer[at]))
        full = np.bincount(pairs // len(layers), minlength=self.num_tokens) == len(layers)
        if full.any():
            dropped = uniform & self.of_tokens(full)
            first = int(self.first_row[self.token_order[full[self.token_order]][0]])
            _uniform_found(self.problems, int(full.sum()), self.top_k,
                           f"row {first + 1}, {self.tok_desc(first)}", f"column {self.cols.label('weights')}",
                           rows=int(dropped.sum()),
                           nothing_left=not (self.keep & ~dropped).any())
            self.keep &= ~dropped

    def drop_conflicts(self) -> None:
        """Tokens whose rows disagree on a per-token column, and duplicate (token, layer) rows:
        identical copies go, conflicting ones take their token with them."""
        idx, layer, tid, row = np.flatnonzero(self.keep), self.layer, self.tid, self.row
        bad_token = np.zeros(self.num_tokens, bool)
        by_token = idx[np.lexsort((row[idx], layer[idx], tid[idx]))]
        same_token = tid[by_token][1:] == tid[by_token][:-1]
        for name, values in self.per_token.items():
            differ = same_token & (values[by_token][1:] != values[by_token][:-1])
            if differ.any():
                at = int(np.argmax(differ))
                a, b = by_token[at], by_token[at + 1]
                flagged = np.zeros(self.num_tokens, bool)
                flagged[tid[by_token][1:][differ]] = True
                flagged &= ~bad_token
                message = (f"{_n(int(flagged.sum()), 'token')} whose rows disagree on {name} (first: "
                           f"{self.tok_desc(a)}: rows {a + 1} and {b + 1} say {values[a]} and {values[b]})")
                rows = int((self.keep & self.of_tokens(flagged)).sum())
                self.problems.found("conflict", message, rows=rows, tokens=int(flagged.sum()))
                bad_token |= flagged
        dup = same_token & (layer[by_token][1:] == layer[by_token][:-1])
        if dup.any():
            bad_token |= self._drop_duplicates(by_token, dup, bad_token)
        self.keep &= ~self.of_tokens(bad_token)
        if not self.keep.any():
            raise MoecacheError(f"{self.src}: no tokens left after dropping problem rows")

    def _drop_duplicates(self, by_token: np.ndarray, dup: np.ndarray, bad_token: np.ndarray) -> np.ndarray:
        """Report the duplicate rows ``by_token[1:][dup]``, drop their identical copies; the
        tokens with conflicting copies."""
        all_experts, all_weights, layer, tid = self.all_experts, self.all_weights, self.layer, self.tid
        head_at = np.arange(len(by_token))
        head_at[1:][dup] = 0
        head_at = np.maximum.accumulate(head_at)   # position of each row's (token, layer) group head
        later = np.flatnonzero(dup) + 1
        head, copy = by_token[head_at[later]], by_token[later]
        same = (all_experts[head] == all_experts[copy]).all(axis=1)
        if all_weights is not None:
            wh, wc = all_weights[head], all_weights[copy]
            same &= ((wh == wc) | (np.isnan(wh) & np.isnan(wc))).all(axis=1)
        conflicting = np.zeros(self.num_tokens, bool)
        conflicting[tid[copy[~same]]] = True
        n_copies, n_conf = len(later), int((~same).sum())
        if n_conf:
            at = int(np.argmax(~same))
            a, b = head[at], copy[at]
            held = f"{all_experts[a].tolist()} and {all_experts[b].tolist()}"
            if all_experts[a].tolist() == all_experts[b].tolist():
                held += " with different weights"
            example = (f"first conflict: {self.tok_desc(a)}, layer {layer[a]}: rows {a + 1} and {b + 1} "
                       f"hold {held}")
            message = (f"{_n(n_copies, 'duplicate (token, layer) row')}: {n_copies - n_conf} identical, "
                       f"{n_conf} conflicting in {_n(int(conflicting.sum()), 'token')} ({example})")
        else:
            a, b = head[0], copy[0]
            example = f"first: {self.tok_desc(a)}, layer {layer[a]}: rows {a + 1} and {b + 1}"
            message = f"{_n(n_copies, 'duplicate (token, layer) row')}, all identical copies ({example})"
        if self.went_back >= 0 and not self.batched:
            message += (f"; the token index goes back within a request at row {self.went_back + 1}: if it "
                        "restarts at every forward batch, pass --token-restarts batch")
        problems = self.problems
        problems.check("duplicate", message)
        extra = copy[same & ~self.of_tokens(conflicting | bad_token)[copy]]
        fresh = conflicting & ~bad_token
        conf_rows = int((self.keep & self.of_tokens(fresh)).sum())
        if len(extra):
            problems.drop("duplicate", rows=len(extra), tokens=None)
        if fresh.any():
            problems.drop("conflict", rows=conf_rows, tokens=int(fresh.sum()))
        problems.lines.append(
            f"{message}: dropped {len(extra)} identical {'copy' if len(extra) == 1 else 'copies'}"
            + (f" and {_n(int(fresh.sum()), 'conflicting token')} ({_n(conf_rows, 'row')})"
               if fresh.any() else ""))
        self.keep[extra] = False
        return conflicting

    def drop_incomplete_tokens(self) -> None:
        """Tokens missing some MoE layer (each (token, layer) now has one row)."""
        idx, layer, tid, declared = np.flatnonzero(self.keep), self.layer, self.tid, self.declared
        self.layers = layers = np.unique(layer[idx]) if declared is None else np.unique(declared)
        count = np.bincount(tid[idx], minlength=self.num_tokens)
        short = (count > 0) & (count < len(layers))
        if not short.any():
            return
        first = int(self.token_order[short[self.token_order]][0])
        lacks = np.setdiff1d(layers, layer[idx[tid[idx] == first]]).tolist()
        per_layer = np.bincount(np.searchsorted(layers, layer[idx]), minlength=len(layers))
        rare = int(np.argmin(per_layer))
        num_short, num_present = int(short.sum()), int((count > 0).sum())
        message = (f"{num_short} of {_n(num_present, 'token')} lack rows for some of the "
                   f"{len(layers)} MoE layers (first: {self.tok_desc(int(self.first_row[first]))} has no row "
                   f"for layer {', '.join(map(str, lacks))}; layer {layers[rare]} is logged for "
                   f"{_n(int(per_layer[rare]), 'token')})")
        if declared is None and self.problems.on_problem == "drop" and 2 * num_short > num_present:
            raise MoecacheError(f"{self.src}: {message}; not dropping: that would discard most tokens "
                                "(name the MoE layers with --layers to drop them anyway)")
        if declared is None and 2 * per_layer[rare] < num_present:
            message += f"; if layer {layers[rare]} is no MoE layer, name the MoE layers with --layers"
        self.problems.found("missing_layers", message, rows=int(count[short].sum()), tokens=num_short)
        self.keep &= ~self.of_tokens(short)
        if not self.keep.any():
            raise MoecacheError(f"{self.src}: no tokens left after dropping problem rows")

    def tokens(self, order: str) -> _Tokens:
        """The rows left as dense (tokens, layers, K) arrays in trace order."""
        idx, tid, layers, cols = np.flatnonzero(self.keep), self.tid, self.layers, self.cols
        inferred = self.inferred
        present = np.bincount(tid[idx], minlength=self.num_tokens) > 0
        kept_tokens = self.token_order[present[self.token_order]]
        new_index = np.full(self.num_tokens, -1, np.int64)
        new_index[kept_tokens] = np.arange(len(kept_tokens))
        t_at, l_at = new_index[tid[idx]], np.searchsorted(layers, self.layer[idx])
        n = len(kept_tokens)
        dense = np.zeros((n, len(layers), self.top_k), np.int64)
        dense[t_at, l_at] = self.all_experts[idx]
        dense_weights = None
        if self.all_weights is not None:
            dense_weights = np.zeros((n, len(layers), self.top_k), np.float32)
            dense_weights[t_at, l_at] = self.all_weights[idx]
        _, first_at = np.unique(t_at, return_index=True)
        head_row = idx[first_at]                    # first kept row of each token, in trace order
        if "pos" not in cols.mapping:
            inferred["pos"] = "index within its sequence in trace order"
        tok_seq, seq_labels = self.seq[head_row], self.seq_labels
        if seq_labels is not None:                  # renumber 0, 1, ... in trace order
            codes, first_at = np.unique(tok_seq, return_index=True)
            by_first = codes[np.argsort(first_at)]
            renumber = np.zeros(int(codes.max()) + 1, np.int64)
            renumber[by_first] = np.arange(len(by_first))
            tok_seq, seq_labels = renumber[tok_seq], [seq_labels[c] for c in by_first]
            inferred["seq"] = (f"request ids of column {cols.mapping['seq']!r} numbered 0, 1, ... "
                               "in trace order")
        index = "token index" if self.token_field == "token" else "position"
        by = f"batch (in file order), then {index}" if self.batched else index
        phrase = {"sequence": f"sequences one after another in order of first appearance, tokens by {by}",
                  "token": f"tokens by {by} across all sequences",
                  "file": "tokens in order of first appearance in the file"}[order]
        if "time" in cols.mapping:
            phrase = f"tokens in order of the time column (ties: {phrase})"
        return _Tokens(
            experts=dense, layers=[int(v) for v in layers], rows_read=self.num_rows, order=order,
            order_phrase=phrase, weights=dense_weights, seq=tok_seq, seq_labels=seq_labels,
            first_row=head_row,
            mapping=dict(cols.mapping), ignored_columns=list(cols.ignored), inferred=inferred,
            **{name: values[head_row] for name, values in self.per_token.items()})


def _routing_rows(cols: _Columns, token_field: str, problems: _Problems) -> np.ndarray:
    """Rows that hold routing data; the others are skipped and counted.

    Not routing data: rows without experts, layer and token (a ``{"type": "meta"}`` header
    line), and, when the log has an unmapped ``type`` column, rows whose type no row with
    experts has (a profile record that logs a layer but no experts).
    """
    table = cols.table
    has_experts = ~cols.null("experts")
    other = ~has_experts & cols.null("layer") & cols.null(token_field)
    kinds = None
    if "type" in table.column_names and "type" not in cols.mapping.values():
        kinds = table.column("type").combine_chunks()
        if pa.types.is_dictionary(kinds.type):
            kinds = kinds.dictionary_decode()
        routing_kinds = pc.unique(kinds.filter(pa.array(has_experts)))
        member = pc.is_in(kinds, value_set=routing_kinds.drop_null()).fill_null(False)
        member = np.asarray(member.to_numpy(zero_copy_only=False), dtype=bool)
        if routing_kinds.null_count:
            member |= np.asarray(kinds.is_null().to_numpy(zero_copy_only=False), dtype=bool)
        other |= ~member
    if other.all():
        raise MoecacheError(f"{cols.src}: no routing rows (no row holds experts, a layer and a token)")
    if other.any():
        at = int(np.argmax(other))
        what = (f"type {kinds[at].as_py()!r}" if kinds is not None and kinds[at].is_valid
                else "no experts, layer or token")
        problems.skip("non_routing", f"{_n(int(other.sum()), 'row')} without routing data "
                      f"(first: row {at + 1}, {what})", int(other.sum()))
    return ~other


def _batches(seq: np.ndarray, layer: np.ndarray, tok: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, int]:
    """The forward batch of each row for token indices that restart per batch, and the
    first row (-1: none) where a request's token index goes back.

    Per (seq, layer), in file order, a new batch begins at a row whose token index is not
    larger than the previous row's (a decode batch of one token restarts at the same index).
    """
    idx = np.flatnonzero(keep)
    ordered = idx[np.lexsort((idx, layer[idx], seq[idx]))]
    s, t = seq[ordered], tok[ordered]
    same = (s[1:] == s[:-1]) & (layer[ordered][1:] == layer[ordered][:-1])
    count = np.concatenate(([0], np.cumsum(same & (t[1:] <= t[:-1]))))
    start = np.concatenate(([True], ~same))
    batch = np.zeros(len(seq), np.int64)
    batch[ordered] = count - np.maximum.accumulate(np.where(start, count, 0))
    back = same & (t[1:] < t[:-1])
    return batch, int(ordered[1:][back].min()) if back.any() else -1


def _per_token_min(values: np.ndarray, tid: np.ndarray, idx: np.ndarray, num_tokens: int) -> np.ndarray:
    """The smallest of the rows ``idx``'s values for each token."""
    out = np.full(num_tokens, np.inf if values.dtype.kind == "f" else np.iinfo(np.int64).max, values.dtype)
    np.minimum.at(out, tid[idx], values[idx])
    return out


def _time_column(cols: _Columns, rows: np.ndarray) -> np.ndarray:
    """Timestamps per row as int64 (integers, timestamps) or float64; nulls in ``rows`` are an error."""
    arr = cols.array("time")
    label = cols.label("time")
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        text = arr
        for zone in (None, "UTC"):          # times without, then with a zone offset
            try:
                arr = text.cast(pa.timestamp("ns", tz=zone))
                break
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
                failed = err
        else:
            raise MoecacheError(f"{cols.src}: column {label} holds text that is no ISO 8601 timestamp "
                                f"(all with or all without a zone offset): {first_line(failed)}")
    if pa.types.is_timestamp(arr.type) or pa.types.is_date(arr.type):
        arr = arr.cast(pa.timestamp("ns")).cast(pa.int64())
    if pa.types.is_floating(arr.type):
        values = np.asarray(arr.to_numpy(zero_copy_only=False), np.float64)
        null = np.isnan(values)
    elif pa.types.is_integer(arr.type):
        values = np.asarray(arr.fill_null(0).to_numpy(zero_copy_only=False), np.int64)
        null = np.asarray(arr.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    else:
        raise MoecacheError(f"{cols.src}: column {label} must hold numbers or timestamps, got {arr.type}")
    if (null & rows).any():
        at = int(np.argmax(null & rows))
        raise MoecacheError(f"{cols.src}: column {label} is empty in {_n(int((null & rows).sum()), 'row')} "
                            f"(first: row {at + 1})")
    return values


def _uniform_found(problems: _Problems, count: int, top_k: int, first: str, column: str, *,
                   rows: int, nothing_left: bool) -> None:
    """Report ``count`` tokens with weights exactly 1/K in every layer (an error when
    dropping them would leave ``nothing_left``)."""
    uniform = f"weights exactly 1/K = {1 / top_k:g} in every layer"
    if nothing_left:
        raise MoecacheError(f"{problems.source}: every token has {uniform}: {column} holds no gate weights "
                            "(leave it out) or the log holds only warm-up rows")
    problems.found("warmup_uniform", f"{_n(count, 'warm-up token')} with {uniform} (first: {first})",
                   rows=rows, tokens=count)


def _uniform_rows(weights: np.ndarray) -> np.ndarray:
    """Rows of a (rows, K) weight array that are exactly 1/K each (never for K = 1)."""
    top_k = weights.shape[1]
    if top_k == 1:
        return np.zeros(len(weights), bool)
    return (weights == np.float32(1 / top_k)).all(axis=1)


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


def _phase_column(cols: _Columns, rows: np.ndarray) -> np.ndarray:
    """PREFILL/DECODE per row from strings, booleans ("is prefill") or 0/1 (checked in ``rows``)."""
    arr = cols.array("phase")
    label = cols.label("phase")
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        text = np.asarray(pc.utf8_lower(pc.utf8_trim_whitespace(arr)).fill_null("")
                          .to_numpy(zero_copy_only=False), dtype=object)
        bad = rows & (text != "prefill") & (text != "decode")
        if bad.any():
            at = int(np.argmax(bad))
            raise MoecacheError(f"{cols.src}: column {label} holds {text[at] or 'nothing'!r} at row "
                                f"{at + 1}; expected prefill or decode")
        return np.where(text == "prefill", PREFILL, DECODE).astype(np.int8)
    values, _ = cols.ints("phase", rows=rows)
    if pa.types.is_boolean(arr.type):
        return np.where(values == 1, PREFILL, DECODE).astype(np.int8)
    bad = rows & (values != PREFILL) & (values != DECODE)
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

def _load_arrays(path: Path, fmt: str, src: str) -> dict[str, np.ndarray]:
    """The arrays of an ``.npy`` (as ``experts``) or ``.npz`` file."""
    try:
        loaded = np.load(path, allow_pickle=False)
    except ValueError as err:
        message = "holds Python objects (pickled arrays are not read)" if "pickle" in str(err) else (
            f"not a readable {fmt} file: {first_line(err)}")
        raise MoecacheError(f"{src}: {message}") from None
    except (OSError, EOFError) as err:
        raise MoecacheError(f"{src}: not a readable {fmt} file: {first_line(err)}") from None
    if fmt == "npy":
        if not isinstance(loaded, np.ndarray):
            raise MoecacheError(f"{src}: not an .npy array")
        return {"experts": loaded}
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise MoecacheError(f"{src}: not an .npz archive")
    with loaded:
        try:
            return {key: loaded[key] for key in loaded.files}
        except ValueError as err:
            raise MoecacheError(f"{src}: holds Python objects or is damaged: {first_line(err)}") from None


def _from_arrays(arrays: Mapping[str, np.ndarray], src: str, problems: _Problems, *, name: str,
                 skip_warmup: int, num_experts: int | None, declared: np.ndarray | None) -> _Tokens:
    """Validate and convert the arrays of an ``.npy``/``.npz`` file or a log format reader;
    ``name`` is how messages call the expert ids."""
    unknown = sorted(set(arrays) - set(ARRAY_KEYS))
    if unknown:
        raise MoecacheError(f"{src}: unknown array {unknown[0]!r} (accepted: {', '.join(ARRAY_KEYS)})")
    if "experts" not in arrays:
        present = ", ".join(arrays) or "none"
        raise MoecacheError(f"{src}: no 'experts' array (arrays: {present})")
    arrays = {key: np.asarray(value) for key, value in arrays.items()}
    experts = arrays["experts"]
    if experts.ndim != 3:
        hint = f"; for K = 1 reshape to {(*experts.shape, 1)}" if experts.ndim == 2 else ""
        raise MoecacheError(f"{src}: {name} must have shape (tokens, layers, K), got {experts.shape}{hint}")
    if not np.issubdtype(experts.dtype, np.integer):
        raise MoecacheError(f"{src}: expert ids must be integers, {name} has dtype {experts.dtype}")
    n, num_layers, top_k = experts.shape
    if n == 0 or num_layers == 0 or top_k == 0:
        raise MoecacheError(f"{src}: {name} is empty (shape {experts.shape})")
    experts = experts.astype(np.int64)
    inferred = {}
    recorded = arrays.get("num_experts")
    if recorded is not None:
        if recorded.shape != () or not np.issubdtype(recorded.dtype, np.integer) or recorded < 1:
            raise MoecacheError(f"{src}: 'num_experts' must be one positive integer, got {recorded!r}")
        recorded = int(recorded)
        if num_experts is not None and num_experts != recorded:
            raise MoecacheError(f"{src}: the log records num_experts = {recorded}, "
                                f"but --num-experts is {num_experts}")
    known = num_experts if num_experts is not None else recorded
    weights = arrays.get("weights")
    if weights is not None:
        if weights.shape != experts.shape:
            raise MoecacheError(f"{src}: 'weights' has shape {weights.shape}, 'experts' {experts.shape}")
        if not (np.issubdtype(weights.dtype, np.floating) or np.issubdtype(weights.dtype, np.integer)):
            raise MoecacheError(f"{src}: 'weights' must be numbers, got dtype {weights.dtype}")
        weights = weights.astype(np.float32)
    logits = arrays.get("logits")
    if logits is not None:
        if logits.ndim != 3 or logits.shape[:2] != (n, num_layers) or not logits.shape[2]:
            raise MoecacheError(f"{src}: 'logits' must have shape ({n}, {num_layers}, E), got {logits.shape}")
        if not np.issubdtype(logits.dtype, np.floating):
            raise MoecacheError(f"{src}: 'logits' must be floats, got dtype {logits.dtype}")
        if known is not None and logits.shape[2] != known:
            raise MoecacheError(f"{src}: 'logits' hold {logits.shape[2]} router scores per row, "
                                f"but num_experts is {known}")
        if known is None:
            known = logits.shape[2]
            inferred["num_experts"] = f"{known}, the number of router scores per row in 'logits'"
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
        logits = None if logits is None else logits[:, by_layer]
    else:
        inferred["layers"] = f"0..{num_layers - 1} (no 'layers' array and no --layers)"
    tokens = _Tokens(experts=experts, layers=layers, rows_read=n * num_layers, order="file",
                     order_phrase="tokens in the order of the array's token axis", weights=weights,
                     logits=logits, num_experts=known, inferred=inferred, **per_token)
    keep = np.ones(n, bool)
    if "seq" in per_token and (per_token["seq"] < 0).any():
        warm = per_token["seq"] < 0
        at = int(np.argmax(warm))
        problems.found("warmup", f"{_n(int(warm.sum()), 'warm-up token')} with a negative seq "
                       f"(first: token {at}, seq {per_token['seq'][at]})",
                       rows=int(warm.sum()) * num_layers, tokens=None)
        keep &= ~warm
    if weights is not None:
        uniform = keep & _uniform_rows(weights.reshape(-1, top_k)).reshape(n, num_layers).all(axis=1)
        if uniform.any():
            first = f"token {int(np.argmax(uniform))}"
            _uniform_found(problems, int(uniform.sum()), top_k, first, "'weights'",
                           rows=int(uniform.sum()) * num_layers, nothing_left=uniform.sum() == keep.sum())
            keep &= ~uniform
    if skip_warmup:
        kept = np.flatnonzero(keep)
        if skip_warmup >= len(kept):
            raise MoecacheError(f"{src}: --skip-warmup {skip_warmup} drops all {len(kept)} tokens")
        keep[kept[:skip_warmup]] = False
        problems.drop("skip_warmup", rows=skip_warmup * num_layers, tokens=skip_warmup)
    if not keep.any():
        raise MoecacheError(f"{src}: every token is a warm-up token: nothing left to import")
    tokens = tokens.subset(keep)
    kept_index = np.flatnonzero(keep)
    _check_ids(tokens.experts.reshape(-1, top_k), known, src,
               lambda i: f"token {kept_index[i // num_layers]}, layer {layers[i % num_layers]}")
    step = tokens.step
    if step is not None and (np.diff(step) < 0).any():
        at = int(np.argmax(np.diff(step) < 0)) + 1
        raise MoecacheError(f"{src}: 'step' must not decrease (token {kept_index[at]} has step "
                            f"{step[at]} after {step[at - 1]})")
    if "seq" not in per_token:
        inferred["seq"] = "one sequence (0) for every token"
    inferred["pos"] = "index within its sequence in trace order"
    return tokens


# -- warm-up runs (both paths) ----------------------------------------------------------

def _drop_repeated_runs(tokens: _Tokens, src: str, problems: _Problems) -> _Tokens:
    """Report (or drop) runs of :data:`REPEAT_RUN` or more consecutive tokens of one
    sequence routed identically in every layer, with identical weights when logged."""
    experts = tokens.experts
    if len(experts) < REPEAT_RUN:
        return tokens
    same = (experts[1:] == experts[:-1]).all(axis=(1, 2))
    if tokens.weights is not None:
        bits = tokens.weights.view(np.int32)
        same &= (bits[1:] == bits[:-1]).all(axis=(1, 2))
    if tokens.seq is not None:
        same &= tokens.seq[1:] == tokens.seq[:-1]
    run = np.cumsum(np.concatenate(([True], ~same))) - 1
    length = np.bincount(run)
    flagged = length[run] >= REPEAT_RUN
    if not flagged.any():
        return tokens
    at = int(np.argmax(flagged))
    where = f"token {at} of the trace" if tokens.first_row is None else f"row {tokens.first_row[at] + 1}"
    count = int(flagged.sum())
    problems.found("warmup_repeated", f"{_n(count, 'warm-up token')} in runs of {REPEAT_RUN} or more "
                   f"consecutive tokens of a sequence routed identically in every layer (first: {where}, "
                   f"a run of {length[run[at]]})", rows=count * experts.shape[1], tokens=count)
    if flagged.all():
        raise MoecacheError(f"{src}: every token is a warm-up token: nothing left to import")
    return tokens.subset(~flagged)


# -- tokens -> trace file ---------------------------------------------------------------

_STEPS_FORMED = {"column": "one per value of the step field, in step order",
                 "token": "one per token",
                 "prefill": "one per run of prefill tokens of a sequence and one per decode token"}


def _write(tokens: _Tokens, out: Path, src: str, fmt: str, digest: str, problems: _Problems, *,
           num_experts: int | None, model: str | None, router_label: str,
           expert_bytes: int | str | Sequence[int] | None, step_mode: str | None, skip_warmup: int,
           token_restarts: str, overwrite: bool) -> ImportReport:
    experts = tokens.experts
    n, num_layers, top_k = experts.shape
    inferred = dict(tokens.inferred)
    if num_experts is None:
        num_experts = tokens.num_experts
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
    formed = (f"steps: {_STEPS_FORMED[mode]}; within a step, {tokens.order_phrase}" if mode == "column"
              else f"steps: {_STEPS_FORMED[mode]}, {tokens.order_phrase}")
    sizes = _expert_sizes(expert_bytes, num_layers, src)
    dropped = {"rows": dict(problems.rows), "tokens": dict(problems.tokens)}
    capture: dict[str, Any] = {
        "mode": "import",
        "source": src,
        "sha256": digest,
        "format": fmt,
        "mapping": tokens.mapping or None,
        "order": tokens.order,
        "token_restarts": token_restarts,
        "step": mode,
        "steps_formed": formed,
        "skip_warmup": skip_warmup,
        "on_problem": problems.on_problem,
        "on_warmup": problems.on_warmup,
        "rows_read": tokens.rows_read,
        "skipped": dict(problems.skipped),
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
                                  phase=tokens.phase, token_id=tokens.token_id, logits=tokens.logits)
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
        num_experts=num_experts, sequences=len(np.unique(seq)), steps_formed=formed,
        mapping=dict(tokens.mapping), ignored_columns=list(tokens.ignored_columns), inferred=inferred,
        skipped_rows=dict(problems.skipped), dropped_rows=dict(problems.rows),
        dropped_tokens=dict(problems.tokens), problems=list(problems.lines))


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

