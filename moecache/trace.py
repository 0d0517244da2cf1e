"""The in-memory trace: routed experts per (token, MoE layer), and its validation.

In memory a :class:`Trace` is dense: ``experts`` has shape (tokens, layers, K) and the
per-token columns (step, seq, pos, token_id, phase) have one entry per token. On disk
(:mod:`moecache.trace_io`, format: :mod:`moecache.trace_format`) there is one row per
(token, layer), sorted by (step, token, layer), with the JSON metadata of
traces/README.md under the schema key ``moecache``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numba import njit

from .errors import TraceError
from .parallel import cores, map_parallel, split
from .trace_format import DECODE, MAX_EXPERTS, NO_NEXT_LAYER, PREFILL, build_meta, check_meta
from .trace_io import read_columns, save_trace


@dataclass(eq=False)
class Trace:
    """Routing of a model over a token stream: K experts per token and MoE layer.

    ``experts[n, l]`` holds the K expert ids token ``n`` was routed to in the l-th MoE
    layer (model layer ``layers[l]``), in the router's rank order. Tokens sharing a
    ``step`` value are served together (a prefill chunk or a batch). Treat a trace as
    immutable: the step sets built for replay are cached on it.

    Optional, same shape as ``experts``: ``weights`` (the gate weights), ``lookahead``
    (the experts the NEXT MoE layer's router picks from this layer's router input, rank
    order; -1 throughout the last MoE layer) and ``lookahead_weights``. ``logits``:
    (tokens, layers, E) router scores.
    """

    experts: np.ndarray
    step: np.ndarray
    seq: np.ndarray
    pos: np.ndarray
    token_id: np.ndarray
    phase: np.ndarray
    meta: dict[str, Any]
    weights: np.ndarray | None = None
    logits: np.ndarray | None = None
    lookahead: np.ndarray | None = None
    lookahead_weights: np.ndarray | None = None
    source: str = field(default="<memory>")
    cache: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        _validate(self)

    # -- construction -------------------------------------------------------------
    @classmethod
    def from_arrays(
        cls,
        experts: np.ndarray,
        num_experts: int,
        weights: np.ndarray | None = None,
        seq: np.ndarray | None = None,
        layers: Sequence[int] | None = None,
        expert_bytes: int | Sequence[int] | None = None,
        meta: dict[str, Any] | None = None,
        *,
        step: np.ndarray | None = None,
        phase: np.ndarray | None = None,
        token_id: np.ndarray | None = None,
        logits: np.ndarray | None = None,
        lookahead: np.ndarray | None = None,
        lookahead_weights: np.ndarray | None = None,
    ) -> Trace:
        """A trace from an int array (tokens, layers, K); by default one decode step per token.

        ``seq`` gives each token's sequence id (positions count up within a sequence),
        ``step`` groups tokens into steps, ``phase`` is 0 (prefill) / 1 (decode) per token.
        """
        experts = np.asarray(experts)
        if experts.ndim != 3:
            raise TraceError(f"<memory>: experts must have shape (tokens, layers, K), got {experts.shape}")
        if not np.issubdtype(experts.dtype, np.integer):
            raise TraceError(f"<memory>: expert ids must be integers, got dtype {experts.dtype}")
        n, num_layers, top_k = experts.shape
        layers = list(range(num_layers)) if layers is None else [int(x) for x in layers]
        seq_arr = np.zeros(n, np.int32) if seq is None else np.asarray(seq, np.int32)
        return cls(
            experts=_as_ids(experts, "<memory>"),
            step=np.arange(n, dtype=np.int64) if step is None else np.asarray(step, np.int64),
            seq=seq_arr,
            pos=positions(seq_arr),
            token_id=np.full(n, -1, np.int32) if token_id is None else np.asarray(token_id, np.int32),
            phase=np.full(n, DECODE, np.int8) if phase is None else np.asarray(phase, np.int8),
            meta=build_meta(num_experts, top_k, layers, expert_bytes, meta),
            weights=None if weights is None else np.asarray(weights, np.float32),
            logits=None if logits is None else np.asarray(logits, np.float16),
            lookahead=None if lookahead is None else _as_ids(np.asarray(lookahead), "<memory>"),
            lookahead_weights=(None if lookahead_weights is None
                               else np.asarray(lookahead_weights, np.float32)),
        )

    # -- shape and metadata -------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return int(self.experts.shape[0])

    @property
    def num_layers(self) -> int:
        """Number of MoE layers in the trace (dense layers are not recorded)."""
        return int(self.experts.shape[1])

    @property
    def top_k(self) -> int:
        return int(self.experts.shape[2])

    @property
    def num_experts(self) -> int:
        return int(self.meta["num_experts"])

    @property
    def layers(self) -> np.ndarray:
        """Model layer index of each MoE layer in the trace."""
        return np.asarray(self.meta["moe_layers"], dtype=np.int64)

    @property
    def expert_bytes(self) -> np.ndarray | None:
        """Bytes of one expert's weights per MoE layer, or None if the trace does not say."""
        sizes = self.meta.get("expert_bytes")
        return None if sizes is None else np.asarray(sizes, dtype=np.int64)

    @property
    def num_steps(self) -> int:
        return int(len(self.step_starts()) - 1)

    @property
    def partial(self) -> bool:
        """True when the trace was cut short (an interrupted capture)."""
        return bool(self.meta.get("partial", False))

    def step_starts(self) -> np.ndarray:
        """Token offsets where each step begins, plus the total: shape (steps + 1,)."""
        if self.num_tokens == 0:
            return np.zeros(1, np.int64)
        change = np.flatnonzero(np.diff(self.step)) + 1
        return np.concatenate(([0], change, [self.num_tokens])).astype(np.int64)

    def __repr__(self) -> str:
        return (
            f"Trace({self.source}: {self.num_tokens} tokens, {self.num_steps} steps, "
            f"{self.num_layers} MoE layers, E={self.num_experts}, K={self.top_k})"
        )

    # -- persistence ----------------------------------------------------------------
    def save(self, path: str | os.PathLike, *, overwrite: bool = True) -> Path:
        """Write the trace as Parquet, atomically (temporary file, then rename): an
        interrupted or failed save leaves the previous file, if any, and nothing else."""
        return save_trace(self, path, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike, *, weights: bool = True, logits: bool = False,
             lookahead: bool = True) -> Trace:
        """Read and validate a trace file (or the part folder of an interrupted capture).

        ``weights=False``, ``logits=False`` and ``lookahead=False`` skip those columns
        (``weights=False`` also skips ``lookahead_weights``), so replaying a large trace
        only reads the expert ids. ``lookahead`` is read when the file has it.
        """
        return cls(**read_columns(path, weights=weights, logits=logits, lookahead=lookahead))


