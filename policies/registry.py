"""The records a policy module declares, and the parsing of a policy choice.

Each policy module defines one module-level ``POLICY = Policy(...)``; the package
collects them into ``REGISTRY`` (``policies/__init__.py``). The hooks' contract is the
"Kernel contract" section of docs/semantics.md.
"""

from __future__ import annotations

import math
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from numba import njit

from moecache.errors import MoecacheError

from .driver import drive, new_cache, serve

ADMISSIONS = ("demand", "bypass")
STACKS = ("lru", "lfu", "opt")  # the one-pass curve methods of stack.py


class Hooks(NamedTuple):
    """A policy's numba-compiled hooks (or plain Python callables, for PythonPolicy)."""

    init: Callable
    access: Callable
    admit: Callable
    victim: Callable
    evict: Callable
    keep: Callable


@njit(cache=True)
def always_keep(state, key, now, resident, pinned, mark):
    """``keep`` of every demand-admission policy: each miss is cached."""
    return True


@njit(cache=True)
def no_access(state, key, now, hit):
    """``access`` of a policy that ignores demand uses (FIFO)."""


@njit(cache=True)
def no_admit(state, key, now):
    """``admit`` of a policy that ignores insertions."""


@njit(cache=True)
def no_evict(state, key):
    """``evict`` of a policy whose state needs no update when a key leaves."""


@njit(cache=True)
def same_state(state, keys, offsets, scores, params, first, first_entry, total, future):
    """``resume`` of a policy whose state never looks at the stream: nothing to do."""
    return state


class SpanKernel(NamedTuple):
    """A fast kernel that serves a stream a span at a time (the streaming replay):
    ``new(num_keys) -> state`` and ``serve(state, keys, offsets, sizes, capacity, first,
    future) -> hits per request`` (requests numbered from ``first``; ``future`` as for
    ``resume``, for a policy with ``needs_future``). Equal to the hooks, like ``kernel``."""

    new: Callable
    serve: Callable


@dataclass(frozen=True)
class Param:
    """One numeric parameter of a policy, passed to its hooks in a float64 array."""

    name: str
    default: float
    low: float
    high: float
    doc: str
    integer: bool = False

    def describe(self) -> str:
        kind = "integer" if self.integer else "number"
        bounds = f"{kind} in [{number(self.low)}, {number(self.high)}]"
        return f"`{self.name}`={number(self.default)} ({bounds}): {self.doc}"


@dataclass(frozen=True, eq=False)
class Policy:
    """A registered policy.

    ``kernel`` is an optional specialised simulator ``(keys, offsets, sizes, capacity, params,
    seed[, scores]) -> hits`` for plain demand replays (``scores`` for a policy with
    ``needs_scores``; with ``unit_kernel``, only of streams whose keys
    all have size 1); everything else (prefetch, events, byte budgets for a unit kernel) runs
    ``hooks`` through ``policies.driver.drive``. ``needs_scores`` marks a policy whose hooks read
    the router weight of each request (``init``'s ``scores``; a trace without weights is
    refused).
    ``resume(state, keys, offsets, scores, params, first, first_entry, total, future) -> state``
    lets the streaming replay serve a stream in spans: it is called before each span (its
    requests numbered from ``first``, its entries from ``first_entry``, of ``total``
    requests in all) with the span's arrays, after ``init`` was given an empty stream; a
    policy whose hooks read the stream (its future, its length, its scores) updates its
    state there. ``needs_future`` asks for ``future``: for each entry, the next request
    holding its key (``total`` if none). Policies that never read the stream keep the
    default, :func:`same_state`. ``spans``, optional, serves spans faster than the hooks.
    ``stack`` names the one-pass curve method (``STACKS``) of a stack algorithm. ``rank``
    orders lists, tables and plot legends (online policies first, offline bounds last,
    then by name); ``style`` holds matplotlib line keywords and ``legend`` a longer label.
    """

    name: str
    description: str
    hooks: Hooks
    kernel: Callable | None = None
    unit_kernel: bool = False
    needs_scores: bool = False
    admission: str = "demand"
    stack: str | None = None
    params: tuple[Param, ...] = ()
    resume: Callable = same_state
    needs_future: bool = False
    spans: SpanKernel | None = None
    style: Mapping[str, Any] = field(default_factory=dict)
    legend: str = ""
    rank: int = 50
    source: str = ""

    def __post_init__(self) -> None:
        if self.admission not in ADMISSIONS:
            raise ValueError(f"policy {self.name}: admission must be one of {ADMISSIONS}")
        if self.stack is not None and self.stack not in STACKS:
            raise ValueError(f"policy {self.name}: stack must be None or one of {STACKS}")
        names = [p.name for p in self.params]
        if len(set(names)) != len(names):
            raise ValueError(f"policy {self.name}: repeated parameter names {names}")
        for p in self.params:
            if not p.low <= p.default <= p.high:
                raise ValueError(f"policy {self.name}: default of {p.name} outside its range")

    @property
    def compiled(self) -> bool:
        """Whether the hooks are numba dispatchers (PythonPolicy hooks are not)."""
        return hasattr(self.hooks.init, "py_func")


