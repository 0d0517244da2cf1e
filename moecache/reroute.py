"""Offline rerouting: emulate a reuse-biased router from the router scores of a trace.

Walking the trace step by step, every token's scores in every MoE layer get ``bias``
(in router-logit units) added for the experts that are *favoured*, and the top K of the
biased scores become the new routing (ties -> smallest id). Two notions of favoured:

* ``recent`` (ReMoE-like): experts the new routing used in the same layer within the
  previous ``window`` steps (trace order);
* ``cache`` (cache-aware routing, as in "Mixture of Cache-Conditional Experts"):
  experts resident in a simulated per-layer LRU cache of ``capacity`` experts, fed with
  the new routing under the semantics of docs/semantics.md.

The cache mode keeps its own small LRU (:func:`_lru_admit`) rather than the ``lru``
policy kernel: routing step t needs the residents after step t - 1, and the new routing
of step t decides what step t + 1 sees, so the cache must advance one step at a time
inside the routing loop. The policy kernels replay a whole, known request stream in one
call and expose no state between steps; calling one per step would cost O(T^2). The
tests check this LRU against the slow reference's semantics (tests/test_reroute.py).

History only comes from earlier steps, never from tokens of the same step. Fidelity
compares the new routing with the original: ``overlap`` is the mean share of a token's
original K experts that are kept, and ``gate_mass`` the mean share of the original
top-K softmax mass (softmax of the scores over all E) that the new top-K carries.
New gate weights are that softmax over the new experts, scaled to the original
weights' total (or to 1 when the trace has none).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass

import numpy as np
from numba import njit

from .errors import MoecacheError
from .trace import Trace
from .units import INT64_MAX
from .validate import check_capacity

MODES = ("recent", "cache")


@dataclass
class Fidelity:
    """How close the rerouted trace stays to the original routing."""

    overlap: float
    gate_mass: float


@njit(cache=True)
def _top_k(scores, top_k, out):
    """The K largest scores' ids in descending order (ties -> smallest id), into ``out``."""
    taken = np.zeros(scores.shape[0], np.bool_)
    for k in range(top_k):
        best = -1
        for e in range(scores.shape[0]):
            if not taken[e] and (best < 0 or scores[e] > scores[best]):
                best = e
        taken[best] = True
        out[k] = best


@njit(cache=True)
def _reroute(logits, step_starts, top_k, bias, window, capacity, cache_mode):
    num_tokens, num_layers, num_experts = logits.shape
    routed = np.empty((num_tokens, num_layers, top_k), np.int16)
    last_use = np.full((num_layers, num_experts), -(2**40), np.int64)  # step, new routing
    resident = np.zeros((num_layers, num_experts), np.bool_)
    scores = np.empty(num_experts, np.float64)
    for t in range(step_starts.shape[0] - 1):
        oldest = max(t - window, 0)  # never-used experts (last_use < 0) are never favoured
        for n in range(step_starts[t], step_starts[t + 1]):
            for layer in range(num_layers):
                for e in range(num_experts):
                    favoured = resident[layer, e] if cache_mode else last_use[layer, e] >= oldest
                    scores[e] = logits[n, layer, e] + (bias if favoured else 0.0)
                _top_k(scores, top_k, routed[n, layer])
        for layer in range(num_layers):
            for n in range(step_starts[t], step_starts[t + 1]):
                for k in range(top_k):
                    last_use[layer, routed[n, layer, k]] = t
            if cache_mode:
                _lru_admit(resident[layer], last_use[layer], t, capacity)
    return routed


@njit(cache=True)
def _lru_admit(resident, last_use, t, capacity):
    """Admit the experts used at step ``t``; evict least recent (ties: smallest id)."""
    count = 0
    for e in range(resident.shape[0]):
        if last_use[e] == t:
            resident[e] = True
        count += resident[e]
    while count > capacity:
        victim = -1
        for e in range(resident.shape[0]):
            if resident[e] and last_use[e] < t and (victim < 0 or last_use[e] < last_use[victim]):
                victim = e
        if victim < 0:
            raise ValueError("a step uses more experts than the cache holds")
        resident[victim] = False
        count -= 1


def _softmax(logits: np.ndarray) -> np.ndarray:
    scores = logits.astype(np.float32)
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    return scores


