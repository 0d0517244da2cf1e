"""Replay driver: runs a policy kernel on a configuration checked by :mod:`moecache.validate`,
explains the result."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np

from moecache.policies import resolve
from moecache.policies.driver import EVENT_COLUMNS

from .errors import MoecacheError
from .parallel import map_parallel
from .requests import Requests
from .trace import Trace
from .units import INT64_MAX, format_bytes
from .validate import plan

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


@dataclass(frozen=True, eq=False)
class Prefetch:
    """Experts inserted ahead of demand (docs/semantics.md, "Kernel contract"): before the
    request of step t in MoE layer l (0-based, in trace order), the experts of batch
    (t, l) that are not cached are admitted in the given order. ``experts`` (int32 ids)
    and ``offsets`` (int64, steps x layers + 1) hold the batches in step-major order.
    """

    experts: np.ndarray
    offsets: np.ndarray
    layers: int

    @classmethod
    def from_lists(cls, batches: Sequence[Sequence[Iterable[int]]]) -> Prefetch:
        """From ``batches[t][l]``, the expert ids to prefetch before step t of layer l."""
        layers = {len(step) for step in batches}
        if len(layers) > 1:
            raise MoecacheError(f"prefetch: every step needs one batch per layer, got {sorted(layers)}")
        flat = [np.asarray(list(b), np.int64) for step in batches for b in step]
        lengths = np.array([len(b) for b in flat], np.int64)
        experts = np.concatenate(flat) if flat else np.zeros(0, np.int64)
        if experts.size and (experts.min() < 0 or experts.max() > np.iinfo(np.int32).max):
            raise MoecacheError("prefetch: expert ids must be between 0 and 2**31 - 1")
        return cls(experts.astype(np.int32), np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                   layers.pop() if layers else 0)

    @property
    def steps(self) -> int:
        return (len(self.offsets) - 1) // self.layers if self.layers else 0

    def check(self, trace: Trace, req: Requests) -> None:
        """Reject batches that do not fit the replay's steps, layers and experts."""
        if (self.steps, self.layers) != (req.num_steps, trace.num_layers):
            raise MoecacheError(f"prefetch: has {self.steps} steps x {self.layers} layers, the replay "
                                f"{req.num_steps} steps x {trace.num_layers} layers")
        if self.experts.size and int(self.experts.max()) >= trace.num_experts:
            raise MoecacheError(f"prefetch: expert id {int(self.experts.max())} is out of range "
                                f"(the trace has {trace.num_experts} experts)")

    def layer(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """The batches of one layer as (keys, offsets), one batch per step."""
        picks, offsets = self.layer_entries(layer)
        return self.experts[picks], offsets

    def layer_entries(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """(positions in ``experts`` of one layer's batches, their offsets per step)."""
        index = np.arange(self.steps, dtype=np.int64) * self.layers + layer
        starts, lengths = self.offsets[index], self.offsets[index + 1] - self.offsets[index]
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        return np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1]), offsets

    def inserted(self, outcomes: np.ndarray, num_experts: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Of the entries a replay inserted (``prefetch_outcomes == 1``): (their keys of global
        scope, layer x E + expert; their positions t x L + l; CSR offsets per position)."""
        kept = outcomes == 1
        position = np.repeat(np.arange(len(self.offsets) - 1), np.diff(self.offsets))[kept]
        keys = self.experts[kept].astype(np.int64) + num_experts * (position % self.layers)
        counts = np.bincount(position, minlength=len(self.offsets) - 1)
        return keys, position, np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def pooled(self, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
        """The batches as (keys, offsets) of global scope: key = layer x E + expert."""
        batch_layer = np.arange(len(self.offsets) - 1, dtype=np.int64) % self.layers
        keys = self.experts + num_experts * np.repeat(batch_layer, np.diff(self.offsets))
        return keys.astype(np.int32), self.offsets


def replay(
    trace: Trace,
    policy: Any = "lru",
    capacity: int | None = None,
    scope: str = "layer",
    *,
    memory: str | int | None = None,
    bandwidth: str | float | None = None,
    latency: str | float = 0.0,
    per_token: bool = False,
    seed: int = 0,
    requests: Requests | None = None,
    policy_args: dict[str, Any] | None = None,
    prefetch: Prefetch | None = None,
    record_events: bool = False,
    record_outcomes: bool = False,
    workers: int | None = None,
) -> ReplayResult:
    """Simulate an expert cache over ``trace``.

    ``policy`` is a registered name, optionally with parameters (``"clock:bits=2"``, or
    ``policy_args={"bits": 2}``), or a :class:`moecache.PythonPolicy`.
    ``capacity`` counts experts: per layer (``scope="layer"``) or in one pool shared by
    all layers (``scope="global"``). ``memory`` gives a byte budget instead, split evenly
    across layers in layer scope; it needs ``expert_bytes`` in the trace metadata.
    ``bandwidth`` ("4GB/s") and ``latency`` (per fetch, "80us") turn misses into I/O
    time. ``requests`` lets a caller reuse the sets built for an earlier replay.
    ``prefetch`` inserts experts ahead of demand (the result's prefetch fields count
    them); ``record_events`` fills ``events``, one row per step and layer;
    ``record_outcomes`` fills ``outcomes`` (int8 per entry of ``requests.ids``: 0 miss, 1 hit,
    2 the first use of a prefetched expert) and ``prefetch_outcomes`` (per entry of
    ``prefetch.experts``: 1 if the cache inserted it). In layer scope the layers run
    ``workers`` at a time (default: every core), with the same result.
    """
    checked = plan(trace, resolve(policy, policy_args), scope, capacity=capacity, memory=memory,
                   per_token=per_token, bandwidth=bandwidth, latency=latency, seed=seed, requests=requests)
    choice, req = checked.policy, checked.requests
    num_layers, num_experts = trace.num_layers, trace.num_experts
    if prefetch is not None:
        prefetch.check(trace, req)
    scores = req.scores(trace, per_token=per_token) if choice.policy.needs_scores else None
    hits = np.zeros(num_layers, np.int64)  # per layer: memory independent of the trace's length
    events = np.zeros((req.num_steps if record_events else 0, num_layers, len(EVENT_COLUMNS)), np.int64)
    counts = np.zeros((len(PREFETCH_KEYS), num_layers), np.int64)
    batch_size = 0 if prefetch is None else len(prefetch.experts)
    outcomes = np.zeros(len(req.ids) + batch_size, np.int8) if record_outcomes else None
    if scope == "layer":
        sizes = np.ones(num_experts, np.int64)

        def one_layer(layer: int):
            keys, offsets = req.layer(layer)
            batch = None if prefetch is None else prefetch.layer(layer)
            layer_outcomes = None
            if record_outcomes:
                layer_outcomes = np.zeros(len(keys) + (0 if batch is None else len(batch[0])), np.int8)
            return (len(keys), layer_outcomes, *choice.run(
                keys, offsets, sizes, checked.layer_capacities[layer], checked.seed, batch, record_events,
                None if scores is None else req.layer_values(scores, layer), layer_outcomes))

        # a Python policy holds the GIL: threads would only add their overhead
        parallel = workers if choice.policy.compiled else 1
        for layer, (demand, layer_outcomes, layer_hits, layer_events, layer_counts) in enumerate(
                map_parallel(one_layer, num_layers, parallel)):
            hits[layer] = layer_hits.sum(dtype=np.int64)
            if record_outcomes:
                outcomes[req.layer_entries(layer)] = layer_outcomes[:demand]
                if prefetch is not None:
                    outcomes[len(req.ids) + prefetch.layer_entries(layer)[0]] = layer_outcomes[demand:]
            if record_events:
                events[:, layer] = layer_events
            if prefetch is not None:
                counts[:, layer] = layer_counts.sum(axis=1)
    else:
        keys, offsets = req.pooled()
        sizes = np.repeat(np.asarray(checked.units, np.int64), num_experts)
        pooled_hits, pooled_events, pooled_counts = choice.run(
            keys, offsets, sizes, checked.pool, checked.seed,
            None if prefetch is None else prefetch.pooled(num_experts), record_events, scores, outcomes)
        hits[:] = pooled_hits.reshape(-1, num_layers).sum(axis=0, dtype=np.int64)
        if record_events:
            events[:] = pooled_events.reshape(-1, num_layers, len(EVENT_COLUMNS))
        if prefetch is not None:
            counts[:] = pooled_counts.reshape(len(PREFETCH_KEYS), num_layers, num_experts).sum(axis=2)

    result = summarize(trace, req, hits, choice.label, scope, checked.capacity,
                       checked.memory_bytes, checked.bandwidth, checked.latency,
                       None if prefetch is None else counts)
    if record_events:
        import pandas as pd

        frame = pd.DataFrame(events.reshape(-1, len(EVENT_COLUMNS)), columns=list(EVENT_COLUMNS))
        frame.insert(0, "step", np.repeat(np.arange(req.num_steps), num_layers))
        frame.insert(1, "layer", np.tile(trace.layers, req.num_steps))
        result.events = frame
    if record_outcomes:
        result.outcomes, result.prefetch_outcomes = outcomes[:len(req.ids)], outcomes[len(req.ids):]
    return result


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
