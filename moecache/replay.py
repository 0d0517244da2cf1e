"""Replay driver: runs a policy kernel on a configuration checked by :mod:`moecache.validate`,
explains the result."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from moecache.policies import resolve
from moecache.policies.driver import EVENT_COLUMNS

from .errors import MoecacheError
from .parallel import map_parallel
from .requests import Requests
from .results import PREFETCH_KEYS, ReplayResult, summarize
from .streaming import in_spans, replay_in_spans
from .trace import Trace
from .validate import plan


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

    A demand replay (no ``requests``, prefetch, events or outcomes) of a large trace whose
    step sets are not built yet, under a policy that serves in one pass (lru), runs a span
    of steps at a time (:func:`moecache.streaming.replay_in_spans`): the same result, in
    the memory of the trace and one span.
    """
    choice = resolve(policy, policy_args)
    if requests is None and prefetch is None and not (record_events or record_outcomes) and in_spans(
            trace, choice, per_token):
        return replay_in_spans(trace, choice, capacity, scope, per_token=per_token, memory=memory,
                               bandwidth=bandwidth, latency=latency, seed=seed, workers=workers)
    checked = plan(trace, choice, scope, capacity=capacity, memory=memory,
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
