"""Decode time from a trace: the cache's outcome (a replay, with prefetches and memory tiers)
laid on a timeline of compute and I/O (docs/semantics.md, "Timeline").

``timeline`` checks its inputs, replays the cache once to learn every expert's outcome,
sends each fetch to the tier that holds it, and runs the event walk of
:mod:`moecache.timeline_engine`; :class:`TimelineResult` explains the result.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import reduce
from typing import TYPE_CHECKING, Any

import numpy as np

from moecache.policies import Choice
from moecache.policies import resolve as resolve_policy
from moecache.policies.driver import HIT, MISS, PREFETCH_HIT

from . import prefetchers, profiles
from .errors import MoecacheError
from .replay import replay
from .requests import Requests
from .splits import split_by_sequence
from .timeline_engine import RESIDENT, simulate
from .trace import Trace
from .units import INT64_MAX, format_bytes

if TYPE_CHECKING:
    import pandas as pd

MISS_HANDLING = ("fetch", "host")
# bytes per weight of the dtypes a trace's metadata may name
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


@dataclass(frozen=True)
class Costs:
    """Seconds of compute: non-expert work per token (FLOP part, split evenly over the MoE
    layers) and per step (weight reads), and each routed expert's FLOPs and bytes."""

    dense_flops: float  # FLOPs per token outside routed experts
    dense_bytes: float  # non-expert weight bytes read once per step
    expert_flops: float  # FLOPs per token routed to an expert
    expert_bytes: np.ndarray  # bytes of one expert per MoE layer (int64)
    dense_seconds: float | None = None  # a given non-expert time per token, instead of the two above


@dataclass
class TimelineResult:
    """Predicted decode time; ``to_dict`` gives the JSON keys."""

    policy: str
    scope: str
    capacity: int | None
    memory_bytes: int | None
    hardware: str
    model: str | None
    prefetch: str | None
    depth: int
    budget: int
    overlap: bool
    miss: str
    steps: int
    tokens: int
    decode_steps: int
    total_s: float
    tpot_s: float
    tpot_p50_s: float
    tpot_p95_s: float
    tokens_per_s: float
    stall_s: float
    stall_share: float
    io_busy_share: float
    hits: int
    misses: int
    demand_bytes_per_token: float
    prefetch_bytes_per_token: float
    prefetched: int
    prefetch_used: int
    wasted_bytes: int
    tier_hits: dict[str, int]
    links: list[dict[str, Any]]
    per_layer: pd.DataFrame = field(repr=False)
    step_seconds: np.ndarray = field(repr=False)
    ends: np.ndarray = field(repr=False)  # end time of every (step, layer) position, step-major
    events: pd.DataFrame | None = field(default=None, repr=False)  # with record=True: every span

    @property
    def hit_rate(self) -> float:
        return self.hits / (self.hits + self.misses) if self.hits + self.misses else math.nan

    @property
    def prefetch_accuracy(self) -> float:
        """Share of prefetched experts used before their eviction."""
        return self.prefetch_used / self.prefetched if self.prefetched else math.nan

    def to_dict(self) -> dict[str, Any]:
        keys = ("policy", "scope", "capacity", "memory_bytes", "hardware", "model", "prefetch", "depth",
                "budget", "overlap", "miss", "steps", "tokens", "decode_steps", "total_s", "tpot_s",
                "tpot_p50_s", "tpot_p95_s", "tokens_per_s", "stall_s", "stall_share", "io_busy_share",
                "hits", "misses", "hit_rate", "demand_bytes_per_token", "prefetch_bytes_per_token",
                "prefetched", "prefetch_used", "prefetch_accuracy", "wasted_bytes", "tier_hits", "links")
        out = {k: getattr(self, k) for k in keys}
        out["per_layer_stall_s"] = [float(x) for x in self.per_layer["stall_s"]]
        return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in out.items()}


