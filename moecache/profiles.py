"""Hardware and model profiles for the decode-time simulator.

Shipped profiles live in ``moecache/data/profiles.toml`` (every figure with its source,
see docs/profiles.md); :func:`hardware` and :func:`model` also read a user's TOML file
in the same schema. Sizes, bandwidths and durations in the files are human strings
parsed by :mod:`moecache.units` ("16GiB", "7GB/s", "80us"); FLOP/s are a number or a
string such as "15TFLOPS". Any problem in a file is one :class:`MoecacheError` line
naming the file and the offending key.
"""

from __future__ import annotations

import functools
import math
import numbers
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import MoecacheError
from .units import (
    BANDWIDTH_PRESETS,
    INT64_MAX,
    _split,
    format_bytes,
    parse_bandwidth,
    parse_bytes,
    parse_duration,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

_FLOAT_BYTES = {"f32": 4, "f16": 2, "bf16": 2}
# (weights per block, bytes per block) of ggml's block formats (ggml/src/ggml-common.h).
_BLOCKS = {
    "q8_0": (32, 34), "q6_k": (256, 210), "q5_k": (256, 176), "q5_1": (32, 24), "q5_0": (32, 22),
    "q4_k": (256, 144), "q4_1": (32, 20), "q4_0": (32, 18), "q3_k": (256, 110), "q2_k": (256, 84),
    "mxfp4": (32, 17),
}
# llama.cpp's type for a tensor whose rows do not split into the target's blocks
# (tensor_type_fallback in src/llama-quant.cpp); F16 when the fallback does not fit either.
_FALLBACK = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}
DTYPES: tuple[str, ...] = (*_FLOAT_BYTES, *_BLOCKS)
_BIAS_BYTES_QUANTIZED = 4  # GGUF keeps bias tensors unquantized (f32)
_FLOPS_UNITS = {"": 1.0, "flops": 1.0, "kflops": 1e3, "mflops": 1e6, "gflops": 1e9, "tflops": 1e12,
                "pflops": 1e15}


@dataclass(frozen=True)
class Link:
    """A read path into fast memory."""

    bandwidth: float  # bytes/s
    latency: float  # s per request
    queue_depth: int  # requests in flight at once (>= 1)

    def to_dict(self) -> dict[str, Any]:
        return {"bandwidth": self.bandwidth, "latency": self.latency, "queue_depth": self.queue_depth}


@dataclass(frozen=True)
class Tier:
    """A memory tier below fast memory and the link that reads from it."""

    name: str
    capacity_bytes: int
    link: Link

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "capacity_bytes": self.capacity_bytes, **self.link.to_dict()}


@dataclass(frozen=True)
class Hardware:
    """A device that computes the experts, its host, and the memory below it.

    ``link`` is where misses come from: the first tier's link. ``flops`` is the device's
    peak dense FP16/BF16 rate; at batch 1 decode is bound by ``memory_bandwidth`` instead.
    """

    name: str
    description: str
    flops: float  # FLOP/s of the device computing the experts
    memory_bandwidth: float  # bytes/s of its fast memory
    memory_capacity: int  # bytes of fast memory
    host_flops: float  # FLOP/s of the host CPU ("compute the miss on the host")
    host_memory_bandwidth: float  # bytes/s the host CPU reads its memory at
    link: Link
    tiers: tuple[Tier, ...]  # fastest first
    sources: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "flops": self.flops,
                "memory_bandwidth": self.memory_bandwidth, "memory_capacity": self.memory_capacity,
                "host_flops": self.host_flops, "host_memory_bandwidth": self.host_memory_bandwidth,
                "link": self.link.to_dict(), "tiers": [tier.to_dict() for tier in self.tiers],
                "sources": dict(self.sources)}


