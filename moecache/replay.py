"""Replay driver: validates a configuration, runs a policy kernel, explains the result."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import reduce
from typing import Any

import numpy as np
import pandas as pd

from moecache.policies import KERNELS, POLICIES

from .errors import MoecacheError
from .requests import Requests
from .trace import Trace
from .units import INT64_MAX, check_seed, format_bytes, parse_bandwidth, parse_bytes, parse_duration

SCOPES = ("layer", "global")


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
    if policy not in KERNELS:
        raise MoecacheError(f"unknown policy {policy!r}: choose one of {', '.join(POLICIES)}")
    if scope not in SCOPES:
        raise MoecacheError(f"unknown scope {scope!r}: choose layer or global")
    if (capacity is None) == (memory is None):
        raise MoecacheError("give exactly one of capacity (experts) or memory (bytes)")
    check_seed(seed)
    memory_bytes = None if memory is None else parse_bytes(memory, "memory")
    bytes_per_second = None if bandwidth is None else parse_bandwidth(bandwidth)
    fetch_latency = parse_duration(latency)
    req = requests if requests is not None else Requests.from_trace(trace, per_token=per_token)
    num_layers, num_experts = trace.num_layers, trace.num_experts
    expert_bytes = trace.expert_bytes
    if memory_bytes is not None:
        if expert_bytes is None:
            raise MoecacheError(f"{trace.source}: memory budgets need expert_bytes in the trace metadata")
        _check_memory(trace, memory_bytes, req, scope)
    kernel = KERNELS[policy]
    hits = np.zeros((req.num_steps, num_layers), np.int64)

    if scope == "layer":
        caps = ([capacity] * num_layers if memory_bytes is None
                else [memory_bytes // num_layers // int(b) for b in expert_bytes])
        for layer, cap in enumerate(caps):
            _check_capacity(trace, cap, req, layer)
            keys, offsets = req.layer(layer)
            sizes = np.ones(num_experts, np.int64)
            hits[:, layer] = kernel(keys, offsets, sizes, np.int64(cap), np.int64(seed))
        capacity = caps[0] if len(set(caps)) == 1 else None
    else:
        if memory_bytes is None:
            unit = np.ones(num_layers, np.int64)
            cap = int(capacity)
        else:
            # sizes in units of their greatest common divisor, to keep counts small and exact
            divisor = reduce(math.gcd, (int(b) for b in expert_bytes))
            unit = np.asarray(expert_bytes, np.int64) // divisor
            cap = memory_bytes // divisor
        _check_capacity(trace, cap, req, None, unit)
        keys, offsets = req.pooled()
        sizes = np.repeat(unit, num_experts)
        hits[:] = kernel(keys, offsets, sizes, np.int64(cap), np.int64(seed)).reshape(-1, num_layers)
        if memory_bytes is not None and len(set(unit.tolist())) == 1:
            capacity = cap // int(unit[0])

    return summarize(trace, req, hits.sum(axis=0), policy, scope, capacity, memory_bytes,
                     bytes_per_second, fetch_latency)


def _check_memory(trace: Trace, memory_bytes: int, req: Requests, scope: str) -> None:
    """Reject a byte budget that cannot hold one request, in bytes and experts."""
    sizes = trace.expert_bytes.tolist()
    largest = req.layer_totals["largest"].tolist()
    share = memory_bytes // trace.num_layers if scope == "layer" else memory_bytes
    needed = [count * size for count, size in zip(largest, sizes, strict=True)]  # Python ints: no overflow
    if max(needed) <= share:
        return
    li = needed.index(max(needed))
    fits = share // sizes[li]
    split = f" split over {trace.num_layers} layers ({format_bytes(share)} each)" if scope == "layer" else ""
    required = needed[li] * (trace.num_layers if scope == "layer" else 1)
    raise MoecacheError(
        f"{trace.source}: memory {format_bytes(memory_bytes)}{split} holds "
        f"{'no expert' if fits == 0 else f'only {fits} experts'} of layer {int(trace.layers[li])} "
        f"({format_bytes(sizes[li])} each), whose largest step set needs {largest[li]}; "
        f"use a memory budget >= {format_bytes(required)}"
        + (" or per-token steps (--per-token)" if req.num_steps < req.num_tokens else ""))


def _check_capacity(trace: Trace, capacity: int, req: Requests, layer: int | None,
                    unit: np.ndarray | None = None) -> None:
    """Reject capacities that cannot hold one request (an error, never a result)."""
    if not isinstance(capacity, (int, np.integer)) or isinstance(capacity, bool):
        raise MoecacheError(f"capacity must be a whole number of experts, got {capacity!r}")
    if not 0 < capacity <= INT64_MAX:
        raise MoecacheError(f"capacity must be positive and below 2**63, got {capacity}")
    largest = req.layer_totals["largest"]
    if layer is not None:
        largest = largest[layer:layer + 1]
    if (largest * (1 if unit is None else unit)).max(initial=0) <= capacity:
        return
    # the first step holding the largest set, for the message
    sizes = req.set_sizes if layer is None else req.set_sizes[:, layer:layer + 1]
    if unit is not None:
        sizes = sizes * unit[None, :]
    t, li = np.unravel_index(int(np.argmax(sizes)), sizes.shape)
    needed = int(sizes[t, li])
    model_layer = int(trace.layers[li if layer is None else layer])
    what = "experts" if unit is None else "units"
    raise MoecacheError(
        f"{trace.source}: capacity {capacity} is below the largest step set "
        f"({needed} {what} in layer {model_layer} at step {t}); use a capacity >= {needed}"
        + (" or per-token steps (--per-token)" if req.num_steps < req.num_tokens else ""))


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