def costs_for(trace: Trace, model: profiles.Model | None, dtype: str | None,
              dense_seconds: float | None) -> Costs:
    """The compute figures of ``trace``: from ``model`` (its sizes in ``dtype``) when given,
    else the trace's expert bytes and dtype plus ``dense_seconds`` per token."""
    if model is not None:
        dtype = dtype or model.native_dtype
        return Costs(model.non_expert_flops, float(model.non_expert_bytes(dtype)), model.expert_flops,
                     np.full(trace.num_layers, model.expert_bytes(dtype), np.int64), dense_seconds)
    if dtype is not None:
        raise MoecacheError("--dtype chooses a model profile's stored type: give --model too")
    if trace.expert_bytes is None:
        raise MoecacheError(f"{trace.source}: the trace has no expert_bytes in its metadata: "
                            "give a model profile (--model) for the expert sizes")
    width = DTYPE_BYTES.get(str(trace.meta.get("dtype")))
    if width is None:
        raise MoecacheError(f"{trace.source}: cannot tell the FLOPs of an expert from dtype "
                            f"{trace.meta.get('dtype')!r}: give a model profile (--model)")
    if dense_seconds is None:
        raise MoecacheError(f"{trace.source}: the non-expert compute per token is unknown without a model "
                            "profile: give --model or --dense-ms")
    sizes = trace.expert_bytes
    if len(set(sizes.tolist())) > 1:
        raise MoecacheError(f"{trace.source}: experts of different sizes per layer need a model profile "
                            "(--model) for their FLOPs")
    return Costs(0.0, 0.0, 2.0 * int(sizes[0]) / width, sizes.astype(np.int64), dense_seconds)


def with_model_sizes(trace: Trace, model: str | profiles.Model, dtype: str | None = None) -> Trace:
    """``trace`` with every layer's ``expert_bytes`` set to one expert of ``model`` (a profile
    or its name) stored as ``dtype`` (default: the model's native type)."""
    spec = model if isinstance(model, profiles.Model) else profiles.model(model)
    size = spec.expert_bytes(dtype or spec.native_dtype)
    return replace(trace, meta={**trace.meta, "expert_bytes": [size] * trace.num_layers})