@dataclass(frozen=True)
class Model:
    """Sizes and per-token work of a Mixture-of-Experts model.

    A routed expert is a SwiGLU MLP: gate and up (``expert_intermediate`` x
    ``hidden_size``) and down (``hidden_size`` x ``expert_intermediate``), plus
    ``expert_bias`` bias parameters where the model has them. ``non_expert_params`` counts
    the weights read per decoded token outside the routed experts (attention, norms,
    routers, shared experts, dense FFN layers, lm_head, one embedding row);
    ``non_expert_flops`` is twice that plus ``attention_flops``, the attention scores and
    weighted values of one decoded token at ``context_length`` earlier positions.
    """

    name: str
    description: str
    moe_layers: int
    dense_layers: int
    experts: int
    top_k: int
    shared_experts: int
    hidden_size: int
    expert_intermediate: int
    expert_params: int  # one routed expert's parameters: 3 * hidden * intermediate + bias
    non_expert_params: int
    non_expert_flops: float
    expert_bias: int = 0
    attention_flops: float = 0.0
    context_length: int = 0
    native_dtype: str = "bf16"  # the published checkpoint's expert weights
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def expert_flops(self) -> float:
        """FLOPs of one token routed to one expert."""
        return 2.0 * self.expert_params

    def expert_bytes(self, dtype: str) -> int:
        """Bytes of one routed expert stored as ``dtype`` (see :data:`DTYPES`).

        Block formats follow GGUF: each matrix row splits into blocks; a k-quant whose
        row length does not fill its 256-weight blocks falls back as llama.cpp does
        (q4_k -> q5_0, q6_k -> q8_0, ...). Mixed types such as Q4_K_M pick one of these
        per tensor, so a real Q4_K_M file lies between the q4_k and q6_k figures.
        """
        dtype = _dtype(dtype)
        h, i = self.hidden_size, self.expert_intermediate
        matrices = 2 * _matrix_bytes(i, h, dtype) + _matrix_bytes(h, i, dtype)
        bias_width = _FLOAT_BYTES.get(dtype, _BIAS_BYTES_QUANTIZED)
        return matrices + self.expert_bias * bias_width

    def non_expert_bytes(self, dtype: str) -> int:
        """Bytes of the non-expert weights read per token, all at ``dtype``'s average rate
        (an estimate for block formats: GGUF keeps norms in f32 and may mix types)."""
        dtype = _dtype(dtype)
        if dtype in _FLOAT_BYTES:
            return self.non_expert_params * _FLOAT_BYTES[dtype]
        weights, size = _BLOCKS[dtype]
        return math.ceil(self.non_expert_params * size / weights)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "moe_layers": self.moe_layers,
                "dense_layers": self.dense_layers, "experts": self.experts, "top_k": self.top_k,
                "shared_experts": self.shared_experts, "hidden_size": self.hidden_size,
                "expert_intermediate": self.expert_intermediate, "expert_bias": self.expert_bias,
                "expert_params": self.expert_params, "expert_flops": self.expert_flops,
                "non_expert_params": self.non_expert_params, "non_expert_flops": self.non_expert_flops,
                "attention_flops": self.attention_flops, "context_length": self.context_length,
                "native_dtype": self.native_dtype,
                "expert_bytes": {dtype: self.expert_bytes(dtype) for dtype in DTYPES},
                "sources": dict(self.sources)}


def _dtype(dtype: str) -> str:
    key = str(dtype).lower()
    if key not in DTYPES:
        raise MoecacheError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return key