def check_bias(mode: str, bias: float, window: int, capacity: int | None, top_k: int) -> None:
    """One-line errors for rerouting settings that make no sense."""
    if mode not in MODES:
        raise MoecacheError(f"unknown reroute mode {mode!r}: choose recent or cache")
    if not isinstance(bias, numbers.Real) or isinstance(bias, bool) or not math.isfinite(bias):
        raise MoecacheError(f"bias must be a finite number, got {bias!r}")
    if not isinstance(window, numbers.Integral) or isinstance(window, bool) or not 1 <= window <= INT64_MAX:
        raise MoecacheError(f"window must be from 1 to 2**63 - 1 steps, a whole number, got {window!r}")
    if mode == "recent" and capacity is not None:
        raise MoecacheError("a capacity only applies to cache-aware rerouting (mode cache); "
                            "recent mode uses the window")
    if mode == "cache" and (capacity is None or check_capacity(capacity) < top_k):
        raise MoecacheError(f"cache-aware rerouting needs a capacity >= K = {top_k}, got {capacity}")


def route_sequence(logits: np.ndarray, top_k: int, *, mode: str = "recent", bias: float = 1.0,
                   window: int = 1, capacity: int | None = None) -> np.ndarray:
    """The rerouted top K (T, K) of one layer over one sequence of T tokens, each its own
    step, from its router scores (T, E): the rule of :func:`reroute`, for a model that
    routes online one layer at a time (``moecache.remoe.biased_routing``)."""
    check_bias(mode, bias, window, capacity, top_k)
    steps = np.arange(logits.shape[0] + 1, dtype=np.int64)
    return _reroute(np.ascontiguousarray(logits, np.float32)[:, None, :], steps, top_k, float(bias),
                    int(window), int(capacity or 0), mode == "cache")[:, 0]


def rerouted_weights(probs: np.ndarray, new: np.ndarray, total: np.ndarray | float) -> np.ndarray:
    """Gate weights of the new experts ``new`` (..., K): their softmax probabilities
    ``probs`` (..., E), scaled to ``total`` (the original weights' sum, or 1)."""
    picked = np.take_along_axis(probs, new.astype(np.int64), axis=-1)
    return picked / picked.sum(axis=-1, keepdims=True) * total


def reroute(
    trace: Trace,
    *,
    mode: str = "recent",
    bias: float = 1.0,
    window: int = 1,
    capacity: int | None = None,
    label: str | None = None,
) -> tuple[Trace, Fidelity]:
    """A rerouted copy of ``trace`` (it must carry router scores) and its fidelity."""
    if trace.logits is None:
        raise MoecacheError(f"{trace.source}: no router scores (logits) in this trace; "
                            "capture it with --save-logits to reroute")
    check_bias(mode, bias, window, capacity, trace.top_k)
    try:
        routed = _reroute(trace.logits.astype(np.float32), trace.step_starts(), trace.top_k,
                          float(bias), int(window), int(capacity or 0), mode == "cache")
    except ValueError:
        raise MoecacheError(f"{trace.source}: a step uses more than {capacity} experts in one "
                            "layer; use a larger capacity") from None
    probs = _softmax(trace.logits)
    original = trace.experts.astype(np.int64)
    new = routed.astype(np.int64)
    kept_mass = np.take_along_axis(probs, new, axis=2).sum(axis=2)
    old_mass = np.take_along_axis(probs, original, axis=2).sum(axis=2)
    overlap = (new[..., :, None] == original[..., None, :]).any(axis=3).mean()
    scale = trace.weights.sum(axis=2, keepdims=True) if trace.weights is not None else 1.0
    weights = rerouted_weights(probs, new, scale)
    fidelity = Fidelity(overlap=float(overlap), gate_mass=float((kept_mass / old_mass).mean()))
    meta = {**trace.meta, "router": label or f"rerouted-{mode}",
            "reroute": {"mode": mode, "bias": bias, "window": window, "capacity": capacity,
                        "source": trace.source, "source_router": trace.meta.get("router"),
                        **asdict(fidelity)}}
    rerouted = Trace(experts=routed, step=trace.step, seq=trace.seq, pos=trace.pos,
                     token_id=trace.token_id, phase=trace.phase, meta=meta,
                     weights=weights.astype(np.float32), logits=trace.logits)
    return rerouted, fidelity
