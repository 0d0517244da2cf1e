"""From a trace to cache requests: the per-(step, layer) expert sets of docs/semantics.md.

The sets are stored once, step-major (request ``r = t * L + l``), as a CSR pair
(``ids``, ``offsets``) with ascending ids inside each set. Layer scope replays one
layer's column of it; global scope replays all of it with keys ``l * E + expert``.
The routing-only metrics (requests, cold misses, reuse) are computed here, once.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
from numba import njit

from moecache.policies import bit_index

from .buffers import mapped_zeros
from .errors import MoecacheError
from .parallel import cores, map_parallel, split
from .trace import Trace


@njit(cache=True, nogil=True)
def _unions_part(experts, step_starts, num_experts, first, stop, ids, offsets):
    """The sets of steps [first, stop), ascending, written to ``ids`` from the part's
    worst-case start ``step_starts[first] * L * K`` (a set holds at most K experts per token
    of its step, so a part never runs into the next part's start); ``offsets[t * L + l + 1]``
    = where set (t, l) ends. Returns where the part ends.

    Each set is gathered as a bit mask over the experts (which also merges the tokens of a
    multi-token step) and read back lowest bit first, i.e. in ascending id order.
    """
    num_layers, top_k = experts.shape[1], experts.shape[2]
    mask = np.zeros((num_experts + 63) // 64, np.uint64)
    fill = step_starts[first] * num_layers * top_k
    for t in range(first, stop):
        for layer in range(num_layers):
            for token in range(step_starts[t], step_starts[t + 1]):
                for k in range(top_k):
                    e = experts[token, layer, k]
                    mask[e >> 6] |= np.uint64(1) << np.uint64(e & 63)
            for word in range(mask.shape[0]):
                bits = mask[word]
                if not bits:  # skipping empty words: step_unions 2.3x faster (100M requests, one thread)
                    continue
                mask[word] = 0
                while bits:
                    lowest = bits & (~bits + np.uint64(1))
                    ids[fill] = word * 64 + bit_index(lowest)
                    fill += 1
                    bits ^= lowest
            offsets[t * num_layers + layer + 1] = fill
    return fill


def step_unions(experts: np.ndarray, step_starts: np.ndarray, num_experts: int,
                workers: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Union of the step's tokens' experts per (step, layer), ascending, as a step-major CSR
    (ids int16, offsets int64).
    The steps are cut into parts of about equal tokens, built side by side (``workers``
    threads, default every core), then packed together."""
    num_tokens, num_layers, top_k = experts.shape
    num_steps = len(step_starts) - 1
    ids = mapped_zeros(num_tokens * num_layers * top_k, np.int16)
    offsets = mapped_zeros(num_steps * num_layers + 1, np.int64)
    cuts = np.searchsorted(step_starts, [start for start, _ in split(num_tokens, cores(workers))])
    bounds = np.unique(np.append(np.minimum(cuts, num_steps), num_steps))
    parts = list(zip(bounds[:-1], bounds[1:], strict=True)) or [(0, 0)]
    ends = map_parallel(lambda i: _unions_part(experts, step_starts, num_experts, *parts[i], ids, offsets),
                        len(parts), workers)
    fill = 0
    for (first, stop), end in zip(parts, ends, strict=True):
        start = step_starts[first] * num_layers * top_k
        if start != fill:  # close the gap left by the sets smaller than their worst case
            ids[fill:fill + end - start] = ids[start:end]
            offsets[first * num_layers + 1:stop * num_layers + 1] -= start - fill
        fill += end - start
    return ids[:fill], offsets


@njit(cache=True, nogil=True)
def _layer_offsets(offsets, num_layers, layer):
    """Offsets of one layer's requests in the step-major CSR, as their own CSR offsets."""
    num_steps = (offsets.shape[0] - 1) // num_layers
    out_offsets = np.zeros(num_steps + 1, np.int64)
    for t in range(num_steps):
        r = t * num_layers + layer
        out_offsets[t + 1] = out_offsets[t] + offsets[r + 1] - offsets[r]
    return out_offsets


@njit(cache=True, nogil=True)
def _gather_layer(values, offsets, num_layers, layer, out_offsets, out):
    """Copy one layer's entries of ``values`` (aligned with the step-major CSR) into ``out``."""
    for t in range(out_offsets.shape[0] - 1):
        r = t * num_layers + layer
        out[out_offsets[t]:out_offsets[t + 1]] = values[offsets[r]:offsets[r + 1]]
    return out


def _layer_column(values: np.ndarray, offsets: np.ndarray, num_layers: int, layer: int,
                  dtype: type) -> tuple[np.ndarray, np.ndarray]:
    """One layer's entries of ``values`` as ``dtype``, with the layer's own CSR offsets."""
    out_offsets = _layer_offsets(offsets, num_layers, layer)
    out = np.empty(out_offsets[-1], dtype)
    return _gather_layer(values, offsets, num_layers, layer, out_offsets, out), out_offsets


@njit(cache=True)
def step_scores(experts, weights, step_starts, ids, offsets, num_experts):
    """Per entry of the step-major CSR: the largest router weight its expert got from any
    token of the step in that layer."""
    num_layers, top_k = experts.shape[1], experts.shape[2]
    scores = np.empty(ids.shape[0], np.float32)
    best = np.full(num_experts, -np.inf, np.float32)
    for t in range(step_starts.shape[0] - 1):
        for layer in range(num_layers):
            for token in range(step_starts[t], step_starts[t + 1]):
                for k in range(top_k):
                    e = experts[token, layer, k]
                    best[e] = max(best[e], weights[token, layer, k])
            r = t * num_layers + layer
            for j in range(offsets[r], offsets[r + 1]):
                scores[j] = best[ids[j]]
                best[ids[j]] = -np.inf
    return scores


@njit(cache=True)
def _step_token_counts(experts, step_starts, ids, offsets, num_experts):
    """Per entry of the step-major CSR: how many of the step's tokens chose its expert in
    that layer."""
    num_layers, top_k = experts.shape[1], experts.shape[2]
    counts = np.zeros(ids.shape[0], np.int32)
    tally = np.zeros(num_experts, np.int32)
    for t in range(step_starts.shape[0] - 1):
        for layer in range(num_layers):
            for token in range(step_starts[t], step_starts[t + 1]):
                for k in range(top_k):
                    tally[experts[token, layer, k]] += 1
            r = t * num_layers + layer
            for j in range(offsets[r], offsets[r + 1]):
                counts[j] = tally[ids[j]]
                tally[ids[j]] = 0
    return counts


@njit(cache=True, nogil=True)
def _keys_part(ids, offsets, num_layers, num_experts, first, stop, keys):
    """Keys ``layer * E + expert`` of requests [first, stop)."""
    for r in range(first, stop):
        base = (r % num_layers) * num_experts
        for j in range(offsets[r], offsets[r + 1]):
            keys[j] = base + ids[j]


def global_keys(ids: np.ndarray, offsets: np.ndarray, num_layers: int, num_experts: int,
                workers: int | None = None) -> np.ndarray:
    """Keys ``layer * E + expert`` (int32) for every entry of a step-major CSR, so (layer,
    expert) order is key order."""
    keys = mapped_zeros(ids.shape[0], np.int32)
    parts = split(len(offsets) - 1, cores(workers))
    map_parallel(lambda i: _keys_part(ids, offsets, num_layers, num_experts, *parts[i], keys),
                 len(parts), workers)
    return keys


NEVER = -2  # ``last_step`` of a key not requested yet (not -1: "the step before step 0")


TOTALS = ("requests", "cold_misses", "reuse_hits", "reuse_requests", "largest")
"""The routing-only totals per MoE layer (:attr:`Requests.layer_totals`)."""


@njit(cache=True, nogil=True)
def _layer_counts(ids, offsets, num_layers, num_experts, last_step, first_step, first, stop, totals,
                  largest_step):
    """``routing_counts`` for layers [first, stop) (whose keys and totals no other layer touches)."""
    for t in range((offsets.shape[0] - 1) // num_layers):
        step = first_step + t
        for layer in range(first, stop):
            r = t * num_layers + layer
            size = offsets[r + 1] - offsets[r]
            totals[0, layer] += size
            if step > 0:
                totals[3, layer] += size
            if size > totals[4, layer]:  # the first largest
                totals[4, layer] = size
                largest_step[layer] = step
            base = layer * num_experts
            for j in range(offsets[r], offsets[r + 1]):
                seen = last_step[base + ids[j]]
                totals[1, layer] += seen == NEVER
                totals[2, layer] += seen == step - 1
                last_step[base + ids[j]] = step


def routing_counts(ids: np.ndarray, offsets: np.ndarray, num_layers: int, num_experts: int,
                   last_step: np.ndarray, first_step: int, workers: int | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The routing-only totals per layer of a step-major CSR of whole steps whose first step
    is ``first_step``: (int64 rows TOTALS x layers: requests, cold (first-ever) references,
    reuse hits (in the same layer's previous step), requests after step 0, the largest set;
    the first step holding each layer's largest set). ``last_step`` (int64, one per layer x E
    key, NEVER before its first request) carries over from one part of a stream to the next.
    Layers are counted side by side."""
    totals = np.zeros((len(TOTALS), num_layers), np.int64)
    largest_step = np.zeros(num_layers, np.int64)
    parts = split(num_layers, cores(workers))
    map_parallel(lambda i: _layer_counts(ids, offsets, num_layers, num_experts, last_step, first_step,
                                         *parts[i], totals, largest_step), len(parts), workers)
    return totals, largest_step


def largest_at(totals: np.ndarray, largest_step: np.ndarray) -> tuple[int, int]:
    """(step, layer index) of the largest set, the first in step-major order if several,
    from :func:`routing_counts`' result."""
    largest = totals[TOTALS.index("largest")]
    ties = np.flatnonzero(largest == largest.max())
    first = ties[np.argmin(largest_step[ties])]  # argmin: the lowest layer among equal steps
    return int(largest_step[first]), int(first)


def step_bounds(trace: Trace, per_token: bool = False) -> np.ndarray:
    """First token of each step (every token its own step with ``per_token``)."""
    return np.arange(trace.num_tokens + 1, dtype=np.int64) if per_token else trace.step_starts()


@dataclass(eq=False)
class Requests:
    """The cache requests of a trace, shared by every replay of it."""

    ids: np.ndarray
    offsets: np.ndarray
    num_layers: int
    num_experts: int
    num_tokens: int

    @classmethod
    def from_trace(cls, trace: Trace, *, per_token: bool = False) -> Requests:
        """The requests of a trace (built once, then cached on it); ``per_token`` makes
        every token its own step. A trace without tokens is an error: nothing to replay."""
        if trace.num_tokens == 0:
            raise MoecacheError(f"{trace.source}: the trace holds no tokens: nothing to replay")
        key = ("requests", per_token)
        if key not in trace.cache:
            ids, offsets = step_unions(trace.experts, step_bounds(trace, per_token), trace.num_experts)
            trace.cache[key] = cls(ids, offsets, trace.num_layers, trace.num_experts,
                                   trace.num_tokens)
        return trace.cache[key]

    @staticmethod
    def built(trace: Trace, per_token: bool = False) -> bool:
        """Whether the requests of ``trace`` are built (cached on it) already."""
        return ("requests", per_token) in trace.cache

    def scores(self, trace: Trace, *, per_token: bool = False) -> np.ndarray:
        """Router weight per entry of ``ids`` (float32; the largest among the step's tokens
        that chose the expert), for policies that read scores; cached on the trace."""
        if trace.weights is None:
            raise MoecacheError(f"{trace.source}: the trace has no router weights, which this "
                                "policy needs (capture or import them with the routing)")
        key = ("scores", per_token)
        if key not in trace.cache:
            trace.cache[key] = step_scores(trace.experts, trace.weights, step_bounds(trace, per_token),
                                            self.ids, self.offsets, self.num_experts)
        return trace.cache[key]

    def token_counts(self, trace: Trace, *, per_token: bool = False) -> np.ndarray:
        """Tokens of the step that chose each entry's expert in its layer (int32, one per
        entry of ``ids``); cached on the trace."""
        key = ("token_counts", per_token)
        if key not in trace.cache:
            trace.cache[key] = _step_token_counts(trace.experts, step_bounds(trace, per_token), self.ids,
                                                  self.offsets, self.num_experts)
        return trace.cache[key]

    def step_tokens(self, trace: Trace, *, per_token: bool = False) -> np.ndarray:
        """Tokens per step (int64)."""
        return np.diff(step_bounds(trace, per_token))

    def layer_entries(self, index: int) -> np.ndarray:
        """Positions in ``ids`` of the l-th MoE layer's entries, in the order of ``layer(index)``."""
        everything = np.arange(len(self.ids), dtype=np.int64)
        if self.num_layers == 1:
            return everything
        return _layer_column(everything, self.offsets, self.num_layers, index, np.int64)[0]

    def layer_values(self, values: np.ndarray, index: int) -> np.ndarray:
        """The l-th MoE layer's entries of ``values`` (one per entry of ``ids``: scores,
        next uses), aligned with ``layer(index)``'s keys."""
        if self.num_layers == 1:
            return values
        return _layer_column(values, self.offsets, self.num_layers, index, values.dtype)[0]

    @property
    def num_steps(self) -> int:
        return (len(self.offsets) - 1) // max(self.num_layers, 1)

    @property
    def set_sizes(self) -> np.ndarray:
        """|E[t, l]| as an array (steps, layers) (int64, built on each call: 8 bytes a set)."""
        return np.diff(self.offsets).reshape(self.num_steps, self.num_layers)

    def largest_set(self) -> tuple[int, int]:
        """(step, layer index) of the largest step set, the first if several."""
        return largest_at(*self._counts)

    @cached_property
    def _counts(self) -> tuple[np.ndarray, np.ndarray]:
        fresh = np.full(self.num_layers * self.num_experts, NEVER, np.int64)
        return routing_counts(self.ids, self.offsets, self.num_layers, self.num_experts, fresh, 0)

    def layer(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(keys, offsets) of the l-th MoE layer's requests, keys = expert ids."""
        if self.num_layers == 1:
            return self.ids, self.offsets
        return _layer_column(self.ids, self.offsets, self.num_layers, index, np.int32)

    @property
    def layer_totals(self) -> dict[str, np.ndarray]:
        """Per MoE layer (keys TOTALS): requested experts, cold misses, reuse hits and
        requests (the numerator and denominator of the reuse rate) and the largest step
        set; counted in one pass, no array per set kept."""
        return dict(zip(TOTALS, self._counts[0], strict=True))

    @cached_property
    def _pooled_keys(self) -> np.ndarray:
        return global_keys(self.ids, self.offsets, self.num_layers, self.num_experts)

    def pooled(self) -> tuple[np.ndarray, np.ndarray]:
        """(keys, offsets) of all requests in (step, layer) order, keys = l * E + expert."""
        return self._pooled_keys, self.offsets