def _matrix_bytes(rows: int, cols: int, dtype: str) -> int:
    """Bytes of a rows x cols matrix whose rows (``cols`` weights each) are stored as ``dtype``."""
    if dtype in _FLOAT_BYTES:
        return rows * cols * _FLOAT_BYTES[dtype]
    used = dtype
    if cols % _BLOCKS[used][0]:
        used = _FALLBACK.get(dtype, "")
        if not used:
            raise MoecacheError(f"rows of {cols} weights do not split into {dtype}'s blocks of "
                                f"{_BLOCKS[dtype][0]}")
        if cols % _BLOCKS[used][0]:
            return rows * cols * _FLOAT_BYTES["f16"]
    weights, size = _BLOCKS[used]
    return rows * (cols // weights) * size


# -- loading ------------------------------------------------------------------------------

_SHIPPED = "profiles.toml"
_HARDWARE_KEYS = {"description", "flops", "memory_bandwidth", "memory_capacity", "host_flops",
                  "host_memory_bandwidth", "tiers", "sources"}
MAX_QUEUE_DEPTH = 65536  # the most entries an NVMe queue takes (its 16-bit, 0-based size field)
_TIER_KEYS = {"name", "capacity", "bandwidth", "latency", "queue_depth", "source"}
_MODEL_INTS = ("moe_layers", "dense_layers", "experts", "top_k", "shared_experts", "hidden_size",
               "expert_intermediate", "expert_bias", "non_expert_params", "context_length")
_MODEL_KEYS = {"description", "attention_flops", "native_dtype", "sources", *_MODEL_INTS}
_MODEL_OPTIONAL = {"expert_bias": 0, "attention_flops": 0, "context_length": 0,
                   "native_dtype": "bf16", "sources": {}}
_SOURCE_EXTRA = {"config", "profile"}  # sources that cover several figures


@functools.cache
def _shipped() -> tuple[str, dict[str, Any]]:
    text = resources.files("moecache").joinpath("data", _SHIPPED).read_text(encoding="utf-8")
    label = f"moecache/data/{_SHIPPED}"
    return label, _parse(text, label)


def _parse(text: str, label: str) -> dict[str, Any]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise MoecacheError(f"{label}: not valid TOML: {err}") from None
    unknown = set(data) - {"hardware", "model"}
    if unknown:
        raise MoecacheError(f"{label}: unknown top-level key {sorted(unknown)[0]!r}: use [hardware.NAME] "
                            "or [model.NAME] tables")
    for section in ("hardware", "model"):
        entries = data.get(section, {})
        if not isinstance(entries, dict) or any(not isinstance(v, dict) for v in entries.values()):
            raise MoecacheError(f"{label}: {section} must hold [{section}.NAME] tables")
    return data


def _user_file(path: str, section: str) -> tuple[str, str, dict[str, Any]]:
    """(label, entry name, table) of the one [section.NAME] table in the file at ``path``."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise MoecacheError(f"{path}: cannot read profile file: {reason}") from None
    entries = _parse(text, path).get(section, {})
    if len(entries) != 1:
        raise MoecacheError(f"{path}: expected one [{section}.NAME] table, found {len(entries)}")
    name, table = next(iter(entries.items()))
    return path, name, table


def _looks_like_path(name_or_path: str) -> bool:
    return name_or_path.endswith(".toml") or "/" in name_or_path or Path(name_or_path).exists()


def hardware_names() -> list[str]:
    """Names of the shipped hardware profiles."""
    return list(_shipped()[1].get("hardware", {}))


def model_names() -> list[str]:
    """Names of the shipped model profiles."""
    return list(_shipped()[1].get("model", {}))


def hardware(name_or_path: str) -> Hardware:
    """A shipped hardware profile by name, or the one [hardware.NAME] table of a TOML file."""
    return _lookup("hardware", name_or_path, _hardware)


def model(name_or_path: str) -> Model:
    """A shipped model profile by name, or the one [model.NAME] table of a TOML file."""
    return _lookup("model", name_or_path, _model)


def _lookup(section: str, name_or_path: str, build: Callable[..., Any]) -> Any:
    """``build(label, name, table)`` of a shipped ``section`` entry or of a user's file."""
    label, data = _shipped()
    shipped = data.get(section, {})
    if name_or_path in shipped:
        return build(label, name_or_path, shipped[name_or_path])
    if _looks_like_path(name_or_path):
        return build(*_user_file(name_or_path, section))
    raise MoecacheError(f"unknown {section} {name_or_path!r}: use one of {', '.join(shipped)} "
                        "or the path of a TOML file")


# -- validation ---------------------------------------------------------------------------

class _Entry:
    """Reads the keys of one table, naming the file and key path in every error."""

    def __init__(self, label: str, where: str, table: dict[str, Any], allowed: set[str],
                 defaults: dict[str, Any] | None = None):
        defaults = defaults or {}
        self.label, self.where = label, where
        unknown = sorted(set(table) - allowed)
        if unknown:
            raise self.error(unknown[0], f"unknown key (use {', '.join(sorted(allowed))})")
        missing = sorted(allowed - set(table) - set(defaults))
        if missing:
            raise self.error(missing[0], "missing")
        self.table = {**defaults, **table}

    def error(self, key: str, problem: str) -> MoecacheError:
        return MoecacheError(f"{self.label}: {self.where}.{key}: {problem}")

    def parse(self, key: str, parser: Callable[[str], Any], *, unit: str) -> Any:
        value = self.table[key]
        try:
            if not isinstance(value, str) or not _split(value, key)[1]:
                raise MoecacheError(f"give a string with a unit, e.g. {unit!r}")
            return parser(value)
        except MoecacheError as err:
            raise self.error(key, str(err)) from None

    def bandwidth(self, key: str) -> float:
        value = self.table[key]
        if not isinstance(value, str) or not (value.strip().lower().endswith("/s") or _is_preset(value)):
            raise self.error(key, "give bytes per second with a unit, e.g. '7GB/s'")
        try:
            return parse_bandwidth(value)
        except MoecacheError as err:
            raise self.error(key, str(err)) from None

    def flops(self, key: str) -> float:
        value = self.table[key]
        if isinstance(value, bool):
            raise self.error(key, "give FLOP/s as a number or e.g. '15TFLOPS'")
        try:
            number, unit = _split(value, key)
        except MoecacheError as err:
            raise self.error(key, str(err)) from None
        scale = _FLOPS_UNITS.get(unit)
        if scale is None:
            raise self.error(key, f"unknown unit {unit!r}: use FLOPS, GFLOPS, TFLOPS or PFLOPS")
        result = float(number) * scale
        if not result > 0:
            raise self.error(key, "must be positive")
        return result

    def integer(self, key: str, low: int, high: int = INT64_MAX) -> int:
        value = self.table[key]
        whole = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        if not whole or not low <= value <= high:
            bounds = f">= {low}" if high == INT64_MAX else f"from {low} to {high}"
            raise self.error(key, f"must be a whole number {bounds}, got {value!r}")
        return int(value)

    def text(self, key: str) -> str:
        value = self.table[key]
        if not isinstance(value, str):
            raise self.error(key, "must be a string")
        return value

    def sources(self, figures: set[str]) -> dict[str, str]:
        table = self.table.get("sources", {})
        if not isinstance(table, dict):
            raise self.error("sources", "must be a table of figure = \"source\"")
        for key, value in table.items():
            if key not in figures | _SOURCE_EXTRA:
                raise self.error(f"sources.{key}", "names no figure of this entry")
            if not isinstance(value, str) or not value.strip():
                raise self.error(f"sources.{key}", "must be a non-empty string")
        return dict(table)


def _is_preset(value: str) -> bool:
    return value.strip().lower() in BANDWIDTH_PRESETS


def _hardware(label: str, name: str, table: dict[str, Any]) -> Hardware:
    entry = _Entry(label, f"hardware.{name}", table, _HARDWARE_KEYS, {"sources": {}})
    tiers_table = table["tiers"]
    if not (isinstance(tiers_table, list) and tiers_table and all(isinstance(t, dict) for t in tiers_table)):
        raise entry.error("tiers", "give at least one [[hardware.NAME.tiers]] table")
    tiers = []
    sources = entry.sources(_HARDWARE_KEYS - {"description", "tiers", "sources"})
    for index, tier_table in enumerate(tiers_table):
        tier = _Entry(label, f"hardware.{name}.tiers[{index}]", tier_table, _TIER_KEYS, {"source": None})
        tier_name = tier.text("name")
        link = Link(bandwidth=tier.bandwidth("bandwidth"),
                    latency=tier.parse("latency", parse_duration, unit="80us"),
                    queue_depth=tier.integer("queue_depth", 1, MAX_QUEUE_DEPTH))
        tiers.append(Tier(tier_name, tier.parse("capacity", parse_bytes, unit="16GiB"), link))
        if tier.table["source"] is not None:
            sources[f"tiers.{tier_name}"] = tier.text("source")
        if index and (link.bandwidth > tiers[index - 1].link.bandwidth
                      or link.latency < tiers[index - 1].link.latency):
            raise entry.error("tiers", f"not ordered fastest first: {tier_name!r} has more bandwidth or "
                              f"less latency than {tiers[index - 1].name!r} above it")
    return Hardware(
        name=name, description=entry.text("description"), flops=entry.flops("flops"),
        memory_bandwidth=entry.bandwidth("memory_bandwidth"),
        memory_capacity=entry.parse("memory_capacity", parse_bytes, unit="16GiB"),
        host_flops=entry.flops("host_flops"),
        host_memory_bandwidth=entry.bandwidth("host_memory_bandwidth"),
        link=tiers[0].link, tiers=tuple(tiers), sources=sources)


def _model(label: str, name: str, table: dict[str, Any]) -> Model:
    entry = _Entry(label, f"model.{name}", table, _MODEL_KEYS, _MODEL_OPTIONAL)
    ints = {key: entry.integer(key, 0 if key in ("dense_layers", "shared_experts", "expert_bias",
                                                 "context_length") else 1)
            for key in _MODEL_INTS}
    if ints["top_k"] > ints["experts"]:
        raise entry.error("top_k", f"{ints['top_k']} is more than experts ({ints['experts']})")
    attention = entry.table["attention_flops"]
    if isinstance(attention, bool) or not isinstance(attention, numbers.Real) \
            or not math.isfinite(attention) or attention < 0:
        raise entry.error("attention_flops", f"must be a number >= 0, got {attention!r}")
    if attention and not ints["context_length"]:
        raise entry.error("context_length", "give the context length attention_flops is counted at")
    native = entry.text("native_dtype")
    try:
        native = _dtype(native)
    except MoecacheError as err:
        raise entry.error("native_dtype", str(err)) from None
    h, i = ints["hidden_size"], ints["expert_intermediate"]
    return Model(
        name=name, description=entry.text("description"), moe_layers=ints["moe_layers"],
        dense_layers=ints["dense_layers"], experts=ints["experts"], top_k=ints["top_k"],
        shared_experts=ints["shared_experts"], hidden_size=h, expert_intermediate=i,
        expert_params=3 * h * i + ints["expert_bias"], non_expert_params=ints["non_expert_params"],
        non_expert_flops=2.0 * ints["non_expert_params"] + float(attention),
        expert_bias=ints["expert_bias"], attention_flops=float(attention),
        context_length=ints["context_length"], native_dtype=native,
        sources=entry.sources(_MODEL_KEYS - {"description", "sources"}))


# -- listing ------------------------------------------------------------------------------

def profiles_dict() -> dict[str, list[dict[str, Any]]]:
    """Every shipped profile as plain data (what ``moecache profiles --json`` prints)."""
    return {"hardware": [hardware(name).to_dict() for name in hardware_names()],
            "models": [model(name).to_dict() for name in model_names()]}


def profiles_table() -> str:
    """The shipped profiles' key figures as two text tables."""
    rows = [("hardware", "TFLOP/s", "mem GB/s", "mem GiB", "miss link", "tiers")]
    for name in hardware_names():
        hw = hardware(name)
        link = hw.link
        rows.append((name, f"{hw.flops / 1e12:g}", f"{hw.memory_bandwidth / 1e9:g}",
                     f"{hw.memory_capacity / 2**30:g}",
                     f"{link.bandwidth / 1e9:g} GB/s, {link.latency * 1e6:g} us, QD {link.queue_depth}",
                     " > ".join(f"{tier.name} {format_bytes(tier.capacity_bytes)}" for tier in hw.tiers)))
    lines = _columns(rows)
    rows = [("model", "MoE+dense layers", "E", "K", "shared", "expert bf16", "expert q4_k",
             "non-expert bf16", "GFLOP/token")]
    for name in model_names():
        m = model(name)
        active = m.non_expert_flops + m.moe_layers * m.top_k * m.expert_flops
        rows.append((name, f"{m.moe_layers}+{m.dense_layers}", str(m.experts), str(m.top_k),
                     str(m.shared_experts), format_bytes(m.expert_bytes("bf16")),
                     format_bytes(m.expert_bytes("q4_k")), format_bytes(m.non_expert_bytes("bf16")),
                     f"{active / 1e9:.2f}"))
    return "\n".join([*lines, "", *_columns(rows),
                      "", "GFLOP/token: non-expert work at context_length plus top_k routed experts per "
                      "MoE layer; figures and sources: moecache profiles --json, docs/profiles.md"])


def _columns(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
            for row in rows]