@dataclass(frozen=True, eq=False)
class Choice:
    """A policy with its parameter values (``params`` in Param order, defaults filled)."""

    policy: Policy
    params: np.ndarray

    @property
    def label(self) -> str:
        """Canonical spec: the name, then ``:name=value,...`` for each non-default value."""
        changed = [f"{p.name}={number(v)}" for p, v in zip(self.policy.params, self.params, strict=True)
                   if v != p.default]
        return self.policy.name + (":" + ",".join(changed) if changed else "")

    def run(self, keys: np.ndarray, offsets: np.ndarray, sizes: np.ndarray, capacity: int, seed: int,
            prefetch: tuple[np.ndarray, np.ndarray] | None = None, record: bool = False,
            scores: np.ndarray | None = None, outcomes: np.ndarray | None = None,
            ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """(hits per request, events, per-key prefetch counts) of one request stream: the
        fast kernel for a plain demand replay (events and counts None), otherwise the hooks
        through ``drive``. ``scores``
        (float32, one per entry of ``keys``) is required by a policy with ``needs_scores``;
        ``outcomes`` (int8 zeros, one per entry of ``keys`` and then of the prefetch keys)
        receives each entry's outcome (``driver.MISS``, ``HIT``, ``PREFETCH_HIT``)."""
        p = self.policy
        if p.needs_scores and (scores is None or scores.shape != keys.shape):
            raise MoecacheError(f"policy {p.name} needs the router weight of every request")
        if (p.kernel is not None and prefetch is None and not record and outcomes is None
                and not (p.unit_kernel and np.any(sizes != 1))):
            extra = (scores.astype(np.float32, copy=False),) if p.needs_scores else ()
            hits = p.kernel(keys, offsets, sizes, np.int64(capacity), self.params, np.int64(seed), *extra)
            return hits, None, None
        batch, batch_offsets = prefetch or (np.zeros(0, keys.dtype), np.zeros(0, np.int64))
        args = (*p.hooks, keys, offsets, sizes, np.int64(capacity), self.params, np.int64(seed),
                np.zeros(0, np.float32) if scores is None else scores.astype(np.float32, copy=False),
                batch.astype(keys.dtype), batch_offsets, record,
                np.zeros(0, np.int8) if outcomes is None else outcomes)
        try:
            return drive(*args)
        except MoecacheError:
            raise
        except Exception as err:  # a user's Python policy: its bugs are reported in one line naming it
            if p.compiled:
                raise
            frame = traceback.extract_tb(err.__traceback__)[-1]
            raise MoecacheError(f"policy {p.name}: {type(err).__name__}: {err} "
                                f"({Path(frame.filename).name}, line {frame.lineno})") from None


class Session:
    """One cache that serves its request stream a span at a time (the streaming replay):
    the policy's hooks through ``driver.serve``, its state and the cache carried from one
    span to the next, ``resume`` called before each span. Same hits as one ``Choice.run``
    over the whole stream (docs/semantics.md, "Streaming")."""

    def __init__(self, choice: Choice, sizes: np.ndarray, capacity: int, seed: int) -> None:
        p = choice.policy
        if not p.compiled:
            raise MoecacheError(f"policy {p.name}: a Python policy reads the whole stream in reset(), so it "
                                "cannot stream: load the trace in memory (--no-stream)")
        self.choice, self.sizes, self.capacity = choice, np.asarray(sizes, np.int64), np.int64(capacity)
        if p.spans is not None:
            self.state = p.spans.new(len(self.sizes))
            return
        self.state = p.hooks.init(np.zeros(0, np.int32), np.zeros(1, np.int64), self.sizes, self.capacity,
                                  choice.params, np.int64(seed), np.zeros(0, np.float32))
        self.cache = new_cache(len(self.sizes))

    def serve(self, keys: np.ndarray, offsets: np.ndarray, first: int, first_entry: int, total: int,
              scores: np.ndarray | None = None, future: np.ndarray | None = None) -> np.ndarray:
        """Hits per request of the next span: requests ``first``.. of ``total`` (entries from
        ``first_entry``), ``offsets`` indexing this span's ``keys`` (int32); ``scores`` and
        ``future`` (next request per entry) for the policies that read them."""
        p = self.choice.policy
        if p.needs_scores and (scores is None or scores.shape != keys.shape):
            raise MoecacheError(f"policy {p.name} needs the router weight of every request")
        if p.needs_future and (future is None or future.shape != keys.shape):
            raise MoecacheError(f"policy {p.name} needs the next use of every request")
        scores = np.zeros(0, np.float32) if scores is None else scores.astype(np.float32, copy=False)
        future = np.zeros(0, np.int64) if future is None else future.astype(np.int64, copy=False)
        if p.spans is not None:
            return p.spans.serve(self.state, keys, offsets, self.sizes, self.capacity, np.int64(first),
                                 future)
        self.state = p.resume(self.state, keys, offsets, scores, self.choice.params, np.int64(first),
                              np.int64(first_entry), np.int64(total), future)
        hooks = p.hooks
        hits, _ = serve(hooks.access, hooks.admit, hooks.victim, hooks.evict, hooks.keep, self.state,
                        self.cache, np.int64(first), keys, offsets, self.sizes, self.capacity,
                        np.zeros(0, keys.dtype), np.zeros(0, np.int64), False, np.zeros(0, np.int8))
        return hits


def number(value: float) -> str:
    """A parameter value as the shortest text that reads back to it (1, 0.1, 1e-05)."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def parse_args(text: str, name: str) -> dict[str, str]:
    """``"a=1,b=2"`` as {"a": "1", "b": "2"}; one-line errors name the policy."""
    out: dict[str, str] = {}
    for item in text.split(","):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not key or not value:
            raise MoecacheError(f"policy {name}: expected name=value in {text!r}, got {item!r}")
        if key in out:
            raise MoecacheError(f"policy {name}: parameter {key!r} given twice")
        out[key] = value
    return out


def choose(policy: Policy, args: Mapping[str, Any]) -> Choice:
    """Validate ``args`` against ``policy.params`` and fill in the defaults."""
    known = {p.name: p for p in policy.params}
    values = {p.name: p.default for p in policy.params}
    for key, raw in args.items():
        if key not in known:
            offered = f"its parameters are {', '.join(known)}" if known else "it has no parameters"
            raise MoecacheError(f"policy {policy.name}: unknown parameter {key!r}: {offered}")
        p = known[key]
        try:
            if isinstance(raw, bool):
                raise TypeError
            value = float(raw)
        except (TypeError, ValueError):
            raise MoecacheError(f"policy {policy.name}: {key} must be a number, got {raw!r}") from None
        if not math.isfinite(value) or not p.low <= value <= p.high:
            raise MoecacheError(f"policy {policy.name}: {key}={raw} is outside "
                                f"[{number(p.low)}, {number(p.high)}]")
        if p.integer and not value.is_integer():
            raise MoecacheError(f"policy {policy.name}: {key} must be a whole number, got {raw}")
        values[key] = value
    return Choice(policy, np.array([values[p.name] for p in policy.params], np.float64))
