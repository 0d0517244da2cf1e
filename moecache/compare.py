"""Baseline router against a ReMoE-style router, in the shape of the ReMoE paper's tables."""

from __future__ import annotations

import math
from collections.abc import Iterable

import pandas as pd

from .curve import curve
from .errors import MoecacheError
from .streaming import StreamedTrace, curve_stream
from .timeline import timeline, with_model_sizes
from .trace import Trace
from .units import bandwidth_profile
from .validate import check_policy, plan_range


def compare(
    base: Trace | StreamedTrace,
    remoe: Trace | StreamedTrace,
    *,
    capacities: str | Iterable[int] = (16,),
    policies: Iterable[str] = ("lru", "lfu", "opt"),
    scope: str = "layer",
    bandwidths: Iterable[str] = ("ufs4", "nvme4", "pcie4x16"),
    io_policy: str = "lru",
    compute_ms: float | None = None,
    per_token: bool = False,
    latency: str | float = 0.0,
    hardware: Iterable[str] = ("jetson-orin-nx-16gb",),
    model: str | None = None,
    dtype: str | None = None,
) -> pd.DataFrame:
    """One row per figure: ``metric``, ``policy``, ``capacity``, ``profile``, both values, changes.

    Figures: reuse rate; hit rate per policy and capacity; miss bytes per token; I/O
    time per token per bandwidth profile (under ``io_policy``: the replay's
    ``io_seconds``, miss bytes over the bandwidth plus ``latency`` per fetched expert);
    and, when the compute is known (a ``model`` profile, whose expert sizes then apply to
    every figure, or ``compute_ms``, the
    non-expert time per token, with the traces' own expert sizes), the predicted TPOT,
    tokens/s and decode speedup (base TPOT / ReMoE TPOT) on each ``hardware`` profile,
    from :func:`moecache.timeline` (overlapped I/O, no prefetch). ``capacities`` are
    integers or a text such as ``"16:64:16"`` (ranges stop where every expert fits),
    checked on both traces by :func:`moecache.validate.plan_range` before anything runs.
    Either trace may be streamed (:func:`moecache.streaming.open_stream`, with the same
    ``per_token``); decode time then needs them in memory.
    """
    if compute_ms is not None and not (math.isfinite(compute_ms) and compute_ms > 0):
        raise MoecacheError(f"compute time per token (--compute-ms) must be a finite number > 0, "
                            f"got {compute_ms}")
    timed = model is not None or compute_ms is not None
    hardware = list(hardware)
    if timed and not hardware:
        raise MoecacheError("--hardware names no profile: give one or more (moecache profiles lists them)")
    if timed and per_token:
        raise MoecacheError("decode time follows the traces' own steps: drop --per-token, or give neither "
                            "--model nor --compute-ms")
    streams = {id(t): t for t in (base, remoe) if isinstance(t, StreamedTrace)}
    if timed and streams:
        raise MoecacheError("decode time (--model or --compute-ms) needs the traces in memory: "
                            "give --no-stream, or neither --model nor --compute-ms")
    base, remoe = (t.header if isinstance(t, StreamedTrace) else t for t in (base, remoe))
    _check_compatible(base, remoe)
    if model is not None:  # every byte figure in the model's sizes
        base, remoe = (with_model_sizes(trace, model, dtype) for trace in (base, remoe))
    policies = list(dict.fromkeys([*policies, io_policy]))
    for policy in policies:
        check_policy(policy)
    sources = [next((t for t in streams.values() if t.header is trace), None) for trace in (base, remoe)]
    plans = [plan_range(trace, io_policy, scope, capacities=capacities, per_token=per_token,
                        latency=latency, requests=source)  # type: ignore[arg-type]
             for trace, source in zip((base, remoe), sources, strict=True)]
    capacities = plans[0].capacities
    profiles = [bandwidth_profile(b) for b in bandwidths]
    rows: list[dict] = []

    def add(metric, before, after, policy=None, capacity=None, profile=None, pp=False):
        # a rate with no denominator (the reuse of a one-step trace) is NaN, never None
        before, after = (float("nan") if value is None else value for value in (before, after))
        rows.append({"metric": metric, "policy": policy, "capacity": capacity, "profile": profile,
                     base_label: before, remoe_label: after,
                     "change": (after - before) / before if before else float("nan"),
                     "change_pp": 100 * (after - before) if pp else float("nan")})

    def curves(policy: str, bandwidth: float | None = None) -> list[pd.DataFrame]:
        return [(curve(p.trace, policy, scope, capacities=capacities, bandwidth=bandwidth, latency=p.latency,
                       requests=p.requests) if source is None else
                 curve_stream(source, policy, scope, capacities=capacities, bandwidth=bandwidth,
                              latency=p.latency)).set_index("capacity")
                for p, source in zip(plans, sources, strict=True)]

    base_label, remoe_label = _labels(base, remoe)
    by_policy = {policy: curves(policy) for policy in policies}
    add("reuse rate", *(c["reuse_rate"].iloc[0] for c in by_policy[io_policy]), pp=True)
    for policy in policies:
        for capacity in capacities:
            before, after = (c.loc[capacity] for c in by_policy[policy])
            add("hit rate", before["hit_rate"], after["hit_rate"], policy, capacity, pp=True)
    io = {label: curves(io_policy, speed) for label, speed in profiles}
    for capacity in capacities:
        before, after = (c.loc[capacity] for c in by_policy[io_policy])
        if pd.isna(before["bytes_per_token"]) or pd.isna(after["bytes_per_token"]):
            continue
        add("MiB per token", before["bytes_per_token"] / 2**20, after["bytes_per_token"] / 2**20,
            io_policy, capacity)
        for label, _ in profiles:
            io_before, io_after = (1e3 * c.loc[capacity, "io_seconds_per_token"] for c in io[label])
            add("I/O ms per token", io_before, io_after, io_policy, capacity, label)
    for box in hardware if timed else ():
        for capacity in capacities:
            before, after = (timeline(p.trace, box, io_policy, capacity, scope, model=model, dtype=dtype,
                                      dense_ms=compute_ms) for p in plans)
            add("TPOT ms", 1e3 * before.tpot_s, 1e3 * after.tpot_s, io_policy, capacity, box)
            add("tokens/s", before.tokens_per_s, after.tokens_per_s, io_policy, capacity, box)
            add("decode speedup", 1.0, before.tpot_s / after.tpot_s, io_policy, capacity, box)
    return pd.DataFrame(rows)


def _labels(base: Trace, remoe: Trace) -> tuple[str, str]:
    first = base.meta.get("router") or "base"
    second = remoe.meta.get("router") or "remoe"
    return (first, second) if first != second else (f"{first} (base)", f"{second} (remoe)")


def _check_compatible(base: Trace, remoe: Trace) -> None:
    for name in ("num_experts", "top_k", "num_layers"):
        if getattr(base, name) != getattr(remoe, name):
            raise MoecacheError(f"{base.source} and {remoe.source} differ in {name} "
                                f"({getattr(base, name)} vs {getattr(remoe, name)}): not the same model")
