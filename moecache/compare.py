"""Baseline router against a ReMoE-style router, in the shape of the ReMoE paper's tables."""

from __future__ import annotations

import math
from collections.abc import Iterable

import pandas as pd

from .curve import curve
from .errors import MoecacheError
from .trace import Trace
from .units import bandwidth_profile


def compare(
    base: Trace,
    remoe: Trace,
    *,
    capacities: Iterable[int] = (16,),
    policies: Iterable[str] = ("lru", "lfu", "opt"),
    scope: str = "layer",
    bandwidths: Iterable[str] = ("ufs4", "nvme4", "pcie4x16"),
    io_policy: str = "lru",
    compute_ms: float | None = None,
    per_token: bool = False,
) -> pd.DataFrame:
    """One row per figure: ``metric``, ``policy``, ``capacity``, ``bandwidth``, both values, changes.

    Figures: reuse rate; hit rate per policy and capacity; miss bytes per token; I/O
    time per token per bandwidth profile (under ``io_policy``); and, given the compute
    time of a token without I/O, the decode speedup (base time / ReMoE time, each
    ``compute + I/O`` with no overlap).
    """
    if compute_ms is not None and not (math.isfinite(compute_ms) and compute_ms > 0):
        raise MoecacheError(f"compute time per token (--compute-ms) must be a finite number > 0, "
                            f"got {compute_ms}")
    _check_compatible(base, remoe)
    capacities, policies = sorted(set(int(c) for c in capacities)), list(policies)
    profiles = [bandwidth_profile(b) for b in bandwidths]
    if io_policy not in policies:
        policies.append(io_policy)
    rows: list[dict] = []

    def add(metric, before, after, policy=None, capacity=None, bandwidth=None, pp=False):
        # a rate with no denominator (the reuse of a one-step trace) is NaN, never None
        before, after = (float("nan") if value is None else value for value in (before, after))
        rows.append({"metric": metric, "policy": policy, "capacity": capacity, "bandwidth": bandwidth,
                     base_label: before, remoe_label: after,
                     "change": (after - before) / before if before else float("nan"),
                     "change_pp": 100 * (after - before) if pp else float("nan")})

    base_label, remoe_label = _labels(base, remoe)
    curves = {policy: [curve(trace, policy, scope, capacities=capacities, per_token=per_token)
                       .set_index("capacity") for trace in (base, remoe)] for policy in policies}
    add("reuse rate", *(c["reuse_rate"].iloc[0] for c in curves[io_policy]), pp=True)
    for policy in policies:
        for capacity in capacities:
            before, after = (c.loc[capacity] for c in curves[policy])
            add("hit rate", before["hit_rate"], after["hit_rate"], policy, capacity, pp=True)
    for capacity in capacities:
        before, after = (c.loc[capacity] for c in curves[io_policy])
        if pd.isna(before["bytes_per_token"]) or pd.isna(after["bytes_per_token"]):
            continue
        add("MiB per token", before["bytes_per_token"] / 2**20, after["bytes_per_token"] / 2**20,
            io_policy, capacity)
        for label, speed in profiles:
            io_before = before["bytes_per_token"] / speed * 1e3
            io_after = after["bytes_per_token"] / speed * 1e3
            add("I/O ms per token", io_before, io_after, io_policy, capacity, label)
            if compute_ms is not None:
                add("decode speedup", 1.0, (compute_ms + io_before) / (compute_ms + io_after),
                    io_policy, capacity, label)
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