def _as_ids(experts: np.ndarray, source: str) -> np.ndarray:
    if experts.size and (experts.min() < -MAX_EXPERTS or experts.max() >= MAX_EXPERTS):
        bad = int(experts.max() if experts.max() >= MAX_EXPERTS else experts.min())
        raise TraceError(f"{source}: expert id {bad} does not fit the int16 id column")
    return np.ascontiguousarray(experts, dtype=np.int16)


def positions(seq: np.ndarray) -> np.ndarray:
    """Index of each token within its sequence, counting in trace order."""
    pos = np.zeros(len(seq), np.int32)
    if len(seq):
        order = np.argsort(seq, kind="stable")
        sorted_seq = seq[order]
        starts = np.concatenate(([0], np.flatnonzero(np.diff(sorted_seq)) + 1))
        run_start = np.repeat(starts, np.diff(np.concatenate((starts, [len(seq)]))))
        pos[order] = np.arange(len(seq)) - run_start
    return pos


def _validate(trace: Trace) -> None:
    """Raise TraceError naming ``trace.source`` and the first problem found."""
    src = trace.source
    ex = trace.experts
    if ex.ndim != 3:
        raise TraceError(f"{src}: experts must have shape (tokens, layers, K), got {ex.shape}")
    n, num_layers, top_k = ex.shape
    meta = trace.meta
    check_meta(meta, src)
    num_experts = meta["num_experts"]
    if top_k < 1:
        raise TraceError(f"{src}: each row needs at least one expert (K = 0)")
    if meta["top_k"] != top_k:
        raise TraceError(f"{src}: inconsistent K: rows hold {top_k} experts, "
                         f"metadata says top_k={meta['top_k']}")
    if top_k > num_experts:
        raise TraceError(f"{src}: K = {top_k} exceeds num_experts = {num_experts}")
    layers = meta["moe_layers"]
    if len(layers) != num_layers:
        raise TraceError(f"{src}: metadata moe_layers lists {len(layers)} layers, rows have {num_layers}")
    if len(set(layers)) != len(layers) or list(layers) != sorted(layers):
        raise TraceError(f"{src}: metadata moe_layers must be distinct and ascending, got {layers}")
    sizes = meta.get("expert_bytes")
    if sizes is not None and len(sizes) != num_layers:
        raise TraceError(f"{src}: metadata expert_bytes must give one positive size per MoE layer")
    for name in ("step", "seq", "pos", "token_id", "phase"):
        if len(getattr(trace, name)) != n:
            raise TraceError(f"{src}: column {name} has {len(getattr(trace, name))} entries for {n} tokens")
    if n == 0:
        return
    row = _first_bad_row(ex.reshape(-1, top_k), num_experts)
    if row >= 0:
        t, li = divmod(row, num_layers)
        values = ex[t, li]
        if values.min() < 0:
            raise TraceError(f"{src}: negative expert id {values.min()} (token {t}, layer {layers[li]})")
        if values.max() >= num_experts:
            raise TraceError(f"{src}: expert id {values.max()} >= num_experts {num_experts} "
                             f"(token {t}, layer {layers[li]})")
        _raise_repeat(ex, row, "", layers, src)
    back = np.flatnonzero(np.diff(trace.step) < 0)
    if len(back):
        at = back[0] + 1
        raise TraceError(f"{src}: steps are not sorted "
                         f"(token {at} has step {trace.step[at]} after {trace.step[at - 1]})")
    bad_phase = np.flatnonzero((trace.phase != PREFILL) & (trace.phase != DECODE))
    if len(bad_phase):
        raise TraceError(f"{src}: phase must be prefill or decode (token {bad_phase[0]})")
    if trace.weights is not None and trace.weights.shape != ex.shape:
        raise TraceError(f"{src}: weights have shape {trace.weights.shape}, experts {ex.shape}")
    if trace.logits is not None and trace.logits.shape != (n, num_layers, num_experts):
        expected = (n, num_layers, num_experts)
        raise TraceError(f"{src}: logits have shape {trace.logits.shape}, expected {expected}")
    _validate_lookahead(trace, layers)


