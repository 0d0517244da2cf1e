"""Trace format v2 (and v1, still read): its constants, its Arrow schema and its metadata
(traces/README.md).

Everything that defines the format lives here; :mod:`moecache.trace` (the in-memory
trace) and :mod:`moecache.trace_io` (Parquet reading and writing) both build on it, and
neither imports the other's internals.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from .errors import TraceError

FORMAT_VERSION = 2
"""The version writers write. v2 differs from v1 in one column only: ``experts`` holds each
row's K ids as K little-endian int16 in one fixed-size binary value (byte-stream-split
encoded on disk), which decodes 5x faster than v1's list of int16 (benchmarks/bench_scale.py)."""
READ_VERSIONS = (1, 2)
"""The versions readers accept."""
META_KEY = b"moecache"
"""Schema metadata key of the JSON metadata."""
PHASES = ("prefill", "decode")
PREFILL, DECODE = 0, 1
"""Codes of the phases in memory: indices into :data:`PHASES`."""
REQUIRED_COLUMNS = ("seq", "step", "token", "pos", "token_id", "phase", "layer", "experts")
"""Columns every trace file has, in file order; :data:`OPTIONAL_COLUMNS` may follow."""
OPTIONAL_COLUMNS = ("weights", "logits", "lookahead", "lookahead_weights")
"""Optional columns, in file order. ``lookahead``: the experts the next MoE layer's router
picks from this layer's router input (-1 in the last MoE layer: no next layer)."""
NO_NEXT_LAYER = -1
"""``lookahead`` id of the last MoE layer."""
PARQUET_MAGIC = b"PAR1"
"""First and last four bytes of a complete Parquet file."""
MAX_EXPERTS = 2**15  # ids are int16
MAX_BYTES = 2**63 - 1  # sizes are summed as int64
PHASE_TYPE = pa.dictionary(pa.int8(), pa.string())


def experts_type(top_k: int, version: int = FORMAT_VERSION) -> pa.DataType:
    """Arrow type of the ``experts`` column: v2 ``fixed_size_binary(2K)`` (K little-endian
    int16), v1 ``fixed_size_list<int16>[K]``."""
    return pa.binary(2 * top_k) if version >= 2 else pa.list_(pa.int16(), top_k)


def ids_column(ids: np.ndarray, version: int = FORMAT_VERSION) -> pa.Array:
    """Rows of expert ids (rows, K) as an ``experts`` column of format ``version``."""
    ids = np.asarray(ids)
    rows, top_k = ids.shape
    if version >= 2:
        data = np.ascontiguousarray(ids, dtype="<i2")
        return pa.FixedSizeBinaryArray.from_buffers(experts_type(top_k), rows, [None, pa.py_buffer(data)])
    return pa.FixedSizeListArray.from_arrays(pa.array(ids.astype(np.int16).reshape(-1)), top_k)


def binary_ids(column: pa.Array) -> np.ndarray:
    """The ids of a v2 ``experts`` column (``fixed_size_binary(2K)``, no nulls), flat int16:
    a view of its buffer (a copy on a big-endian machine)."""
    width = column.type.byte_width
    ids = np.frombuffer(column.buffers()[1], "<i2", count=len(column) * width // 2,
                        offset=column.offset * width)
    return ids.astype(np.int16, copy=False)


def with_id_lists(table: pa.Table) -> pa.Table:
    """A table read from a moecache trace of format v2 with its ``experts`` as v1's lists of
    int16 (nulls kept), for readers that take any row log; other tables as they are."""
    kind = table.schema.field("experts").type if "experts" in table.column_names else None
    if (META_KEY not in (table.schema.metadata or {}) or kind is None
            or not pa.types.is_fixed_size_binary(kind) or kind.byte_width % 2):
        return table
    column = table["experts"].combine_chunks()
    lists = pa.FixedSizeListArray.from_arrays(pa.array(binary_ids(column)), kind.byte_width // 2,
                                              mask=column.is_null())
    return table.set_column(table.column_names.index("experts"), "experts", lists)