def timeline(
    trace: Trace,
    hardware: str | profiles.Hardware,
    policy: Any = "lru",
    capacity: int | None = None,
    scope: str = "layer",
    *,
    memory: str | int | None = None,
    model: str | profiles.Model | None = None,
    dtype: str | None = None,
    dense_ms: float | None = None,
    prefetch: str | None = None,
    depth: int = 1,
    budget: int | None = None,
    overlap: bool = True,
    miss: str = "fetch",
    tiers: bool | Sequence[profiles.Tier] = False,
    tier_policy: str = "lru",
    train_fraction: float | None = None,
    seed: int = 0,
    record: bool = False,
) -> TimelineResult:
    """Predict decode time on ``hardware`` (a profile name, a TOML path or a Hardware).

    The cache (``policy``, ``capacity`` experts or ``memory`` bytes, ``scope``) is fast
    memory; misses come over the hardware's link, or with ``tiers`` from the first lower
    tier holding them (the profile's tiers, or the given ones; each below the first is a
    ``tier_policy`` cache of its capacity, the last holds every expert). ``model`` (a profile)
    gives the expert sizes in ``dtype`` and the compute figures; without it the trace's
    expert bytes and dtype are used and ``dense_ms`` gives the non-expert time per token.
    ``prefetch`` names a prefetcher (``moecache.prefetchers.REGISTRY``) issuing ``budget``
    experts (default: top_k) ``depth`` MoE layers ahead. ``miss="host"`` computes misses
    on the host CPU. ``train_fraction`` splits the trace by sequence: prefetchers learn on
    the training part and every figure comes from the test part (caches warm). ``record``
    fills ``events``: every span of compute and transfer (for :func:`moecache.plots.
    timeline_figure`).
    """
    import pandas as pd

    box = hardware if isinstance(hardware, profiles.Hardware) else profiles.hardware(hardware)
    spec = model if isinstance(model, profiles.Model) or model is None else profiles.model(model)
    lower = resolve_policy(tier_policy)  # checked before any work, tiers or not
    if lower.policy.needs_scores:
        raise MoecacheError(f"tier policy {lower.policy.name} reads router weights, which the fetches a "
                            "lower tier sees do not carry: choose another --tier-policy")
    if miss not in MISS_HANDLING:
        raise MoecacheError(f"miss handling must be one of {', '.join(MISS_HANDLING)}, got {miss!r}")
    if dense_ms is not None and not (math.isfinite(dense_ms) and dense_ms >= 0):
        raise MoecacheError(f"non-expert time per token (--dense-ms) must be a finite number >= 0, "
                            f"got {dense_ms}")
    dense_seconds = None if dense_ms is None else dense_ms / 1e3
    costs = costs_for(trace, spec, dtype, dense_seconds)
    if spec is not None:  # the model's sizes for memory budgets too
        trace = with_model_sizes(trace, spec, dtype)
    train_steps = 0
    learns = prefetch is not None and prefetchers.resolve(prefetch).needs_training
    if train_fraction is not None or learns:
        split = split_by_sequence(trace, 0.5 if train_fraction is None else train_fraction, seed)
        trace, train_steps = split.trace, split.train_steps()
    req = Requests.from_trace(trace)
    budget = trace.top_k if budget is None else budget
    batches = None
    if prefetch is not None:
        for name, value in (("depth", depth), ("budget", budget)):
            if isinstance(value, bool) or not isinstance(value, int) or value > INT64_MAX:
                raise MoecacheError(f"prefetch {name} must be a whole number below 2**63, got {value!r}")
        scores = req.scores(trace) if trace.weights is not None else None  # prefetchers rank by them
        view = prefetchers.Lookahead(req, scores, depth, budget, train_steps, trace)
        batches = prefetchers.plan(prefetch, view)
    links, names, capacities = _links(box, tiers, trace)  # checked before the replay
    result = replay(trace, policy, capacity, scope, memory=memory, seed=seed, requests=req,
                    prefetch=batches, record_outcomes=True)
    num_layers, positions = trace.num_layers, len(req.offsets) - 1
    keys = req.pooled()[0].astype(np.int64)  # layer x E + expert
    entry_position = np.repeat(np.arange(positions), np.diff(req.offsets))
    if batches is None:
        batch_keys = batch_position = np.zeros(0, np.int64)
        batch_offsets = np.zeros(positions + 1, np.int64)
    else:
        batch_keys, batch_position, batch_offsets = batches.inserted(result.prefetch_outcomes,
                                                                     trace.num_experts)
    demand_source, batch_source, tier_hits = _sources(
        trace, result.outcomes == MISS, keys, entry_position, batch_keys, batch_position, names, capacities,
        lower, seed)
    tokens = req.step_tokens(trace)
    entry_step_tokens = req.token_counts(trace).astype(np.float64)
    entry_bytes = costs.expert_bytes[entry_position % num_layers]
    batch_bytes = costs.expert_bytes[batch_position % num_layers]
    compute = np.maximum(entry_step_tokens * costs.expert_flops / box.flops,
                         entry_bytes / box.memory_bandwidth)
    host = np.maximum(entry_step_tokens * costs.expert_flops / box.host_flops,
                      entry_bytes / box.host_memory_bandwidth)
    position_tokens = np.repeat(tokens, num_layers).astype(np.float64)
    if costs.dense_seconds is not None:
        dense = position_tokens * costs.dense_seconds / num_layers
    else:
        weights = np.full(len(position_tokens), costs.dense_bytes / box.memory_bandwidth)
        dense = np.maximum(position_tokens * costs.dense_flops / box.flops, weights) / num_layers
    ends, stalls, busy, spans, batch_spans = simulate(
        dense, req.offsets, keys, compute, host, entry_bytes, demand_source,
        batch_offsets, batch_keys, batch_bytes, batch_source, depth if batches is not None else 0,
        np.array([link.bandwidth for link in links]), np.array([link.latency for link in links]),
        # more slots than transfers are never used: a deep queue costs no memory
        np.array([min(link.queue_depth, len(keys) + len(batch_keys)) for link in links], np.int64),
        overlap, miss == "host",
        num_layers * trace.num_experts, train_steps * num_layers, record)
    first = train_steps * num_layers  # the first scored position
    scored_entry, scored_batch = entry_position >= first, batch_position >= first
    link_table = [{"name": name, "bandwidth": link.bandwidth, "latency": link.latency,
                   "queue_depth": link.queue_depth,
                   "demand_bytes": int(entry_bytes[scored_entry & (demand_source == k)].sum()),
                   "prefetch_bytes": int(batch_bytes[scored_batch & (batch_source == k)].sum()),
                   "busy_s": float(busy[k])} for k, (name, link) in enumerate(zip(names, links, strict=True))]
    outcomes = result.outcomes[scored_entry]
    used = int((outcomes == PREFETCH_HIT).sum())
    prefetched = int(scored_batch.sum())
    layer_of_entry = entry_position[scored_entry] % num_layers
    per_layer = pd.DataFrame({
        "layer": trace.layers,
        "hits": np.bincount(layer_of_entry, outcomes != MISS, num_layers).astype(np.int64),
        "misses": np.bincount(layer_of_entry, outcomes == MISS, num_layers).astype(np.int64),
        "stall_s": stalls[first:].reshape(-1, num_layers).sum(axis=0),
    })
    step_end = ends[num_layers - 1::num_layers]
    start = step_end[train_steps - 1] if train_steps else 0.0
    step_seconds = np.diff(np.concatenate([[start], step_end[train_steps:]]))
    step_tokens = tokens[train_steps:]
    decode = step_tokens == 1
    per_token = step_seconds[decode] if decode.any() else step_seconds / step_tokens
    total = float(step_end[-1] - start)
    test_tokens = int(step_tokens.sum())
    stall = float(stalls[first:].sum())
    events = None
    if record:
        events = _events(trace, (keys, entry_position, demand_source), dense, ends, spans, miss,
                         (batch_keys, batch_source, batch_position), batch_spans, names)
    return TimelineResult(
        policy=result.policy, scope=scope, capacity=result.capacity, memory_bytes=result.memory_bytes,
        hardware=box.name, model=None if spec is None else spec.name, prefetch=prefetch,
        depth=depth, budget=budget, overlap=overlap, miss=miss, steps=len(step_tokens), tokens=test_tokens,
        decode_steps=int(decode.sum()), total_s=total, tpot_s=float(per_token.mean()),
        tpot_p50_s=float(np.percentile(per_token, 50)), tpot_p95_s=float(np.percentile(per_token, 95)),
        tokens_per_s=test_tokens / total if total > 0 else math.inf, stall_s=stall,
        stall_share=stall / total if total > 0 else 0.0,
        io_busy_share=float(busy.max() / total) if total > 0 else 0.0,
        hits=int((outcomes != MISS).sum()), misses=int((outcomes == MISS).sum()),
        demand_bytes_per_token=sum(row["demand_bytes"] for row in link_table) / test_tokens,
        prefetch_bytes_per_token=sum(row["prefetch_bytes"] for row in link_table) / test_tokens,
        prefetched=prefetched, prefetch_used=used,
        wasted_bytes=int(batch_bytes[scored_batch].sum()) - _used_bytes(outcomes, entry_bytes[scored_entry]),
        tier_hits={"fast memory": int((outcomes != MISS).sum()), **tier_hits},
        links=link_table, per_layer=per_layer, step_seconds=step_seconds, ends=ends, events=events)