@njit(cache=True, nogil=True)
def _bad_row_part(rows, num_ids, first, stop):
    """The first of rows [first, stop) of ``rows`` (R, K) holding an id outside [0, num_ids)
    or an id twice, -1 if none. Invariant: ``seen[e] == r + 1`` iff id e appeared in row r."""
    seen = np.zeros(num_ids, np.int64)
    for r in range(first, stop):
        for k in range(rows.shape[1]):
            e = rows[r, k]
            if e < 0 or e >= num_ids or seen[e] == r + 1:
                return r
            seen[e] = r + 1
    return -1


def _first_bad_row(rows: np.ndarray, num_ids: int) -> int:
    """The first row of ``rows`` (R, K) with an id outside [0, ``num_ids``) or an id twice,
    -1 if none; parts of the rows are checked side by side."""
    parts = split(len(rows), cores())
    found = [r for r in map_parallel(lambda i: _bad_row_part(rows, num_ids, *parts[i]), len(parts)) if r >= 0]
    return int(min(found)) if found else -1


def _raise_repeat(ids: np.ndarray, row: int, column: str, layers: list[int], src: str) -> None:
    t, li = divmod(row, ids.shape[1])
    raise TraceError(f"{src}: duplicate expert id in one {column}row "
                     f"(token {t}, layer {layers[li]}: {ids[t, li].tolist()})")


def _validate_lookahead(trace: Trace, layers: list[int]) -> None:
    """``lookahead``: the experts' shape, ids in [0, E) but -1 throughout the last MoE layer."""
    src, ahead, shape = trace.source, trace.lookahead, trace.experts.shape
    if ahead is None:
        if trace.lookahead_weights is not None:
            raise TraceError(f"{src}: lookahead_weights without a lookahead column")
        return
    for name, values in (("lookahead", ahead), ("lookahead_weights", trace.lookahead_weights)):
        if values is not None and values.shape != shape:
            raise TraceError(f"{src}: {name} has shape {values.shape}, experts {shape}")
    if not shape[0]:
        return
    last = ahead[:, -1]
    if np.any(last != NO_NEXT_LAYER):
        t = int(np.argwhere(last != NO_NEXT_LAYER)[0][0])
        raise TraceError(f"{src}: lookahead of the last MoE layer (layer {layers[-1]}) must be "
                         f"{NO_NEXT_LAYER} (no next layer), got {last[t].tolist()} (token {t})")
    known = ahead[:, :-1]
    bad = np.argwhere((known < 0) | (known >= trace.num_experts))
    if len(bad):
        t, li, k = bad[0]
        value = int(known[t, li, k])
        why = (f"{NO_NEXT_LAYER} (no next layer) before the last MoE layer" if value == NO_NEXT_LAYER
               else f"outside [0, num_experts {trace.num_experts})")
        raise TraceError(f"{src}: lookahead id {value} is {why} (token {t}, layer {layers[li]})")
    row = _first_bad_row(known.reshape(-1, known.shape[2]), trace.num_experts)  # ids checked above
    if row >= 0:
        _raise_repeat(known, row, "lookahead ", layers, src)
