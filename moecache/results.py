"""The result of a replay: pooled metrics and one row per MoE layer (docs/semantics.md),
built by :func:`summarize` from the hits per layer and the routing totals of the requests."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import MoecacheError
from .requests import Requests
from .trace import Trace
from .units import INT64_MAX, format_bytes

if TYPE_CHECKING:
    import pandas as pd


@dataclass
class ReplayResult:
    """Pooled metrics of one replay (docs/semantics.md); ``per_layer`` has one row per layer
    (built on first use from ``layer_columns``, so a replay does not import pandas)."""

    policy: str
    scope: str
    capacity: int | None
    memory_bytes: int | None
    requests: int
    hits: int
    misses: int
    cold_misses: int
    reuse_rate: float
    miss_bytes: int | None
    tokens: int
    steps: int
    bandwidth: float | None = None
    latency: float = 0.0
    layer_columns: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    prefetched: int | None = None  # the prefetch fields are None for a replay without prefetch
    prefetch_used: int | None = None
    prefetch_wasted: int | None = None
    prefetch_dropped: int | None = None
    prefetch_bytes: int | None = None
    wasted_bytes: int | None = None
    events: pd.DataFrame | None = field(default=None, repr=False)
    outcomes: np.ndarray | None = field(default=None, repr=False)  # with record_outcomes: see replay
    prefetch_outcomes: np.ndarray | None = field(default=None, repr=False)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requests if self.requests else math.nan

    @cached_property
    def per_layer(self) -> pd.DataFrame:
        """One row per MoE layer: ``layer_columns`` as a table."""
        import pandas as pd

        return pd.DataFrame(self.layer_columns)

    @property
    def bytes_per_token(self) -> float | None:
        return None if self.miss_bytes is None or not self.tokens else self.miss_bytes / self.tokens

    @property
    def io_seconds(self) -> float | None:
        """Miss bytes over the bandwidth plus one latency per fetched expert."""
        if self.bandwidth is None or self.miss_bytes is None:
            return None
        return self.miss_bytes / self.bandwidth + self.misses * self.latency

    @property
    def io_seconds_per_token(self) -> float | None:
        io = self.io_seconds
        return None if io is None or not self.tokens else io / self.tokens

    def to_dict(self) -> dict[str, Any]:
        """The metric keys of docs/semantics.md, JSON-ready (NaN becomes None)."""
        keys = ("policy", "scope", "capacity", "memory_bytes", "requests", "hits", "misses",
                "cold_misses", "hit_rate", "reuse_rate", "miss_bytes", "bytes_per_token",
                "bandwidth", "latency", "io_seconds", "io_seconds_per_token", "tokens", "steps")
        if self.prefetched is not None:
            keys += PREFETCH_KEYS + ("prefetch_bytes", "wasted_bytes")
        out = {k: getattr(self, k) for k in keys}
        return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in out.items()}


PREFETCH_KEYS = ("prefetched", "prefetch_used", "prefetch_wasted", "prefetch_dropped")



def summarize(trace: Trace, req: Requests, layer_hits: np.ndarray, policy: str, scope: str,
              capacity: int | None, memory_bytes: int | None = None,
              bandwidth: float | None = None, latency: float = 0.0,
              prefetch_counts: np.ndarray | None = None) -> ReplayResult:
    """The result object for given hits per MoE layer; everything else comes from ``req``
    (``prefetch_counts``: rows PREFETCH_KEYS, one column per layer)."""
    totals = req.layer_totals
    columns: dict[str, np.ndarray] = {
        "layer": np.asarray(trace.layers),
        "requests": totals["requests"],
        "hits": np.asarray(layer_hits),
        "cold_misses": totals["cold_misses"],
        "reuse_hits": totals["reuse_hits"],
        "reuse_requests": totals["reuse_requests"],
    }
    columns["misses"] = columns["requests"] - columns["hits"]
    with np.errstate(divide="ignore", invalid="ignore"):  # a layer without requests: NaN
        columns["hit_rate"] = columns["hits"] / columns["requests"]
        columns["reuse_rate"] = columns["reuse_hits"] / columns["reuse_requests"]
    expert_bytes = trace.expert_bytes
    miss_bytes = None
    if expert_bytes is not None:
        if int(totals["requests"].sum()) * int(expert_bytes.max()) > INT64_MAX:
            raise MoecacheError(f"{trace.source}: metadata expert_bytes (up to "
                                f"{format_bytes(int(expert_bytes.max()))}) is too large: the miss bytes "
                                "of this trace could exceed 2**63")
        columns["miss_bytes"] = columns["misses"] * expert_bytes
        miss_bytes = int(columns["miss_bytes"].sum())
    prefetch: dict[str, int] = {}
    if prefetch_counts is not None:
        for name, row in zip(PREFETCH_KEYS, prefetch_counts, strict=True):
            columns[name] = row
        prefetch = {name: int(columns[name].sum()) for name in PREFETCH_KEYS}
        if expert_bytes is not None:  # Python integers: no overflow
            for name, column in (("prefetch_bytes", "prefetched"), ("wasted_bytes", "prefetch_wasted")):
                pairs = zip(columns[column], expert_bytes, strict=True)
                prefetch[name] = sum(int(n) * int(b) for n, b in pairs)
    totals = {name: int(columns[name].sum()) for name in ("requests", "hits", "misses", "cold_misses",
                                                           "reuse_hits", "reuse_requests")}
    reuse_den = totals["reuse_requests"]
    return ReplayResult(
        policy=policy, scope=scope,
        capacity=None if capacity is None else int(capacity), memory_bytes=memory_bytes,
        requests=totals["requests"], hits=totals["hits"], misses=totals["misses"],
        cold_misses=totals["cold_misses"],
        reuse_rate=totals["reuse_hits"] / reuse_den if reuse_den else math.nan,
        miss_bytes=miss_bytes, tokens=req.num_tokens, steps=req.num_steps,
        bandwidth=bandwidth, latency=latency, layer_columns=columns, **prefetch,
    )
