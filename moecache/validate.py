"""The front door: every check of a simulation's inputs, in one place.

:func:`plan` (one replay: a capacity or a memory budget) and :func:`plan_range` (many
capacities: curves, sweeps, comparisons) check the trace, the policy, the scope, the
budget, the per-token choice, bandwidth, latency and seed, and resolve them into a
:class:`Plan` that the drivers (``replay``, ``curve``, ``sweep``, ``compare``,
``reroute``) run without checking again. Every error is one :class:`MoecacheError`
line naming the trace (when there is one) and the problem.

The valid capacities of a trace are those from its largest step set (a capacity below
it is an error, never a number: docs/semantics.md, "Caches") to ``top``, the capacity
from which every expert fits: E in layer scope, L x E in global scope. Ranges given as
text stop at ``top``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass, replace
from functools import reduce
from typing import Any

import numpy as np

from moecache.policies import Choice, resolve

from .errors import MoecacheError
from .requests import Requests
from .trace import Trace
from .units import (
    INT64_MAX,
    check_seed,
    format_bytes,
    parse_bandwidth,
    parse_bytes,
    parse_duration,
    parse_int_list,
)

SCOPES = ("layer", "global")


@dataclass(frozen=True, eq=False)
class Plan:
    """A checked configuration, resolved into what the kernels take.

    ``smallest`` and ``top`` bound the valid capacities (in experts). One replay
    (:func:`plan`) fills the budget fields: ``layer_capacities`` (layer scope: experts
    per layer) or ``pool`` and ``units`` (global scope: the pool and each layer's expert
    size in the same units: 1 per expert, or bytes over their greatest common divisor
    under a memory budget); ``capacity`` is the budget in experts where one number says
    it (None for a byte budget over experts of different sizes). Many capacities
    (:func:`plan_range`) fill ``capacities``.
    """

    trace: Trace
    policy: Choice
    scope: str
    requests: Requests
    smallest: int
    top: int
    bandwidth: float | None
    latency: float
    seed: int
    capacity: int | None = None
    memory_bytes: int | None = None
    layer_capacities: tuple[int, ...] | None = None
    pool: int | None = None
    units: tuple[int, ...] | None = None
    capacities: tuple[int, ...] | None = None

    @property
    def rows(self) -> np.ndarray:
        """``capacities`` clipped to ``top``: the row of a per-capacity table holding each
        (past ``top`` every expert fits and nothing changes)."""
        return np.minimum(np.asarray(self.capacities, np.int64), self.top)


def check_policy(policy: Any) -> Choice:
    """The validated policy choice (a name, a spec with parameters, a Choice or a
    PythonPolicy): :func:`moecache.policies.resolve`."""
    return resolve(policy)


def check_scope(scope: str) -> str:
    """``scope`` if it is ``layer`` or ``global``."""
    if scope not in SCOPES:
        raise MoecacheError(f"unknown scope {scope!r}: choose layer or global")
    return scope


def check_capacity(capacity: int) -> int:
    """``capacity`` if it is a whole number of experts from 1 to 2**63 - 1."""
    if not isinstance(capacity, (numbers.Integral, np.integer)) or isinstance(capacity, bool):
        raise MoecacheError(f"capacity must be a whole number of experts, got {capacity!r}")
    if not 0 < capacity <= INT64_MAX:
        raise MoecacheError(f"capacity must be positive and below 2**63, got {capacity}")
    return int(capacity)


def chosen_capacities(capacities: str | Iterable[int], top: int) -> list[int]:
    """Capacities from a text such as ``"8:64:4"`` (ranges stop at ``top``) or integers:
    each checked by :func:`check_capacity`, ascending, each once, at least one."""
    values = parse_int_list(capacities, high=top) if isinstance(capacities, str) else capacities
    chosen = sorted({check_capacity(c) for c in values})
    if not chosen:
        raise MoecacheError("capacities name no value: give at least one")
    return chosen


def top_capacity(trace: Trace, scope: str) -> int:
    """The capacity from which every expert fits: E (layer scope) or L x E (global scope)."""
    return trace.num_experts * (trace.num_layers if check_scope(scope) == "global" else 1)


def plan(
    trace: Trace,
    policy: Any = "lru",
    scope: str = "layer",
    *,
    capacity: int | None = None,
    memory: str | int | None = None,
    per_token: bool = False,
    bandwidth: str | float | None = None,
    latency: str | float = 0.0,
    seed: int = 0,
    requests: Requests | None = None,
) -> Plan:
    """Check one replay: exactly one of ``capacity`` (experts, per layer in layer scope)
    or ``memory`` (bytes: split evenly over the layers in layer scope, one pool in
    global scope; needs the trace's ``expert_bytes``), large enough for every step set."""
    if (capacity is None) == (memory is None):
        raise MoecacheError("give exactly one of capacity (experts) or memory (bytes)")
    base = _common(trace, policy, scope, per_token, bandwidth, latency, seed, requests)
    layers = trace.num_layers
    if capacity is not None:
        capacity = check_capacity(capacity)
        _check_step_sets(base, capacity)
        if scope == "layer":
            return replace(base, capacity=capacity, layer_capacities=(capacity,) * layers)
        return replace(base, capacity=capacity, pool=capacity, units=(1,) * layers)
    memory_bytes = parse_bytes(memory, "memory")
    if trace.expert_bytes is None:
        raise MoecacheError(f"{trace.source}: memory budgets need expert_bytes in the trace metadata")
    _check_memory(base, memory_bytes)
    sizes = [int(b) for b in trace.expert_bytes]
    if scope == "layer":
        caps = tuple(memory_bytes // layers // size for size in sizes)
        return replace(base, capacity=caps[0] if len(set(caps)) == 1 else None,
                       memory_bytes=memory_bytes, layer_capacities=caps)
    # sizes in units of their greatest common divisor, to keep counts small and exact
    divisor = reduce(math.gcd, sizes)
    units = tuple(size // divisor for size in sizes)
    pool = memory_bytes // divisor
    return replace(base, capacity=pool // units[0] if len(set(units)) == 1 else None,
                   memory_bytes=memory_bytes, pool=pool, units=units)


def plan_range(
    trace: Trace,
    policy: Any = "lru",
    scope: str = "layer",
    *,
    capacities: str | Iterable[int] | None = None,
    skip_invalid: bool = False,
    per_token: bool = False,
    bandwidth: str | float | None = None,
    latency: str | float = 0.0,
    seed: int = 0,
    requests: Requests | None = None,
) -> Plan:
    """Check a run at many capacities (ascending, each once in ``Plan.capacities``).

    ``capacities``: None (every valid one, ``smallest..top``), a text such as
    ``"8:64:4"`` (ranges stop at ``top``) or integers. A capacity below the largest step
    set is an error; with ``skip_invalid`` (sweeps over traces of different sizes) the
    capacities outside ``smallest..top`` are left out instead, which may leave none.
    """
    base = _common(trace, policy, scope, per_token, bandwidth, latency, seed, requests)
    if capacities is None:
        return replace(base, capacities=tuple(range(base.smallest, base.top + 1)))
    chosen = chosen_capacities(capacities, base.top)
    if skip_invalid:
        return replace(base, capacities=tuple(c for c in chosen if base.smallest <= c <= base.top))
    _check_step_sets(base, chosen[0])
    return replace(base, capacities=tuple(chosen))


def _common(trace: Trace, policy: Any, scope: str, per_token: bool, bandwidth: str | float | None,
            latency: str | float, seed: int, requests: Requests | None) -> Plan:
    """The checks every run shares, and the trace's capacity range."""
    if not isinstance(trace, Trace):
        raise MoecacheError(f"expected a moecache.Trace (load one with Trace.load), "
                            f"got {type(trace).__name__}")
    policy, top = check_policy(policy), top_capacity(trace, scope)
    if policy.policy.needs_scores and trace.weights is None:
        raise MoecacheError(f"{trace.source}: policy {policy.policy.name} needs router weights, "
                            "and the trace has none (capture or import them with the routing)")
    seed = check_seed(seed)
    bytes_per_second = None if bandwidth is None else parse_bandwidth(bandwidth)
    fetch_latency = parse_duration(latency)
    req = requests if requests is not None else Requests.from_trace(trace, per_token=per_token)
    smallest = int(req.layer_totals["largest"].max())
    return Plan(trace, policy, scope, req, smallest, top, bytes_per_second, fetch_latency, seed)


def _check_step_sets(base: Plan, capacity: int) -> None:
    """Reject a capacity (experts) below the largest step set, naming where it is."""
    if capacity >= base.smallest:
        return
    req = base.requests
    t, li = req.largest_set()
    raise MoecacheError(
        f"{base.trace.source}: capacity {capacity} is below the largest step set "
        f"({base.smallest} experts in layer {int(base.trace.layers[li])} at step {t}); "
        f"use a capacity >= {base.smallest}" + _per_token_hint(req))


def _check_memory(base: Plan, memory_bytes: int) -> None:
    """Reject a byte budget that cannot hold one request, in bytes and experts."""
    trace, req, layered = base.trace, base.requests, base.scope == "layer"
    sizes = trace.expert_bytes.tolist()
    largest = req.layer_totals["largest"].tolist()
    share = memory_bytes // trace.num_layers if layered else memory_bytes
    needed = [count * size for count, size in zip(largest, sizes, strict=True)]  # Python ints: no overflow
    if max(needed) <= share:
        return
    li = needed.index(max(needed))
    fits = share // sizes[li]
    split = f" split over {trace.num_layers} layers ({format_bytes(share)} each)" if layered else ""
    required = needed[li] * (trace.num_layers if layered else 1)
    raise MoecacheError(
        f"{trace.source}: memory {format_bytes(memory_bytes)}{split} holds "
        f"{'no expert' if fits == 0 else f'only {fits} experts'} of layer {int(trace.layers[li])} "
        f"({format_bytes(sizes[li])} each), whose largest step set needs {largest[li]}; "
        f"use a memory budget >= {format_bytes(required)}" + _per_token_hint(req))


def _per_token_hint(req: Requests) -> str:
    return " or per-token steps (--per-token)" if req.num_steps < req.num_tokens else ""