def schema(meta: dict[str, Any], *, with_weights: bool, with_logits: bool, with_lookahead: bool = False,
           with_lookahead_weights: bool = False) -> pa.Schema:
    """Arrow schema of the trace format of ``meta["format_version"]`` for the given metadata."""
    fields = [
        pa.field("seq", pa.int32(), nullable=False),
        pa.field("step", pa.int64(), nullable=False),
        pa.field("token", pa.int64(), nullable=False),
        pa.field("pos", pa.int32(), nullable=False),
        pa.field("token_id", pa.int32()),
        pa.field("phase", PHASE_TYPE, nullable=False),
        pa.field("layer", pa.int16(), nullable=False),
        pa.field("experts", experts_type(int(meta["top_k"]), int(meta["format_version"])), nullable=False),
    ]
    if with_weights:
        fields.append(pa.field("weights", pa.list_(pa.float32(), int(meta["top_k"]))))
    if with_logits:
        fields.append(pa.field("logits", pa.list_(pa.float16(), int(meta["num_experts"]))))
    if with_lookahead:
        fields.append(pa.field("lookahead", pa.list_(pa.int16(), int(meta["top_k"]))))
    if with_lookahead_weights:
        fields.append(pa.field("lookahead_weights", pa.list_(pa.float32(), int(meta["top_k"]))))
    return pa.schema(fields, metadata={META_KEY: meta_json(meta)})


# -- metadata ----------------------------------------------------------------------------

def build_meta(
    num_experts: int,
    top_k: int,
    layers: Sequence[int],
    expert_bytes: int | Sequence[int] | None = None,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Complete trace metadata: the given ``meta`` over defaults for every format key."""
    layers = [int(x) for x in layers]
    if isinstance(expert_bytes, (int, np.integer)):
        expert_bytes = [int(expert_bytes)] * len(layers)
    full: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "model": {"name": None, "revision": None, "architecture": None},
        "num_layers": (max(layers) + 1) if layers else 0,
        "moe_layers": layers,
        "num_experts": int(num_experts),
        "top_k": int(top_k),
        "num_shared_experts": 0,
        "expert_bytes": None if expert_bytes is None else [int(b) for b in expert_bytes],
        "dtype": None,
        "router": None,
        "capture": None,
        "partial": False,
    }
    full.update(meta or {})
    full["format_version"] = FORMAT_VERSION
    return full


def meta_json(meta: dict[str, Any]) -> bytes:
    """The metadata as stored under :data:`META_KEY`."""
    return json.dumps(meta, sort_keys=True).encode()


def now_iso() -> str:
    """UTC timestamp for capture metadata."""
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def _is_int(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _ints(low: int, high: int) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, list) and all(_is_int(v, low, high) for v in value)


def _optional(valid: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or valid(value)


def _of(kind: type) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, kind)


# metadata key -> (test of its value, what it must be); keys a trace may omit are optional
_META_TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "num_experts": (lambda v: _is_int(v, 1, MAX_EXPERTS), f"an integer from 1 to {MAX_EXPERTS}"),
    "top_k": (lambda v: _is_int(v, 1, MAX_EXPERTS), f"an integer from 1 to {MAX_EXPERTS}"),
    "moe_layers": (lambda v: _ints(0, 2**15 - 1)(v) and len(v) > 0,
                   "a non-empty list of layer indices (integers from 0 to 32767)"),
    "expert_bytes": (_optional(_ints(1, MAX_BYTES)), "null or a list of positive integers below 2**63"),
    "partial": (_of(bool), "true or false"),
    "num_layers": (_optional(lambda v: _is_int(v, 0, MAX_BYTES)), "null or a non-negative integer"),
    "num_shared_experts": (_optional(lambda v: _is_int(v, 0, MAX_BYTES)), "null or a non-negative integer"),
    "model": (_optional(_of(dict)), "null or a JSON object"),
    "capture": (_optional(_of(dict)), "null or a JSON object"),
    "router": (_optional(_of(str)), "null or a string"),
    "dtype": (_optional(_of(str)), "null or a string"),
}
_REQUIRED_META = ("num_experts", "top_k", "moe_layers")


def check_meta(meta: Any, source: str) -> None:
    """Raise TraceError naming ``source`` and the key if the metadata has a wrong type."""
    if not isinstance(meta, dict):
        raise TraceError(f"{source}: 'moecache' metadata must be a JSON object, got {type(meta).__name__}")
    for key in _REQUIRED_META:
        if key not in meta:
            raise TraceError(f"{source}: metadata lacks '{key}'")
    for key, (valid, wanted) in _META_TYPES.items():
        if key in meta and not valid(meta[key]):
            shown = json.dumps(meta[key], default=repr)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise TraceError(f"{source}: metadata '{key}' must be {wanted}, got {shown}")
