"""Replay driver: runs a policy kernel on a configuration checked by :mod:`moecache.validate`,
explains the result."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from moecache.policies import KERNELS

from .errors import MoecacheError
from .requests import Requests
from .trace import Trace
from .units import INT64_MAX, format_bytes
from .validate import plan


@dataclass
class ReplayResult:
    """Pooled metrics of one replay (docs/semantics.md); ``per_layer`` has one row per layer."""

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
    per_layer: pd.DataFrame = field(default_factory=pd.DataFrame, repr=False)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requests if self.requests else math.nan

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
        out = {k: getattr(self, k) for k in keys}
        return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in out.items()}


def replay(
    trace: Trace,
    policy: str = "lru",
    capacity: int | None = None,
    scope: str = "layer",
    *,
    memory: str | int | None = None,
    bandwidth: str | float | None = None,
    latency: str | float = 0.0,
    per_token: bool = False,
    seed: int = 0,
    requests: Requests | None = None,
) -> ReplayResult:
    """Simulate an expert cache over ``trace``.

    ``capacity`` counts experts: per layer (``scope="layer"``) or in one pool shared by
    all layers (``scope="global"``). ``memory`` gives a byte budget instead, split evenly
    across layers in layer scope; it needs ``expert_bytes`` in the trace metadata.
    ``bandwidth`` ("4GB/s") and ``latency`` (per fetch, "80us") turn misses into I/O
    time. ``requests`` lets a caller reuse the sets built for an earlier replay.
    """
    checked = plan(trace, policy, scope, capacity=capacity, memory=memory, per_token=per_token,
                   bandwidth=bandwidth, latency=latency, seed=seed, requests=requests)
    req, num_layers, num_experts = checked.requests, trace.num_layers, trace.num_experts
    kernel = KERNELS[checked.policy]
    hits = np.zeros((req.num_steps, num_layers), np.int64)
    if scope == "layer":
        sizes = np.ones(num_experts, np.int64)
        for layer, cap in enumerate(checked.layer_capacities):
            keys, offsets = req.layer(layer)
            hits[:, layer] = kernel(keys, offsets, sizes, np.int64(cap), np.int64(checked.seed))
    else:
        keys, offsets = req.pooled()
        sizes = np.repeat(np.asarray(checked.units, np.int64), num_experts)
        hits[:] = kernel(keys, offsets, sizes, np.int64(checked.pool),
                         np.int64(checked.seed)).reshape(-1, num_layers)

    return summarize(trace, req, hits.sum(axis=0), checked.policy, scope, checked.capacity,
                     checked.memory_bytes, checked.bandwidth, checked.latency)


def summarize(trace: Trace, req: Requests, layer_hits: np.ndarray, policy: str, scope: str,
              capacity: int | None, memory_bytes: int | None = None,
              bandwidth: float | None = None, latency: float = 0.0) -> ReplayResult:
    """The result object for given hits per MoE layer; everything else comes from ``req``."""
    totals = req.layer_totals
    per_layer = pd.DataFrame({
        "layer": trace.layers,
        "requests": totals["requests"],
        "hits": layer_hits,
        "cold_misses": totals["cold_misses"],
        "reuse_hits": totals["reuse_hits"],
        "reuse_requests": totals["reuse_requests"],
    })
    per_layer["misses"] = per_layer["requests"] - per_layer["hits"]
    per_layer["hit_rate"] = per_layer["hits"] / per_layer["requests"]
    per_layer["reuse_rate"] = per_layer["reuse_hits"] / per_layer["reuse_requests"]
    expert_bytes = trace.expert_bytes
    miss_bytes = None
    if expert_bytes is not None:
        if int(totals["requests"].sum()) * int(expert_bytes.max()) > INT64_MAX:
            raise MoecacheError(f"{trace.source}: metadata expert_bytes (up to "
                                f"{format_bytes(int(expert_bytes.max()))}) is too large: the miss bytes "
                                "of this trace could exceed 2**63")
        per_layer["miss_bytes"] = per_layer["misses"] * expert_bytes
        miss_bytes = int(per_layer["miss_bytes"].sum())
    totals = per_layer[["requests", "hits", "misses", "cold_misses", "reuse_hits",
                        "reuse_requests"]].sum()
    reuse_den = int(totals["reuse_requests"])
    return ReplayResult(
        policy=policy, scope=scope,
        capacity=None if capacity is None else int(capacity), memory_bytes=memory_bytes,
        requests=int(totals["requests"]), hits=int(totals["hits"]),
        misses=int(totals["misses"]), cold_misses=int(totals["cold_misses"]),
        reuse_rate=int(totals["reuse_hits"]) / reuse_den if reuse_den else math.nan,
        miss_bytes=miss_bytes, tokens=req.num_tokens, steps=req.num_steps,
        bandwidth=bandwidth, latency=latency, per_layer=per_layer,
    )