def _events(trace: Trace, entries: tuple[np.ndarray, ...], dense: np.ndarray, ends: np.ndarray,
            spans: np.ndarray, miss: str, batch_entries: tuple[np.ndarray, ...],
            batch_spans: np.ndarray, names: list[str]) -> pd.DataFrame:
    """Every span of the walk: resource (device, host or a link), kind, step, layer, expert,
    start, end (seconds). ``entries``: (key, position, source) of each demand entry;
    ``batch_entries``: (key, source, position) of each inserted prefetch entry."""
    import pandas as pd

    num_layers, num_experts = trace.num_layers, trace.num_experts
    positions = np.arange(len(ends))
    starts = np.concatenate([[0.0], ends[:-1]])
    keys, entry_position, source = entries
    on_host = (source >= 0) & (miss == "host")
    fetched = source >= 0
    batch_keys, batch_source, batch_position = batch_entries
    parts = [
        pd.DataFrame({"resource": "device", "kind": "dense", "position": positions, "expert": -1,
                      "start": starts, "end": starts + dense}),
        pd.DataFrame({"resource": np.where(on_host, "host", "device"), "kind": "expert",
                      "position": entry_position, "expert": keys % num_experts,
                      "start": spans[:, 0], "end": spans[:, 1]}),
        pd.DataFrame({"resource": np.array(names, dtype=object)[source[fetched]], "kind": "demand fetch",
                      "position": entry_position[fetched], "expert": keys[fetched] % num_experts,
                      "start": spans[fetched, 2], "end": spans[fetched, 3]}),
        pd.DataFrame({"resource": np.array(names, dtype=object)[batch_source], "kind": "prefetch",
                      "position": batch_position, "expert": batch_keys % num_experts,
                      "start": batch_spans[:, 0], "end": batch_spans[:, 1]}),
    ]
    frame = pd.concat(parts, ignore_index=True)
    position = frame.pop("position").to_numpy()
    frame.insert(2, "step", position // num_layers)
    frame.insert(3, "layer", trace.layers[position % num_layers])
    return frame.sort_values(["start", "resource"], kind="stable", ignore_index=True)


def _used_bytes(outcomes: np.ndarray, sizes: np.ndarray) -> int:
    """Bytes of the prefetched experts that a demand used."""
    return int(sizes[outcomes == PREFETCH_HIT].sum())


def _links(box: profiles.Hardware, tiers: bool | Sequence[profiles.Tier], trace: Trace
           ) -> tuple[list[profiles.Link], list[str], list[int | None]]:
    """The links misses come over, their names and the capacities of their tiers: the
    hardware's link (the store behind it holds every expert), or one per tier."""
    if tiers is False:
        return [box.link], ["link"], [None]
    chosen = list(box.tiers) if tiers is True else list(tiers)
    if not chosen:
        raise MoecacheError(f"hardware {box.name} lists no memory tiers below fast memory")
    every = trace.num_experts * int(trace.expert_bytes.astype(object).sum())
    if chosen[-1].capacity_bytes < every:
        last = chosen[-1]
        raise MoecacheError(f"the last memory tier, {last.name} ({format_bytes(last.capacity_bytes)}), "
                            f"must hold every expert ({format_bytes(every)})")
    return [t.link for t in chosen], [t.name for t in chosen], [t.capacity_bytes for t in chosen]


def _sources(trace: Trace, fetch: np.ndarray, keys: np.ndarray, entry_position: np.ndarray,
             batch_keys: np.ndarray, batch_position: np.ndarray, names: list[str],
             capacities: list[int | None], lower: Choice, seed: int
             ) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Which link serves each fetch (the demand entries where ``fetch``, then every inserted
    prefetch entry). Returns (source per demand entry: RESIDENT or a link, link per
    prefetch entry, fetches served per tier).

    Every tier but the last is a cache of its own (policy ``lower``, its capacity in bytes,
    one pool) whose requests at each position are the fetches the tiers above it did not
    serve, ascending key; the last tier holds every expert.
    """
    num_experts = trace.num_experts
    positions = int(entry_position[-1]) + 1 if len(entry_position) else 0  # every position has entries
    # every fetch in one list: demand entries first, then prefetch entries
    fetch_keys = np.concatenate([keys[fetch], batch_keys])
    fetch_position = np.concatenate([entry_position[fetch], batch_position])
    tier = np.full(len(fetch_keys), len(names) - 1, np.int64)
    served: dict[str, int] = {}
    sizes = np.repeat(trace.expert_bytes.astype(np.int64), num_experts)
    divisor = reduce(math.gcd, (int(b) for b in trace.expert_bytes))
    waiting = np.arange(len(fetch_keys))
    for k, (name, capacity) in enumerate(zip(names[:-1], capacities, strict=False)):
        order = waiting[np.lexsort((fetch_keys[waiting], fetch_position[waiting]))]
        counts = np.bincount(fetch_position[order], minlength=positions)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        need = np.add.reduceat(sizes[fetch_keys[order]], offsets[:-1]) if len(order) else np.zeros(1)
        need = np.where(counts > 0, need, 0)
        if capacity < need.max(initial=0):
            raise MoecacheError(f"memory tier {name} ({format_bytes(capacity)}) cannot hold the fetches of "
                                f"one layer ({format_bytes(int(need.max(initial=0)))})")
        hit = np.zeros(len(order), np.int8)
        lower.run(fetch_keys[order].astype(np.int32), offsets, sizes // divisor,
                                        capacity // divisor, seed, outcomes=hit)
        tier[order[hit == HIT]] = k
        served[name] = int((hit == HIT).sum())
        waiting = order[hit != HIT]
    served[names[-1]] = len(waiting)
    demand_source = np.full(len(fetch), RESIDENT, np.int64)
    demand_source[fetch] = tier[:int(fetch.sum())]
    return demand_source, tier[int(fetch.sum()):], served
